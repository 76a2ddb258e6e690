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
use swarmtrain_relay::{Relay, digits_run};
use swarmtrain_shared::Identity;
use swarmtrain_shared::protocol::{self, ClientToRelay, MAX_FRAME_BYTES, Part, Request};
use swarmtrain_tests::{
    digits_join, init_logging, metrics, relay_config, rss_kib, spawn_peer, spawn_peers_together,
    start_pow_relay, start_relay,
};

const ROUNDS: u64 = 4;

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
    let mut run = digits_run();
    run.quorum = 3;
    run.inner.steps = 20;
    let relay = start_pow_relay(run).await;
    let before = rss_kib();
    // Together: with the quorum capped at the joined peers, a first peer alone could close
    // round 0 before the others join, and their round-0 updates would come too late.
    let honest = spawn_peers_together(&relay, 1..=3, ROUNDS, 3);
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

/// A connection as `seed` on which the relay has answered `first` (whatever the answer): a
/// dial the relay refuses (its limit on handshakes in progress) is made again, as an attacker
/// would.
async fn answered(relay: &Relay, seed: [u8; 32], first: ClientToRelay) -> RelayClient {
    for _ in 0..20 {
        let client = dial(relay, seed);
        if client.send(first.clone(), Vec::new()).await.is_ok() {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the relay never answered {seed:?}");
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
async fn a_thousand_throwaway_peer_ids_neither_stop_starve_nor_strike_honest_peers() {
    init_logging();
    let mut run = digits_run();
    run.quorum = 4;
    run.inner.steps = 10;
    let deadline = Duration::from_millis(run.round_deadline_ms);
    let relay = Relay::start(swarmtrain_relay::RelayConfig {
        // The flood comes from one address: the per-address limit is tested on its own.
        connections_per_ip: 4096,
        // Smaller than the 400 quiet messages (8 KiB each) take.
        reassembly_budget: 2 << 20,
        ..relay_config(vec![run])
    })
    .await
    .expect("relay starts");
    let round = relay.coordinator.status().await.round;
    let poll = move || ClientToRelay::AwaitRound {
        run_id: "digits".into(),
        after: Some(round),
    };
    let mut flood = Vec::new();
    // 600 identities that never join, 8 long polls each; 50 dialing at once (the relay takes
    // at most 512 handshakes at a time, and an attacker whose dials are refused dials again).
    for batch in (0..600).collect::<Vec<u32>>().chunks(50) {
        let clients = futures::future::join_all(
            batch
                .iter()
                .map(|&i| answered(&relay, throwaway(i), poll())),
        )
        .await;
        for client in clients {
            for _ in 0..7 {
                flood.push(tokio::spawn(send_unawaited(client.clone(), poll())));
            }
        }
    }
    // 400 that join, park two polls (one each stays) and keep a long message unfinished: its
    // first part again every 2 s, for as long as the test runs.
    let largest = relay.runs.max_submission_bytes();
    for batch in (600..1000).collect::<Vec<u32>>().chunks(50) {
        let clients = futures::future::join_all(
            batch
                .iter()
                .map(|&i| answered(&relay, throwaway(i), join(None))),
        )
        .await;
        for (&i, client) in batch.iter().zip(clients) {
            for _ in 0..2 {
                flood.push(tokio::spawn(send_unawaited(client.clone(), poll())));
            }
            let part = Part {
                digest: [i as u8; 32],
                total: largest as u32,
                offset: 0,
                bytes: vec![0; MAX_FRAME_BYTES - 256],
            };
            let frame = protocol::encode(&Request::Part(part)).expect("encode");
            flood.push(tokio::spawn(async move {
                loop {
                    let _ = client.request_frame(frame.clone()).await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }));
        }
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
    let hostile = swarmtrain_shared::protocol::RefusalKind::ALL
        .iter()
        .filter(|k| k.is_hostile())
        .map(|k| k.as_str());
    for kind in hostile {
        assert_eq!(
            status.rejected.get(kind),
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

/// One address holds at most `connections_per_ip` libp2p connections at once: the rest are
/// refused at the handshake, counted in `/metrics`, and the connections it holds are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_connections() {
    init_logging();
    let relay = Relay::start(swarmtrain_relay::RelayConfig {
        connections_per_ip: 3,
        ..relay_config(vec![digits_run()])
    })
    .await
    .expect("relay starts");
    let mut clients = Vec::new();
    let mut welcomed = 0;
    for i in 0..5 {
        let client = dial(&relay, throwaway(5000 + i));
        let answer =
            tokio::time::timeout(Duration::from_secs(10), client.send(join(None), Vec::new()))
                .await;
        if let Ok(Ok(protocol::RelayToClient::Welcome(_))) = answer {
            welcomed += 1;
        }
        // Kept open, so that each holds its connection.
        clients.push(client);
    }
    assert_eq!(
        welcomed, 3,
        "three connections from 127.0.0.1, the rest refused"
    );
    let metrics = metrics(&relay).await;
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("swarmtrain_connections_refused_total "))
        .and_then(|n| n.parse().ok())
        .expect("the refusal metric");
    assert!(refused >= 2, "{metrics}");
    relay.shutdown().await;
}

/// `message` signed by `identity` for the connection of `client` (whose own libp2p key may
/// belong to another identity), with sequence number `seq`, as raw request bytes.
fn signed_for(
    client: &RelayClient,
    identity: &Identity,
    seq: u64,
    message: ClientToRelay,
) -> Vec<u8> {
    let envelope = protocol::Envelope {
        peer_id: client.peer_id().to_bytes(),
        seq,
        expires_ms: swarmtrain_relay::runs::unix_ms() + protocol::ENVELOPE_VALIDITY_MS,
        message,
    };
    let submission = protocol::Submission {
        signed: identity.sign(&envelope).expect("sign"),
        payload: Vec::new(),
    };
    protocol::encode(&Request::Submit(submission)).expect("encode")
}

/// The refusal kind of an answer (None: not a refusal; "closed": the connection was closed).
async fn refusal(client: &RelayClient, frame: Vec<u8>) -> Option<String> {
    let Ok(answer) = client.request_frame(frame).await else {
        return Some("closed".into());
    };
    match protocol::decode(&answer).expect("decodes") {
        protocol::RelayToClient::Rejected { kind, .. } => Some(kind),
        _ => None,
    }
}

/// One identity signs on at most four peer IDs at once (a fifth is `identity_busy`), and the
/// strikes of any of them ban the identity on all: a new peer ID does not bring fresh strikes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_and_bans_follow_the_identity_not_the_peer_id() {
    init_logging();
    let relay = start_relay(digits_run()).await;
    let identity = Identity::from_seed([70; 32]);
    let clients: Vec<_> = (0..5).map(|k| dial(&relay, throwaway(6000 + k))).collect();
    for (k, client) in clients.iter().enumerate() {
        // (The replay window is the identity's: each message its own sequence number.)
        let kind = refusal(
            client,
            signed_for(client, &identity, k as u64 + 1, join(None)),
        )
        .await;
        if k < swarmtrain_relay::runs::MAX_PEER_IDS_PER_IDENTITY {
            assert_eq!(kind, None, "peer ID {k} joins as the identity");
        } else {
            assert_eq!(kind.as_deref(), Some("identity_busy"), "a fifth peer ID");
        }
    }
    // Strikes on the first peer ID (the same verified message again: `replayed`) until the
    // relay closes it and bans the identity.
    let poll = ClientToRelay::AwaitRound {
        run_id: "digits".into(),
        after: Some(u64::MAX / 2),
    };
    let frame = signed_for(&clients[0], &identity, 10, poll.clone());
    for _ in 0..=swarmtrain_relay::runs::MAX_STRIKES {
        if clients[0].request_frame(frame.clone()).await.is_err() {
            break;
        }
    }
    assert_eq!(relay.runs.closed_for_strikes(), 1);
    // The ban is the identity's: its other connections are closed with it, and a new peer ID
    // signing as it is refused.
    let kind = refusal(
        &clients[1],
        signed_for(&clients[1], &identity, 11, poll.clone()),
    )
    .await;
    assert_eq!(kind.as_deref(), Some("closed"));
    let fresh = dial(&relay, throwaway(6100));
    let kind = refusal(&fresh, signed_for(&fresh, &identity, 12, poll)).await;
    assert_eq!(kind.as_deref(), Some("banned"));
    relay.shutdown().await;
}

/// "Joined" is per run: an identity that joined an open run is not thereby let into a
/// proof-of-work run on the same relay (`not_joined` there until it joins with a solution).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_an_open_run_does_not_admit_to_another() {
    init_logging();
    let open = digits_run();
    let mut guarded = open.clone();
    guarded.run_id = "digits-pow".into();
    let relay = Relay::start(swarmtrain_relay::RelayConfig {
        admission: [(
            "digits-pow".to_owned(),
            swarmtrain_shared::admission::Admission::ProofOfWork { bits: 20 },
        )]
        .into(),
        ..relay_config(vec![open, guarded])
    })
    .await
    .expect("relay starts");
    let identity = Identity::from_seed([71; 32]);
    let client = dial(&relay, [71; 32]);
    assert_eq!(
        refusal(&client, signed_for(&client, &identity, 1, join(None))).await,
        None
    );
    let poll = |run: &str| ClientToRelay::AwaitRound {
        run_id: run.into(),
        after: Some(u64::MAX / 2),
    };
    assert_eq!(
        refusal(
            &client,
            signed_for(&client, &identity, 2, poll("digits-pow"))
        )
        .await
        .as_deref(),
        Some("not_joined")
    );
    let mut pow_join = digits_join("adversary", None);
    if let ClientToRelay::Join(join) = &mut pow_join {
        join.run_id = "digits-pow".into();
    }
    assert_eq!(
        refusal(&client, signed_for(&client, &identity, 3, pow_join))
            .await
            .as_deref(),
        Some("not_admitted")
    );
    // The open run still answers it.
    assert_eq!(
        refusal(&client, signed_for(&client, &identity, 4, poll("digits"))).await,
        None
    );
    relay.shutdown().await;
}
