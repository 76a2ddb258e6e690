//! A peer learns who it talks to (identify: agent and protocols) and how far away it is (ping).

use std::time::{Duration, Instant};

use swarmtrain_relay::digits_run;
use swarmtrain_shared::protocol::RPC_PROTOCOL;
use swarmtrain_tests::{init_logging, join_raw, start_relay};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sees_the_relay_through_identify_and_ping() {
    init_logging();
    let relay = start_relay(digits_run()).await;
    let (client, _, _, _) = join_raw(&relay, [5; 32]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = loop {
        let info = client.relay_info();
        if info.agent.is_some() && info.rtt.is_some() {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "no identify or ping from the relay: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let agent = info.agent.expect("agent");
    assert!(agent.starts_with("swarmtrain-relay/"), "{agent}");
    assert!(
        info.protocols.iter().any(|p| p == RPC_PROTOCOL),
        "{:?}",
        info.protocols
    );
    assert!(
        info.protocols.iter().any(|p| p == "/ipfs/ping/1.0.0"),
        "{:?}",
        info.protocols
    );
    let rtt = info.rtt.expect("rtt");
    assert!(rtt < Duration::from_secs(5), "loopback round trip {rtt:?}");
    println!("relay {agent}, rtt {rtt:?}, protocols {:?}", info.protocols);
    relay.shutdown().await;
}
