//! Hostile connections against a live run, in one process: while three honest peers train a
//! proof-of-work run, attackers mint identities without solving the puzzle, impersonate an
//! honest peer, replay, forge, truncate and oversize messages, flood parts from connections
//! that never signed anything and long polls from one that did. The honest peers finish every
//! round with every update accepted, the relay's memory stays bounded, and each refusal is
//! counted by its reason.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use swarmtrain_client::peer::PeerEvent;
use swarmtrain_client::rpc::RelayClient;
use swarmtrain_relay::{Relay, default_run};
use swarmtrain_shared::Identity;
use swarmtrain_shared::protocol::{self, ClientToRelay, MAX_FRAME_BYTES, Part, Request};
use swarmtrain_tests::{digits_join, init_logging, spawn_peer, start_pow_relay};

const ROUNDS: u64 = 4;

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn join(proof_of_work: Option<u64>) -> ClientToRelay {
    digits_join("adversary", proof_of_work)
}

fn dial(relay: &Relay, seed: [u8; 32]) -> RelayClient {
    let address = relay.bootstrap.addresses["tcp"][0]
        .parse()
        .expect("multiaddr");
    RelayClient::connect(address, &Identity::from_seed(seed)).expect("dial")
}

/// One wave of every attack; returns how many requests it sent.
async fn attack(relay: &Relay, wave: u8) -> usize {
    let mut sent = 0;
    // Minted identities without the puzzle's solution: not admitted.
    for i in 0..8u8 {
        let client = dial(
            relay,
            [
                100 + wave,
                i,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                1,
            ],
        );
        let _ = client.send(join(None), Vec::new()).await;
        let _ = client.send(join(Some(u64::from(i))), Vec::new()).await;
        sent += 2;
        // Parts from a connection that has not signed anything are not buffered.
        let part = Part {
            digest: [i; 32],
            total: 60 << 20,
            offset: 0,
            bytes: vec![0; 7 * 1024],
        };
        let _ = client
            .request_frame(protocol::encode(&Request::Part(part)).expect("encode"))
            .await;
        sent += 1;
    }
    // Impersonation: honest peer 1's public key on a message the attacker signed.
    let client = dial(
        relay,
        [
            200, wave, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 2,
        ],
    );
    let honest = Identity::from_seed([1; 32]);
    let attacker = Identity::from_seed([
        200, wave, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 2,
    ]);
    let mut forged = attacker.sign(&client.envelope(join(None))).expect("sign");
    forged.public_key = honest.public_key().to_vec();
    let _ = client
        .submit(&protocol::Submission {
            signed: forged,
            payload: Vec::new(),
        })
        .await;
    // Replays of a message the relay has seen, truncated and oversized frames.
    let poll = protocol::Submission {
        signed: attacker
            .sign(&client.envelope(ClientToRelay::AwaitRound {
                run_id: "digits".into(),
                after: None,
            }))
            .expect("sign"),
        payload: Vec::new(),
    };
    for _ in 0..3 {
        let _ = client.submit(&poll).await;
    }
    let frame = protocol::encode(&Request::Submit(poll)).expect("encode");
    let _ = client
        .request_frame(frame[..frame.len() / 3].to_vec())
        .await;
    let _ = client.request_frame(vec![7; MAX_FRAME_BYTES + 1]).await;
    sent += 6;
    // A long-poll flood from one connection: past 8 in flight each is refused at once (the
    // parked ones are left to the relay's own timeout).
    let after = Some(relay.coordinator.status().await.round);
    let mut polls: FuturesUnordered<_> = (0..12)
        .map(|_| {
            client.send(
                ClientToRelay::AwaitRound {
                    run_id: "digits".into(),
                    after,
                },
                Vec::new(),
            )
        })
        .collect();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while polls.next().await.is_some() {}
    })
    .await;
    sent + 12
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_peers_finish_their_rounds_while_hostile_connections_attack() {
    init_logging();
    let mut run = default_run();
    run.quorum = 3;
    run.inner.steps = 20;
    let relay = start_pow_relay(run).await;
    let before = rss_kib();
    let honest: Vec<_> = (1..=3).map(|id| spawn_peer(&relay, id, ROUNDS)).collect();
    let attacks = async {
        let mut sent = 0;
        for wave in 0..4 {
            sent += attack(&relay, wave).await;
        }
        sent
    };
    let finish = async {
        let mut all = Vec::new();
        for peer in honest {
            all.push(peer.finish().await);
        }
        all
    };
    let (sent, finished) = tokio::time::timeout(
        Duration::from_secs(300),
        futures::future::join(attacks, finish),
    )
    .await
    .expect("the run finishes under attack");
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    for (trained, events) in &finished {
        assert_eq!(*trained, ROUNDS);
        let submitted: Vec<bool> = events
            .iter()
            .filter_map(|e| match e {
                PeerEvent::Submitted { accepted, .. } => Some(*accepted),
                _ => None,
            })
            .collect();
        assert_eq!(submitted, vec![true; ROUNDS as usize], "{events:?}");
    }
    let status = relay.coordinator.status().await;
    println!(
        "{sent} hostile requests; honest peers trained {ROUNDS} rounds each, all accepted; \
         memory grew {grown_mib} MiB; refusals {:?}",
        status.rejected
    );
    for kind in [
        "not_admitted",
        "unbound_part",
        "bad_signature",
        "replayed",
        "malformed",
        "peer_busy",
    ] {
        assert!(
            status.rejected.get(kind).copied().unwrap_or(0) >= 4,
            "{kind} counted in every wave: {:?}",
            status.rejected
        );
    }
    // The bound: the reassembly budget (256 MiB) is the most a peer can make the relay hold, and
    // no connection here could even start a message.
    assert!(grown_mib < 256, "memory grew {grown_mib} MiB");
    relay.shutdown().await;
}
