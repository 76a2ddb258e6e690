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
    // A long-poll flood from one connection that never joined: each is refused at once.
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
        assert_all_accepted(events);
    }
    let status = relay.coordinator.status().await;
    println!(
        "{sent} hostile requests; honest peers trained {ROUNDS} rounds each, all accepted; \
         memory grew {grown_mib} MiB; refusals {:?}",
        status.rejected
    );
    // Each is refused before any signature check: joins without the puzzle's solution (the
    // impersonation too: the honest key it claims has no proof with it) as `not_admitted`, and
    // every poll and replay from an identity that never joined as `not_joined`.
    for kind in ["not_admitted", "unbound_part", "not_joined", "malformed"] {
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

/// Every update the peer sent, one a round, was accepted.
fn assert_all_accepted(events: &[PeerEvent]) {
    let submitted: Vec<bool> = events
        .iter()
        .filter_map(|e| match e {
            PeerEvent::Submitted { accepted, .. } => Some(*accepted),
            _ => None,
        })
        .collect();
    assert_eq!(submitted, vec![true; ROUNDS as usize], "{events:?}");
}

/// Throwaway identities: every one a fresh key, so a fresh libp2p peer ID.
fn throwaway(i: u32) -> [u8; 32] {
    let mut seed = [0u8; 32];
    seed[..4].copy_from_slice(&i.to_le_bytes());
    seed[31] = 0xee;
    seed
}

/// Signs `message` as `client`'s identity and sends it, without waiting for the answer to
/// come back before the next is sent (the caller keeps the futures).
async fn send_unawaited(client: RelayClient, message: ClientToRelay) {
    let _ = client.send(message, Vec::new()).await;
}

/// One host with a thousand throwaway peer IDs against an open run (the cheapest run to
/// attack: joining costs nothing). 600 identities that never join each park 8 long polls (on
/// the relay before round two, 512 such keys took every one of its 4,096 request slots, and
/// the polls counted as active peers); 400 join and park a poll each (a second one replaces
/// the first) and each starts a long message of the largest size the relay takes and goes
/// quiet, more than the reassembly budget holds. Meanwhile three honest peers train and a
/// fourth, brand new, joins: every honest update is accepted, the new peer's first one within
/// the round deadline, and nothing is counted as a strike (a full relay is `relay_busy`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "unfinished: past about 600 clients in this process the later dials fail \
            (\"Failed to dial the requested peer\"), so the joined half of the flood never takes \
            hold; the honest half passes"]
async fn a_thousand_throwaway_peer_ids_neither_stop_starve_nor_strike_honest_peers() {
    init_logging();
    let mut run = default_run();
    run.quorum = 4;
    run.inner.steps = 10;
    let deadline = Duration::from_millis(run.round_deadline_ms);
    let relay = Relay::start(swarmtrain_relay::RelayConfig {
        http: "127.0.0.1:0".parse().expect("addr"),
        web_dir: swarmtrain_tests::package_path("../web"),
        runs: vec![run],
        // The flood comes from one address: the per-address limit is tested on its own.
        connections_per_ip: 4096,
        // Smaller than the 400 quiet messages (8 KiB each) take.
        reassembly_budget: 2 << 20,
        ..Default::default()
    })
    .await
    .expect("relay starts");
    let round = relay.coordinator.status().await.round;
    let mut flood = Vec::new();
    // 600 identities that never join, 8 long polls each.
    for i in 0..600 {
        let client = dial(&relay, throwaway(i));
        for _ in 0..8 {
            let poll = ClientToRelay::AwaitRound {
                run_id: "digits".into(),
                after: Some(round),
            };
            flood.push(tokio::spawn(send_unawaited(client.clone(), poll)));
        }
    }
    // 400 that join, park two polls (one each stays) and keep a long message unfinished: its
    // first part again every 2 s, for as long as the test runs.
    let largest = relay.runs.max_submission_bytes();
    for i in 600..1000u32 {
        let client = dial(&relay, throwaway(i));
        flood.push(tokio::spawn(async move {
            for _ in 0..40 {
                match client.send(join(None), Vec::new()).await {
                    Ok(protocol::RelayToClient::Welcome(_)) => break,
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            for _ in 0..2 {
                let poll = ClientToRelay::AwaitRound {
                    run_id: "digits".into(),
                    after: Some(round),
                };
                tokio::spawn(send_unawaited(client.clone(), poll));
            }
            let part = Part {
                digest: [i as u8; 32],
                total: largest as u32,
                offset: 0,
                bytes: vec![0; MAX_FRAME_BYTES - 256],
            };
            let frame = protocol::encode(&Request::Part(part)).expect("encode");
            loop {
                let _ = client.request_frame(frame.clone()).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }));
    }
    for _ in 0..240 {
        if relay.coordinator.status().await.joined_peers >= 400 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = relay.coordinator.status().await;
    println!(
        "flood in place: {} joined, refusals {:?}",
        status.joined_peers, status.rejected
    );
    let honest: Vec<_> = (1..=3).map(|id| spawn_peer(&relay, id, ROUNDS)).collect();
    // The newcomer joins into the flood and must have an update accepted within a deadline.
    let started = std::time::Instant::now();
    let mut newcomer = spawn_peer(&relay, 4, ROUNDS);
    let mut newcomer_events = Vec::new();
    let first_accepted = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(event) = newcomer.events.recv().await {
            let accepted = matches!(event, PeerEvent::Submitted { accepted: true, .. });
            newcomer_events.push(event);
            if accepted {
                return started.elapsed();
            }
        }
        panic!("the newcomer stopped: {newcomer_events:?}");
    })
    .await
    .expect("the newcomer's update is accepted");
    let mut finished = Vec::new();
    for peer in honest {
        finished.push(
            tokio::time::timeout(Duration::from_secs(300), peer.finish())
                .await
                .expect("honest peers finish"),
        );
    }
    let (trained, rest) = tokio::time::timeout(Duration::from_secs(300), newcomer.finish())
        .await
        .expect("the newcomer finishes");
    newcomer_events.extend(rest);
    finished.push((trained, newcomer_events));
    for (trained, events) in &finished {
        assert_eq!(*trained, ROUNDS, "{events:?}");
        assert_all_accepted(events);
    }
    let status = relay.coordinator.status().await;
    println!(
        "newcomer's first accepted update after {first_accepted:?} (deadline {deadline:?}); \
         refusals {:?}; connections closed for strikes: {}",
        status.rejected,
        relay.runs.closed_for_strikes()
    );
    assert!(first_accepted < deadline, "{first_accepted:?}");
    assert_eq!(relay.runs.closed_for_strikes(), 0);
    for kind in swarmtrain_relay::runs::HOSTILE_KINDS {
        assert_eq!(
            status.rejected.get(*kind),
            None,
            "{kind}: {:?}",
            status.rejected
        );
    }
    assert!(
        status.rejected.get("not_joined").copied().unwrap_or(0) >= 4000,
        "{:?}",
        status.rejected
    );
    for task in flood {
        task.abort();
    }
    relay.shutdown().await;
}
