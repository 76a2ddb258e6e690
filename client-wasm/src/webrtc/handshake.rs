//! The SDP offer/answer and ICE trickle of one browser-to-browser connection, over a
//! `/webrtc-signaling/0.0.1` stream (libp2p/specs `webrtc/webrtc.md`): the dialer creates an
//! `init` data channel so that its offer carries ICE, sends the offer, reads the answer; both
//! send their ICE candidates as `RTCIceCandidate.toJSON()` strings as they are found and add
//! the other's until the peer connection is `connected`; then the dialer closes `init` and both
//! close the signaling stream. No Noise runs over the result: the DTLS fingerprints in the SDP
//! came over the relayed connection, which Noise authenticated.

use std::time::Duration;

use futures::channel::mpsc;
use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt, StreamExt};
use futures_timer::Delay;
use js_sys::{JSON, Reflect};
use libp2p::swarm::Stream;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    RtcConfiguration, RtcIceCandidateInit, RtcIceServer, RtcPeerConnection,
    RtcPeerConnectionIceEvent, RtcPeerConnectionState, RtcSdpType, RtcSessionDescriptionInit,
};

use super::connection::Connection;
use super::message::{MAX_SIGNALING, Signal, SignalType, take_prefixed};
use super::{IceServer, LinkPath};

/// How long a connection may take from the first signaling message to `connected`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

fn js(what: &str, e: JsValue) -> String {
    format!(
        "{what}: {}",
        e.as_string().unwrap_or_else(|| format!("{e:?}"))
    )
}

/// A new peer connection with the configured STUN/TURN servers (none: host candidates only).
pub fn peer_connection(ice: &[IceServer]) -> Result<RtcPeerConnection, String> {
    let config = RtcConfiguration::new();
    let servers = js_sys::Array::new();
    for server in ice {
        let s = RtcIceServer::new();
        let urls = js_sys::Array::new();
        for url in &server.urls {
            urls.push(&JsValue::from_str(url));
        }
        s.set_urls(&urls);
        if let Some(username) = &server.username {
            s.set_username(username);
        }
        if let Some(credential) = &server.credential {
            s.set_credential(credential);
        }
        servers.push(&s);
    }
    config.set_ice_servers(&servers);
    RtcPeerConnection::new_with_configuration(&config).map_err(|e| js("RTCPeerConnection", e))
}

/// Reading half of the signaling stream.
struct Reader {
    read: ReadHalf<Stream>,
    buffer: Vec<u8>,
}

/// Writing half of the signaling stream.
struct Writer {
    write: WriteHalf<Stream>,
}

fn signals(stream: Stream) -> (Reader, Writer) {
    let (read, write) = stream.split();
    (
        Reader {
            read,
            buffer: Vec::new(),
        },
        Writer { write },
    )
}

impl Writer {
    async fn send(&mut self, kind: SignalType, data: &str) -> Result<(), String> {
        self.write
            .write_all(&Signal::new(kind, data).encode())
            .await
            .map_err(|e| format!("sending a signaling message: {e}"))?;
        self.write
            .flush()
            .await
            .map_err(|e| format!("sending a signaling message: {e}"))
    }
}

