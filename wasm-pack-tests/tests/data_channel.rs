//! One libp2p stream (the spec's framing, `client::webrtc::stream`) over one real
//! `RTCDataChannel` (`client::webrtc::channel`, with its bounded receive queue and its send
//! back-pressure) between two peer connections in headless Chromium, on loopback: 16 MiB
//! arrive whole and in order. The test prints the throughput beside that of a second data
//! channel of the same connections carrying 16 KiB messages with no stream framing (no timing
//! is asserted).

use futures::{AsyncReadExt, AsyncWriteExt};
use swarmtrain_client::webrtc::channel::DataChannel;
use swarmtrain_client::webrtc::stream::{Channel, Stream};
use wasm_bindgen::JsValue;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;
use web_sys::{
    RtcDataChannelInit, RtcIceGatheringState, RtcPeerConnection, RtcSdpType,
    RtcSessionDescriptionInit,
};

wasm_bindgen_test_configure!(run_in_browser);

const BYTES: usize = 16 << 20;

/// Sets `pc`'s local description from `description` and waits until it holds all of its ICE
/// candidates (so no trickling is needed); returns that SDP.
async fn local(pc: &RtcPeerConnection, description: JsValue, kind: RtcSdpType) -> String {
    let sdp = js_sys::Reflect::get(&description, &"sdp".into())
        .expect("sdp")
        .as_string()
        .expect("a string");
    let init = RtcSessionDescriptionInit::new(kind);
    init.set_sdp(&sdp);
    JsFuture::from(pc.set_local_description(&init))
        .await
        .expect("local description");
    while pc.ice_gathering_state() != RtcIceGatheringState::Complete {
        swarmtrain_client::platform::sleep(std::time::Duration::from_millis(20)).await;
    }
    pc.local_description().expect("set").sdp()
}

async fn remote(pc: &RtcPeerConnection, kind: RtcSdpType, sdp: &str) {
    let init = RtcSessionDescriptionInit::new(kind);
    init.set_sdp(sdp);
    JsFuture::from(pc.set_remote_description(&init))
        .await
        .expect("remote description");
}

/// A data channel agreed out of band (the same id on both sides), as libp2p streams are not:
/// the test needs no `datachannel` event.
fn channel(pc: &RtcPeerConnection, id: u16) -> DataChannel {
    let init = RtcDataChannelInit::new();
    init.set_negotiated(true);
    init.set_id(id);
    DataChannel::new(pc.create_data_channel_with_data_channel_dict("bench", &init))
}

/// `data` as 16 KiB data-channel messages from `tx` to `rx`, no framing: the reference.
async fn raw(tx: &mut DataChannel, rx: &mut DataChannel, data: &[u8]) {
    use futures::future::poll_fn;
    let send = async {
        for message in data.chunks(16 << 10) {
            poll_fn(|cx| tx.poll_send_ready(cx)).await.expect("open");
            tx.send(message).expect("send");
        }
        poll_fn(|cx| tx.poll_flushed(cx)).await.expect("flushed");
    };
    let receive = async {
        let mut received = 0;
        while received < data.len() {
            match poll_fn(|cx| rx.poll_recv(cx)).await {
                Some(Ok(message)) => received += message.len(),
                other => panic!("the channel ended: {other:?}"),
            }
        }
    };
    futures::join!(send, receive);
}

#[wasm_bindgen_test]
async fn one_data_channel_carries_a_libp2p_stream() {
    let a = RtcPeerConnection::new().expect("peer connection");
    let b = RtcPeerConnection::new().expect("peer connection");
    let mut sender = Stream::new(channel(&a, 1));
    let mut receiver = Stream::new(channel(&b, 1));
    let (mut raw_tx, mut raw_rx) = (channel(&a, 2), channel(&b, 2));
    let offer = JsFuture::from(a.create_offer()).await.expect("offer");
    let offer = local(&a, offer, RtcSdpType::Offer).await;
    remote(&b, RtcSdpType::Offer, &offer).await;
    let answer = JsFuture::from(b.create_answer()).await.expect("answer");
    let answer = local(&b, answer, RtcSdpType::Answer).await;
    remote(&a, RtcSdpType::Answer, &answer).await;

    let pattern = |i: usize| (i.wrapping_mul(31) ^ (i >> 13)) as u8;
    let data: Vec<u8> = (0..BYTES).map(pattern).collect();
    let clock = web_sys::window()
        .expect("window")
        .performance()
        .expect("performance");
    // Warm-up: SCTP's congestion window opens on the connection's first megabytes.
    raw(&mut raw_tx, &mut raw_rx, &data[..4 << 20]).await;
    let started = clock.now();
    let send = async {
        // Writes of 64 KiB, each cut into the spec's 16 KiB messages.
        for chunk in data.chunks(64 << 10) {
            sender.write_all(chunk).await.expect("write");
        }
        sender.close().await.expect("close (FIN, FIN_ACK)");
    };
    let receive = async {
        let mut got = Vec::with_capacity(BYTES);
        receiver.read_to_end(&mut got).await.expect("read to FIN");
        got
    };
    let ((), got) = futures::join!(send, receive);
    let secs = (clock.now() - started) / 1e3;
    let started = clock.now();
    raw(&mut raw_tx, &mut raw_rx, &data).await;
    let raw_secs = (clock.now() - started) / 1e3;
    assert_eq!(got.len(), BYTES, "every byte");
    assert!(got == data, "in order and unchanged");
    let mib = (BYTES >> 20) as f64;
    console_log!(
        "one data channel: {mib} MiB as a libp2p stream in {secs:.2} s = {:.1} MiB/s; as raw \
         16 KiB messages in {raw_secs:.2} s = {:.1} MiB/s",
        mib / secs,
        mib / raw_secs
    );
    a.close();
    b.close();
}