impl Reader {
    /// The next message, `None` when the remote closed the stream. Safe to drop unfinished:
    /// bytes read go into `buffer` before the next await.
    async fn next(&mut self) -> Result<Option<Signal>, String> {
        loop {
            if let Some(body) =
                take_prefixed(&mut self.buffer, MAX_SIGNALING).map_err(|e| e.to_string())?
            {
                return Signal::decode(&body).map(Some).map_err(|e| e.to_string());
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .read
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the signaling stream: {e}"))?;
            if n == 0 {
                return Ok(None);
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    /// The data of the next message, which must be of `kind`.
    async fn expect(&mut self, kind: SignalType) -> Result<String, String> {
        match self.next().await? {
            Some(Signal {
                kind: Some(k),
                data,
            }) if k == kind => Ok(data),
            other => Err(format!("expected {kind:?}, got {other:?}")),
        }
    }
}

/// Callbacks of one peer connection, as channels.
struct Watch {
    candidates: mpsc::Receiver<String>,
    states: mpsc::Receiver<RtcPeerConnectionState>,
    _on_candidate: Closure<dyn FnMut(RtcPeerConnectionIceEvent)>,
    _on_state: Closure<dyn FnMut(web_sys::Event)>,
    pc: RtcPeerConnection,
}

impl Watch {
    fn new(pc: &RtcPeerConnection) -> Self {
        // A browser gathers a handful of candidates per network interface.
        let (mut candidate_tx, candidates) = mpsc::channel(64);
        let (mut state_tx, states) = mpsc::channel(16);
        let on_candidate = Closure::new(move |event: RtcPeerConnectionIceEvent| {
            // No candidate, or an empty one, ends a generation of candidates: nothing to send.
            let Some(candidate) = event.candidate() else {
                return;
            };
            if candidate.candidate().is_empty() {
                return;
            }
            if let Ok(json) = JSON::stringify(&candidate.to_json())
                && candidate_tx.try_send(String::from(json)).is_err()
            {
                tracing::debug!("more local ICE candidates than we send: one dropped");
            }
        });
        let on_state = {
            let pc = pc.clone();
            Closure::new(move |_: web_sys::Event| {
                let _ = state_tx.try_send(pc.connection_state());
            })
        };
        pc.set_onicecandidate(Some(on_candidate.as_ref().unchecked_ref()));
        pc.set_onconnectionstatechange(Some(on_state.as_ref().unchecked_ref()));
        Self {
            candidates,
            states,
            _on_candidate: on_candidate,
            _on_state: on_state,
            pc: pc.clone(),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.pc.set_onicecandidate(None);
        self.pc.set_onconnectionstatechange(None);
    }
}

async fn add_candidate(pc: &RtcPeerConnection, json: &str) {
    let Ok(value) = JSON::parse(json) else {
        tracing::debug!("an ICE candidate that is not JSON");
        return;
    };
    // `null` or `""` ends the remote's candidates.
    if value.is_null() || value.as_string().is_some() {
        return;
    }
    let init: RtcIceCandidateInit = value.unchecked_into();
    let promise = pc.add_ice_candidate_with_opt_rtc_ice_candidate_init(Some(&init));
    if let Err(e) = JsFuture::from(promise).await {
        tracing::debug!(
            "a remote ICE candidate was refused: {}",
            js("addIceCandidate", e)
        );
    }
}

/// Sends our candidates and adds the remote's until the connection is `connected`.
async fn trickle(
    pc: &RtcPeerConnection,
    reader: &mut Reader,
    writer: &mut Writer,
    watch: &mut Watch,
) -> Result<(), String> {
    let mut remote_open = true;
    let mut timeout = Delay::new(HANDSHAKE_TIMEOUT).fuse();
    loop {
        if pc.connection_state() == RtcPeerConnectionState::Connected {
            return Ok(());
        }
        let (open, reader) = (remote_open, &mut *reader);
        let read = async move {
            if open {
                reader.next().await
            } else {
                futures::future::pending().await
            }
        }
        .fuse();
        futures::pin_mut!(read);
        futures::select_biased! {
            state = watch.states.select_next_some() => match state {
                RtcPeerConnectionState::Connected => return Ok(()),
                RtcPeerConnectionState::Failed | RtcPeerConnectionState::Closed => {
                    return Err(format!("the peer connection {state:?} during the handshake"));
                }
                _ => {}
            },
            candidate = watch.candidates.select_next_some() => {
                // Once the remote closed its side it no longer reads, but writing is harmless.
                if let Err(e) = writer.send(SignalType::IceCandidate, &candidate).await {
                    tracing::debug!("{e}");
                }
            },
            message = read => match message {
                Ok(Some(Signal { kind: Some(SignalType::IceCandidate), data })) => add_candidate(pc, &data).await,
                Ok(Some(other)) => return Err(format!("expected an ICE candidate, got {:?}", other.kind)),
                // The remote is connected and closed the stream (or dropped the relayed
                // connection): our side connects on its own.
                Ok(None) | Err(_) => remote_open = false,
            },
            _ = timeout => return Err(format!("not connected within {HANDSHAKE_TIMEOUT:?}")),
        }
    }
}

async fn description(
    pc: &RtcPeerConnection,
    kind: RtcSdpType,
    sdp: &str,
    local: bool,
) -> Result<(), String> {
    let init = RtcSessionDescriptionInit::new(kind);
    init.set_sdp(sdp);
    let promise = if local {
        pc.set_local_description(&init)
    } else {
        pc.set_remote_description(&init)
    };
    JsFuture::from(promise)
        .await
        .map(|_| ())
        .map_err(|e| js("setting a session description", e))
}

fn sdp_of(value: &JsValue) -> Result<String, String> {
    Reflect::get(value, &"sdp".into())
        .ok()
        .and_then(|v| v.as_string())
        .ok_or_else(|| "a session description without SDP".to_owned())
}

/// The candidate pair `pc` selected, from `getStats`: the transport's `selectedCandidatePairId`
/// (Chromium), else the nominated pair that succeeded. None when the stats do not say.
pub async fn selected_path(pc: &RtcPeerConnection) -> Option<LinkPath> {
    let report = JsFuture::from(pc.get_stats()).await.ok()?;
    let values = Reflect::get(&report, &"values".into())
        .ok()?
        .dyn_into::<js_sys::Function>()
        .ok()?
        .call0(&report)
        .ok()?;
    let field = |v: &JsValue, name: &str| Reflect::get(v, &name.into()).ok();
    let text = |v: &JsValue, name: &str| field(v, name).and_then(|f| f.as_string());
    let mut stats = std::collections::HashMap::new();
    let mut selected = None;
    let mut nominated = None;
    for value in js_sys::try_iter(&values).ok()??.flatten() {
        let (Some(id), Some(kind)) = (text(&value, "id"), text(&value, "type")) else {
            continue;
        };
        match kind.as_str() {
            "transport" => selected = selected.or_else(|| text(&value, "selectedCandidatePairId")),
            "candidate-pair"
                if field(&value, "nominated").and_then(|v| v.as_bool()) == Some(true)
                    && text(&value, "state").as_deref() == Some("succeeded") =>
            {
                nominated = nominated.or(Some(id.clone()));
            }
            _ => {}
        }
        stats.insert(id, value);
    }
    let pair = stats.get(&selected.or(nominated)?)?;
    let candidate = |key: &str| stats.get(&text(pair, key)?);
    let (local, remote) = (
        candidate("localCandidateId")?,
        candidate("remoteCandidateId")?,
    );
    let address = |c: &JsValue| {
        let ip = text(c, "address")
            .or_else(|| text(c, "ip"))
            .unwrap_or_default();
        let port = field(c, "port").and_then(|p| p.as_f64()).unwrap_or(0.0);
        format!("{ip}:{port}")
    };
    Some(LinkPath {
        local: text(local, "candidateType")?,
        remote: text(remote, "candidateType")?,
        local_address: address(local),
        remote_address: address(remote),
        protocol: text(local, "protocol").unwrap_or_default(),
    })
}

/// The dialer's side: returns the connection once connected.
pub async fn dial(stream: Stream, ice: &[IceServer]) -> Result<Connection, String> {
    let pc = peer_connection(ice)?;
    let connection = Connection::new(pc.clone());
    let steps = async {
        let mut watch = Watch::new(&pc);
        let (mut reader, mut writer) = signals(stream);
        let init = pc.create_data_channel("init");
        let offer = JsFuture::from(pc.create_offer())
            .await
            .map_err(|e| js("createOffer", e))?;
        let sdp = sdp_of(&offer)?;
        writer.send(SignalType::SdpOffer, &sdp).await?;
        description(&pc, RtcSdpType::Offer, &sdp, true).await?;
        let answer = reader.expect(SignalType::SdpAnswer).await?;
        description(&pc, RtcSdpType::Answer, &answer, false).await?;
        trickle(&pc, &mut reader, &mut writer, &mut watch).await?;
        init.close();
        let _ = writer.write.close().await;
        Ok(())
    };
    or_close(&pc, steps).await?;
    Ok(connection.established())
}

/// The listener's side: returns the connection once connected.
pub async fn answer(stream: Stream, ice: &[IceServer]) -> Result<Connection, String> {
    let pc = peer_connection(ice)?;
    let connection = Connection::new(pc.clone());
    let steps = async {
        let mut watch = Watch::new(&pc);
        let (mut reader, mut writer) = signals(stream);
        let offer = reader.expect(SignalType::SdpOffer).await?;
        description(&pc, RtcSdpType::Offer, &offer, false).await?;
        let answer = JsFuture::from(pc.create_answer())
            .await
            .map_err(|e| js("createAnswer", e))?;
        let sdp = sdp_of(&answer)?;
        writer.send(SignalType::SdpAnswer, &sdp).await?;
        description(&pc, RtcSdpType::Answer, &sdp, true).await?;
        trickle(&pc, &mut reader, &mut writer, &mut watch).await?;
        let _ = writer.write.close().await;
        Ok(())
    };
    or_close(&pc, steps).await?;
    Ok(connection.established())
}

/// Runs a handshake's `steps` on `pc`, closing it if they fail.
async fn or_close(
    pc: &RtcPeerConnection,
    steps: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    let result = steps.await;
    if result.is_err() {
        pc.close();
    }
    result
}
