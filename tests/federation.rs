//! A federation on loopback, each relay its own process: a root relay and two edge relays
//! (`serve --upstream <root>`), peers joined to the edges. Rounds close at the root with the
//! updates of both edges; θ is bit for bit what a lone relay computes from the same updates;
//! credits add up at the root; a peer that moves to the other edge cannot count its update
//! twice; a root killed mid-round and started again loses no accepted update; a killed edge's
//! peer goes on through the other edge; a hostile edge cannot forge, alter or replay what it
//! forwards. With a PostgreSQL server of the test's own (`--ledger-url`), the relays keep one
//! shared ledger that loses no row when the database goes down or an edge is killed, over TLS
//! where the server demands it.

use std::time::{Duration, Instant};

use swarmtrain_client::PeerConfig;
use swarmtrain_client::peer::PeerEvent;
use swarmtrain_client::rpc::RelayClient;
use swarmtrain_shared::PeerKey;
use swarmtrain_shared::protocol::{
    self, ClientToRelay, Codec, RelayToClient, Role, RoundAnnouncement, Submission, Welcome,
};
use swarmtrain_tests::{
    RelayProcess, accepted_updates, constant_update, digits_join, free_port, join_raw_as,
    peer_config_at, send_constant_update, sign, spawn_configured, two_peers_close_round_0,
};

/// Joins the digits run at the edge at TCP `address` as the identity of `seed`, once the edge
/// has reached its root (until then it answers `relay_busy`).
async fn join_edge(address: &str, seed: u8) -> (RelayClient, Welcome, RoundAnnouncement) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = tokio::spawn({
            let address = address.to_owned();
            async move { try_join(&address, seed).await }
        });
        match attempt.await.expect("join task") {
            Some(joined) => return joined,
            None => {
                assert!(
                    Instant::now() < deadline,
                    "the edge never linked to its root"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

async fn try_join(address: &str, seed: u8) -> Option<(RelayClient, Welcome, RoundAnnouncement)> {
    let identity = swarmtrain_shared::Identity::from_seed([seed; 32]);
    let client = RelayClient::connect(address.parse().expect("multiaddr"), &identity).ok()?;
    match client
        .send(digits_join("test", None), Vec::new())
        .await
        .ok()?
    {
        RelayToClient::Welcome(welcome) => {
            let round = welcome
                .round
                .verify_from(&PeerKey::from_public_key(welcome.relay_key()))
                .expect("signed");
            Some((client, *welcome, round))
        }
        RelayToClient::Rejected { kind, .. } if kind == "relay_busy" => None,
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// Sends `peer`'s constant update of `value` for `round` until it is answered: a relay that
/// lost the peer (`not_joined`, after a root restart) is joined again, one that could not
/// reach or store it (`store_failed`, `relay_busy`) is asked again. Returns the final answer.
async fn send_mending(
    client: &RelayClient,
    round: &RoundAnnouncement,
    value: f32,
) -> RelayToClient {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let answer = send_constant_update(client, round, value).await;
        match &answer {
            RelayToClient::Rejected { kind, .. }
                if matches!(kind.as_str(), "not_joined" | "store_failed" | "relay_busy")
                    && Instant::now() < deadline =>
            {
                if kind == "not_joined" {
                    let _ = client.send(digits_join("test", None), Vec::new()).await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            _ => return answer,
        }
    }
}

/// The first round after `after`, as announced (signed by `key`) to `client`'s connection.
async fn await_round(client: &RelayClient, after: u64, key: &[u8]) -> RoundAnnouncement {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ask = ClientToRelay::AwaitRound {
            run_id: "digits".into(),
            after: Some(after),
        };
        if let Ok(RelayToClient::Round(signed)) = client.send(ask, Vec::new()).await {
            let round = signed.verify_with_key(key).expect("signed by the root");
            if round.round > after {
                return round;
            }
        }
        assert!(Instant::now() < deadline, "round {after} did not close");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that `answer` accepted an update for `round`.
fn accepted(answer: RelayToClient, round: u64) {
    assert!(
        matches!(answer, RelayToClient::Accepted { round: r } if r == round),
        "expected the update for round {round} accepted, got {answer:?}"
    );
}

/// The root's history row of `round` (the round it opened), with its contributors.
async fn contributors(root: &RelayProcess, round: u64) -> u64 {
    let status = root.json("api/status").await;
    let row = status["history"]
        .as_array()
        .expect("history")
        .iter()
        .find(|row| row["round"] == round)
        .unwrap_or_else(|| panic!("no history row of round {round}: {status}"))
        .clone();
    row["contributors"].as_u64().expect("contributors")
}

fn edge(dir: &std::path::Path, root: &RelayProcess) -> RelayProcess {
    RelayProcess::start(dir, free_port(), &["--upstream", &root.http], &[])
}

/// A root and two edges on `dirs`, each given `extra` too, once all three answer.
async fn root_and_two_edges(
    dirs: &[tempfile::TempDir],
    extra: &[&str],
) -> (RelayProcess, [RelayProcess; 2]) {
    let root = RelayProcess::start(dirs[0].path(), free_port(), extra, &[]);
    root.json("api/status").await;
    let edges = [1, 2].map(|i| {
        let args = [&["--upstream", root.http.as_str()][..], extra].concat();
        RelayProcess::start(dirs[i].path(), free_port(), &args, &[])
    });
    for edge in &edges {
        edge.json("api/status").await;
    }
    (root, edges)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_and_two_edges_train_one_run_as_one_relay_and_survive_their_faults() {
    let dirs: Vec<_> = (0..4)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let root_port = free_port();
    let root = RelayProcess::start(dirs[0].path(), root_port, &[], &[]);
    root.json("api/status").await;
    let edge1 = edge(dirs[1].path(), &root);
    let edge2 = edge(dirs[2].path(), &root);
    let (e1, e2) = (edge1.tcp_address().await, edge2.tcp_address().await);

    // A peer on each edge: each is welcomed with the root's round and the root's delegation of
    // the run to its edge, and agrees session keys with its edge under that delegation.
    let (a, welcome_a, round0) = join_edge(&e1, 1).await;
    let (b, welcome_b, _) = join_edge(&e2, 2).await;
    let root_key = welcome_a.relay_key().to_vec();
    assert_eq!(
        welcome_b.relay_key(),
        root_key,
        "both edges hand out the root's round"
    );
    let edge1_key = welcome_a.session_key().expect("the delegation verifies");
    let edge2_key = welcome_b.session_key().expect("the delegation verifies");
    assert!(
        edge1_key != root_key && edge2_key != edge1_key,
        "each edge has its own key"
    );
    a.agree_keys(&edge1_key).await.expect("keys with edge 1");
    b.agree_keys(&edge2_key).await.expect("keys with edge 2");
    assert_eq!(
        root.json("api/status").await["joined_peers"],
        2,
        "the root counts both peers"
    );

    // Round 0 closes at the root (quorum 2) with one update from each edge.
    for (client, value) in [(&a, 0.01), (&b, 0.02)] {
        accepted(send_constant_update(client, &round0, value).await, 0);
    }
    let round1 = await_round(&a, 0, &root_key).await;
    assert_eq!(
        round1,
        await_round(&b, 0, &root_key).await,
        "both edges announce it"
    );
    assert_eq!(contributors(&root, 1).await, 2, "one update from each edge");

    // θ_1 is bit for bit a lone relay's, given the same updates (the same two identities).
    let lone = RelayProcess::start(dirs[3].path(), free_port(), &[], &[]);
    two_peers_close_round_0(&lone.tcp_address().await).await;
    assert_eq!(
        lone.json("api/status").await["params_hash"],
        round1.params.to_hex(),
        "the federation's θ_1 is the lone relay's"
    );
    drop(lone);
    // …and the edge serves those bytes.
    let served = reqwest::get(format!(
        "{}api/runs/digits/params/{}",
        edge2.http,
        round1.params.to_hex()
    ))
    .await
    .expect("θ from the edge")
    .bytes()
    .await
    .expect("body");
    assert_eq!(
        swarmtrain_shared::protocol::ParamsHash::of(&served),
        round1.params
    );

    // Credits add up at the root: one update each.
    for seed in [1u8, 2] {
        let peer = swarmtrain_shared::Identity::from_seed([seed; 32]).peer();
        let credit = root
            .json(&format!("api/runs/digits/peers/{}", peer.to_hex()))
            .await;
        assert_eq!(credit["accepted_updates"], 1, "peer {seed}: {credit}");
    }

    // B sends its round-1 update through edge 2, then moves to edge 1 and sends it again: the
    // root counts it once.
    accepted(send_constant_update(&b, &round1, 0.02).await, 1);
    let (b_on_1, _, _) = join_edge(&e1, 2).await;
    match send_constant_update(&b_on_1, &round1, 0.02).await {
        RelayToClient::Rejected { kind, .. } => assert_eq!(kind, "duplicate"),
        other => panic!("a second update for round 1 was taken: {other:?}"),
    }

    // The root is killed mid-round (B's update accepted, A's not yet) and started again on its
    // data directory. A's update goes through edge 1 once the edge has its root back; the root
    // met A again only through it, so its quorum of live peers (A) may close round 1 with B's
    // stored update before A's arrives (as a lone relay does after a restart). Either way B's
    // acknowledged update is in the round.
    root.kill();
    let root = RelayProcess::start(dirs[0].path(), root_port, &[], &[]);
    root.json("api/status").await;
    let late = match send_mending(&a, &round1, 0.01).await {
        RelayToClient::Accepted { round: 1 } => false,
        RelayToClient::Rejected { kind, .. } if kind == "wrong_round" => true,
        other => panic!("A's update after the root's restart: {other:?}"),
    };
    let round2 = await_round(&a, 1, &root_key).await;
    assert_eq!(round2.round, 2);
    assert_eq!(contributors(&root, 2).await, if late { 1 } else { 2 });
    let b_key = swarmtrain_shared::Identity::from_seed([2; 32])
        .peer()
        .to_hex();
    let credit = root.json(&format!("api/runs/digits/peers/{b_key}")).await;
    assert_eq!(
        credit["accepted_updates"], 2,
        "B's update survived the root's restart: {credit}"
    );

    // Edge 1 is killed: A goes on through edge 2 and round 2 closes there with B.
    edge1.kill();
    let (a_on_2, _, announced) = join_edge(&e2, 1).await;
    assert_eq!(announced.round, 2);
    // (B first: the restarted root has not heard from B yet, so A's update alone would meet a
    // quorum of one live peer.)
    for (client, value) in [(&b, 0.02), (&a_on_2, 0.01)] {
        accepted(send_mending(client, &round2, value).await, 2);
    }
    assert_eq!(await_round(&b, 2, &root_key).await.round, 3);
    assert_eq!(contributors(&root, 3).await, 2);
    let status = root.json("api/status").await;
    assert_eq!(
        status["accepted_updates"],
        if late { 5 } else { 6 },
        "{status}"
    );
}

/// The volunteer's own client (`peer::run`: bootstrap, admission, delegated key exchange, θ and
/// data from its edge, updates, announcements by gossip) on two edges of one root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_peers_on_two_edges_train_rounds_together() {
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let (root, edges) = root_and_two_edges(&dirs, &[]).await;
    // Both join before either trains: the root's quorum counts the peers it has heard of.
    // Pinned: each stays on its edge rather than choosing the federation's least loaded relay.
    let rounds = 2;
    train_pinned(&root, &[(&edges[0], 1, rounds), (&edges[1], 2, rounds)], 2).await;
    for round in 1..=rounds {
        assert_eq!(contributors(&root, round).await, 2, "round {round}");
    }
    // Each edge shows the root's rounds (once it has followed the last), with the updates its
    // own peer gave each.
    let theta = root.json("api/status").await["params_hash"].clone();
    for edge in &edges {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            let status = edge.json("api/status").await;
            if status["params_hash"] == theta {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the edge did not follow: {status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for round in 1..=rounds {
            let row = status["history"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["round"] == round))
                .unwrap_or_else(|| panic!("no row of round {round} at the edge: {status}"));
            assert_eq!(row["contributors"], 1, "{row}");
            assert!(
                row["accuracy"].as_f64().is_some(),
                "the root's held-out figure: {row}"
            );
        }
    }
    // An edge stops cleanly on SIGTERM, even while it is trying to reach a root that is gone.
    assert!(root.terminate().success(), "the root exits cleanly");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for edge in edges {
        let status = edge.terminate();
        assert!(status.success(), "an edge exits cleanly, not {status}");
    }
}

/// The federation as `relay`'s bootstrap lists it: "role url" each, sorted.
async fn listed(relay: &RelayProcess) -> Vec<String> {
    let boot = relay.json("api/bootstrap").await;
    let mut listed: Vec<String> = boot["federation"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .map(|m| {
                    format!(
                        "{} {}",
                        m["role"].as_str().unwrap_or("?"),
                        m["url"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    listed.sort();
    listed
}

/// The next `Joined` event of `peer` (its relay's URL), keeping every event in `seen`.
async fn joined(peer: &mut swarmtrain_tests::TestPeer, seen: &mut Vec<PeerEvent>) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let event = tokio::time::timeout_at(deadline, peer.events.recv())
            .await
            .unwrap_or_else(|_| panic!("the peer did not join in time: {seen:?}"))
            .expect("the peer's events");
        let relay = match &event {
            PeerEvent::Joined { relay, .. } => Some(relay.clone()),
            _ => None,
        };
        seen.push(event);
        if let Some(relay) = relay {
            return relay;
        }
    }
}

/// Peers given only the root's URL choose among the federation's relays, which every relay's
/// bootstrap lists; an edge killed mid-round sends its peers to another relay of the
/// federation, and their work counts once: every round closes with both peers' updates and
/// the root credits each peer one update a round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_choose_a_relay_of_the_federation_and_fail_over_when_their_edge_is_killed() {
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let root = RelayProcess::start(dirs[0].path(), free_port(), &[], &[]);
    root.json("api/status").await;
    let mut edges = vec![edge(dirs[1].path(), &root), edge(dirs[2].path(), &root)];
    // Each edge reports its URL and load to the root soon after joining it; the root answers
    // with the list, which the edges serve too.
    let mut expected = vec![
        format!("root {}", root.http),
        format!("edge {}", edges[0].http),
        format!("edge {}", edges[1].http),
    ];
    expected.sort();
    let deadline = Instant::now() + Duration::from_secs(60);
    for relay in [&root, &edges[0], &edges[1]] {
        loop {
            let now = listed(relay).await;
            if now == expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}'s bootstrap lists {now:?}",
                relay.http
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let pause = std::sync::Arc::new(swarmtrain_client::Flag::new(true));
    let rounds = 3;
    let mut peers: Vec<_> = [1u8, 2]
        .into_iter()
        .map(|id| {
            spawn_configured(PeerConfig {
                max_rounds: Some(rounds),
                pause: pause.clone(),
                ..peer_config_at(&root.http, id)
            })
        })
        .collect();
    let mut seen = vec![Vec::new(), Vec::new()];
    let mut chosen = Vec::new();
    for (peer, seen) in peers.iter_mut().zip(&mut seen) {
        let relay = joined(peer, seen).await;
        // The root carries both edges' connections: an idle edge is less loaded.
        assert!(
            edges.iter().any(|e| e.http == relay),
            "a peer chose {relay}, not an idle edge"
        );
        chosen.push(relay);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while root.json("api/status").await["joined_peers"] != 2 {
        assert!(Instant::now() < deadline, "the peers did not join");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pause.set(false);
    // Round 1 opens once both round-0 updates are in; the first peer's edge dies in it.
    let deadline = Instant::now() + Duration::from_secs(120);
    while root.json("api/status").await["round"].as_u64() < Some(1) {
        assert!(Instant::now() < deadline, "round 0 did not close");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed = chosen[0].clone();
    let at = edges
        .iter()
        .position(|e| e.http == killed)
        .expect("the edge");
    let killed_at = Instant::now();
    edges.remove(at).kill();
    // The first peer joins another relay of the federation.
    let again = joined(&mut peers[0], &mut seen[0]).await;
    assert_ne!(again, killed, "the peer came back to its dead edge");
    println!(
        "fail-over: {killed} killed, the peer joined {again} {:.1} s later",
        killed_at.elapsed().as_secs_f64()
    );
    for ((peer, mut seen), id) in peers.into_iter().zip(seen).zip([1u8, 2]) {
        let (trained, rest) = tokio::time::timeout(Duration::from_secs(300), peer.finish())
            .await
            .expect("the peers finish in time");
        seen.extend(rest);
        assert_eq!(trained, rounds);
        assert_eq!(
            accepted_updates(&seen),
            rounds as usize,
            "peer {id}: {seen:?}"
        );
        // The root credits one update a round: none lost to the dead edge, none counted twice.
        let key = swarmtrain_shared::Identity::from_seed([id; 32]).peer();
        let credit = root
            .json(&format!("api/runs/digits/peers/{}", key.to_hex()))
            .await;
        assert_eq!(credit["accepted_updates"], rounds, "peer {id}: {credit}");
        // Any relay of the federation shows the root's ledger: the live edge answers the same.
        let path = format!("api/runs/digits/peers/{}", key.to_hex());
        let via_edge = edges[0].json(&path).await;
        assert_eq!(
            via_edge["accepted_updates"], credit["accepted_updates"],
            "{via_edge}"
        );
    }
    let board = edges[0].json("api/runs/digits/leaderboard").await;
    assert_eq!(
        board["peers"], 2,
        "the edge serves the root's leaderboard: {board}"
    );
    for round in 1..=rounds {
        assert_eq!(contributors(&root, round).await, 2, "round {round}");
    }
    // The root forgets the dead edge once its reports stop (MEMBER_TTL_MS, 30 s): not waited
    // for here; docs/protocol.md says so.
    assert!(root.terminate().success(), "the root exits cleanly");
    for edge in edges {
        assert!(edge.terminate().success(), "the live edge exits cleanly");
    }
}

async fn forward(edge: &RelayClient, submission: &Submission) -> RelayToClient {
    let payload = protocol::encode_submission(submission).expect("encode");
    let message = ClientToRelay::Forward {
        run_id: "digits".into(),
    };
    edge.send(message, payload).await.expect("forward")
}

/// What the root said to the forwarded message, or `None` when it refused the forward itself.
fn forwarded(answer: RelayToClient) -> Result<RelayToClient, String> {
    match answer {
        RelayToClient::Forwarded(answer) => Ok(*answer),
        RelayToClient::Rejected { kind, .. } => Err(kind),
        other => panic!("not an answer to a forward: {other:?}"),
    }
}

fn refused(answer: Result<RelayToClient, String>) -> String {
    match answer {
        Ok(RelayToClient::Rejected { kind, .. }) => kind,
        other => panic!("expected the forwarded message refused, got {other:?}"),
    }
}

/// A hostile edge (a raw client joined as one) against the root: whatever it forwards is judged
/// by the peer's own signature, so it cannot forge, alter, replay or double a peer's update, nor
/// pass its own key off as a trainer; an identity not joined as an edge cannot forward at all,
/// and a root started with `--edge-key` takes no other edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malicious_edge_cannot_forge_alter_or_replay_its_peers_updates() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The root takes one edge: the identity of seed 50.
    let edge_key = swarmtrain_shared::Identity::from_seed([50; 32])
        .peer()
        .to_hex();
    let root = RelayProcess::start(dir.path(), free_port(), &["--edge-key", &edge_key], &[]);
    let address = root.tcp_address().await;
    let stranger_id = swarmtrain_shared::Identity::from_seed([51; 32]);
    let stranger =
        RelayClient::connect(address.parse().expect("multiaddr"), &stranger_id).expect("client");
    let mut join_as_edge = digits_join("test", None);
    if let ClientToRelay::Join(join) = &mut join_as_edge {
        join.role = Role::Edge;
    }
    match stranger
        .send(join_as_edge, Vec::new())
        .await
        .expect("answer")
    {
        RelayToClient::Rejected { kind, .. } => assert_eq!(kind, "not_admitted"),
        other => panic!("an edge not on --edge-key was taken: {other:?}"),
    }
    let (edge, edge_id, welcome, round0) =
        join_raw_as(&address, "digits", [50; 32], Role::Edge).await;
    // The root's delegation names the edge's own key.
    let delegation = welcome
        .delegation
        .as_ref()
        .expect("an edge is given a delegation")
        .verify_with_key(welcome.relay_key())
        .expect("signed by the root");
    assert_eq!(delegation.edge_key, edge_id.public_key());
    // A trainer of the root's own: the round (quorum 2) stays open on P's update alone.
    let (trainer, _, _, _) = join_raw_as(&address, "digits", [70; 32], Role::Train).await;

    // Only an edge reports where clients reach it, and only an http(s) URL.
    let report = |url: &str| {
        ClientToRelay::Report(protocol::EdgeReport {
            run_id: "digits".into(),
            url: url.into(),
            load: 5,
        })
    };
    let kind = |answer: RelayToClient| match answer {
        RelayToClient::Rejected { kind, .. } => kind,
        other => format!("{other:?}"),
    };
    let answer = trainer
        .send(report("https://trainer.example/"), Vec::new())
        .await;
    assert_eq!(kind(answer.expect("answer")), "not_joined");
    let answer = edge.send(report("javascript:alert(1)"), Vec::new()).await;
    assert_eq!(kind(answer.expect("answer")), "malformed");
    match edge
        .send(report("https://edge.example/"), Vec::new())
        .await
        .expect("answer")
    {
        RelayToClient::Federation(members) => {
            let listed: Vec<_> = members.iter().map(|m| (m.url.as_str(), m.role)).collect();
            assert_eq!(
                listed,
                [
                    (root.http.as_str(), protocol::MemberRole::Root),
                    ("https://edge.example/", protocol::MemberRole::Edge)
                ]
            );
        }
        other => panic!("an edge's report was answered {other:?}"),
    }
    assert_eq!(
        listed(&root).await,
        [
            "edge https://edge.example/".to_owned(),
            format!("root {}", root.http)
        ]
    );

    // Peer P's join, forwarded: P is welcomed and counted; the same message again is a replay.
    let p_id = swarmtrain_shared::Identity::from_seed([60; 32]);
    let p = RelayClient::connect(address.parse().expect("multiaddr"), &p_id).expect("client");
    let join = sign(&p, &p_id, digits_join("test", None), Vec::new());
    assert!(matches!(
        forwarded(forward(&edge, &join).await),
        Ok(RelayToClient::Welcome(_))
    ));
    assert_eq!(refused(forwarded(forward(&edge, &join).await)), "replayed");
    assert_eq!(root.json("api/status").await["joined_peers"], 2);

    let (update, payload) = constant_update(&round0, 0.01);
    // Another payload under P's signature: refused.
    let other = Codec::F32.encode(&vec![0.5; round0.n_params as usize]);
    let altered = sign(&p, &p_id, update.clone(), other);
    assert_eq!(
        refused(forwarded(forward(&edge, &altered).await)),
        "payload_mismatch"
    );
    // A signed body the edge changed: the edge's own fault (a strike against it).
    let mut forged = sign(&p, &p_id, update.clone(), payload.clone());
    let last = forged.signed.body.len() - 1;
    forged.signed.body[last] ^= 1;
    assert_eq!(
        forwarded(forward(&edge, &forged).await).unwrap_err(),
        "bad_signature"
    );
    // An edge cannot pass its own key off as a peer's: a forward of its own message is the
    // edge's fault.
    let own = sign(&p, &edge_id, update.clone(), payload.clone());
    assert_eq!(
        forwarded(forward(&edge, &own).await).unwrap_err(),
        "malformed"
    );
    // P's real update is taken once: a second one for the round is a duplicate.
    let real = sign(&p, &p_id, update.clone(), payload.clone());
    accepted(
        forwarded(forward(&edge, &real).await).expect("forwarded"),
        0,
    );
    let again = sign(&p, &p_id, update, payload);
    assert_eq!(
        refused(forwarded(forward(&edge, &again).await)),
        "duplicate"
    );
    let status = root.json("api/status").await;
    assert_eq!(status["accepted_updates"], 1, "{status}");

    // A trainer that is not an edge cannot forward.
    assert_eq!(
        forwarded(forward(&trainer, &join).await).unwrap_err(),
        "not_joined"
    );
}

/// Peers pinned to their relays, `(relay, id, rounds)` each, that join (the root counting
/// `joined` identities since it started) before any of them trains; returns once each has
/// trained its rounds, with each one's accepted updates.
async fn train_pinned(root: &RelayProcess, peers: &[(&RelayProcess, u8, u64)], joined: u64) {
    let running = start_pinned(root, peers, joined).await;
    for (peer, (_, id, rounds)) in running.into_iter().zip(peers) {
        let (trained, events) = tokio::time::timeout(Duration::from_secs(300), peer.finish())
            .await
            .expect("the peers finish in time");
        assert_eq!(trained, *rounds, "peer {id}");
        assert_eq!(
            accepted_updates(&events),
            *rounds as usize,
            "peer {id}: {events:?}"
        );
    }
}

/// [`train_pinned`]'s peers, returned training once the root counts `joined` identities.
async fn start_pinned(
    root: &RelayProcess,
    peers: &[(&RelayProcess, u8, u64)],
    joined: u64,
) -> Vec<swarmtrain_tests::TestPeer> {
    let pause = std::sync::Arc::new(swarmtrain_client::Flag::new(true));
    let running: Vec<_> = peers
        .iter()
        .map(|(relay, id, rounds)| {
            spawn_configured(PeerConfig {
                pin_relay: true,
                max_rounds: Some(*rounds),
                pause: pause.clone(),
                ..peer_config_at(&relay.http, *id)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while root.json("api/status").await["joined_peers"] != joined {
        assert!(Instant::now() < deadline, "the peers did not join");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pause.set(false);
    running
}

/// The leaderboard `relay` serves: accepted updates by peer key (hex), and the rows as served.
async fn board(relay: &RelayProcess) -> (Vec<(String, u64)>, serde_json::Value) {
    let body = relay.json("api/runs/digits/leaderboard?limit=100").await;
    let mut counts: Vec<(String, u64)> = body["top"]
        .as_array()
        .unwrap_or_else(|| panic!("a leaderboard: {body}"))
        .iter()
        .map(|row| {
            (
                row["peer"].as_str().expect("peer").to_owned(),
                row["accepted_updates"].as_u64().expect("updates"),
            )
        })
        .collect();
    counts.sort();
    (counts, body)
}

/// A federation given one PostgreSQL database (`--ledger-url`): each relay writes its own
/// peers' accepted updates there, the root its verdicts, and every relay serves the same
/// leaderboard from it. The database going down loses nothing (each relay writes again once it
/// is back); an edge killed while its rows wait loses nothing either: the root writes the
/// round's missing rows from its data directory a round later. The shared ledger ends equal to
/// the root's own (redb), credit for credit, and the edges serve it with the root gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_shares_one_postgres_ledger_that_loses_no_row_to_its_faults() {
    let Some(pg) = swarmtrain_tests::Postgres::start() else {
        return;
    };
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let (root, [edge_a, edge_b]) = root_and_two_edges(&dirs, &["--ledger-url", &pg.url]).await;
    let key = |id: u8| swarmtrain_shared::Identity::from_seed([id; 32]).peer();
    let hex = |id: u8| key(id).to_hex();

    // Rounds 0 and 1: peer 1 on edge A, peer 2 on edge B.
    train_pinned(&root, &[(&edge_a, 1, 2), (&edge_b, 2, 2)], 2).await;
    let mut expected = vec![(hex(1), 2), (hex(2), 2)];
    expected.sort();
    let deadline = Instant::now() + Duration::from_secs(60);
    for relay in [&root, &edge_a, &edge_b] {
        loop {
            let (counts, body) = board(relay).await;
            if counts == expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} serves {body}, not the federation's ledger",
                relay.http
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let credit = edge_b
        .json(&format!("api/runs/digits/peers/{}", hex(1)))
        .await;
    assert_eq!(
        credit["accepted_updates"], 2,
        "peer 1 as edge B serves it: {credit}"
    );

    // Round 2 with the database down: peer 1 on edge A, peer 3 on edge B; edge B is killed
    // (its row for peer 3 still waiting) before the database comes back.
    pg.down();
    train_pinned(&root, &[(&edge_a, 1, 1), (&edge_b, 3, 1)], 3).await;
    let metrics = reqwest::get(format!("{}metrics", edge_b.http))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let queued = metrics
        .lines()
        .find_map(|l| l.strip_prefix("swarmtrain_shared_ledger_queued "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no queue gauge: {metrics}"));
    let failed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("swarmtrain_shared_ledger_failed_writes_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_default();
    assert!(
        queued >= 1.0 || failed >= 1.0,
        "edge B holds its peer's row while the database is down: {metrics}"
    );
    edge_b.kill();
    pg.up();

    // Rounds 3 and 4: peer 1 on edge A, peer 4 on the root. As round 4 is announced the root
    // writes what round 2 lacks.
    train_pinned(&root, &[(&edge_a, 1, 2), (&root, 4, 2)], 4).await;
    let mut expected = vec![(hex(1), 5), (hex(2), 2), (hex(3), 1), (hex(4), 2)];
    expected.sort();
    // Every row written, and nothing waiting at the root (twice in a row: a replay's verdict
    // may still come as the last round's reveals arrive).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut settled = 0;
    while settled < 2 {
        let (counts, _) = board(&edge_a).await;
        let idle = reqwest::get(format!("{}metrics", root.http))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
            .contains("swarmtrain_shared_ledger_queued 0\n");
        settled = if counts == expected && idle {
            settled + 1
        } else {
            0
        };
        assert!(
            Instant::now() < deadline,
            "the shared ledger did not catch up: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }

    // Who wrote what: each relay its own peers' rows; the root the row edge B lost.
    let (client, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
        .await
        .expect("connect to the shared ledger");
    tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT peer, round, recorded_by FROM swarmtrain_entries WHERE run_id = 'digits' \
             ORDER BY round, peer",
            &[],
        )
        .await
        .expect("entries");
    let writer = |id: u8, round: i64| -> Vec<u8> {
        rows.iter()
            .find(|r| r.get::<_, &[u8]>(0) == key(id).0 && r.get::<_, i64>(1) == round)
            .unwrap_or_else(|| panic!("no entry of peer {id} in round {round}"))
            .get(2)
    };
    assert_eq!(rows.len(), 10, "one row per accepted update");
    let (by_a, by_b, by_root) = (writer(1, 0), writer(2, 0), writer(4, 3));
    assert!(by_a != by_b && by_a != by_root && by_b != by_root);
    for round in [1, 3, 4] {
        assert_eq!(
            writer(1, round),
            by_a,
            "edge A writes peer 1's round {round}"
        );
    }
    assert_eq!(writer(2, 1), by_b);
    assert_eq!(writer(4, 4), by_root);
    assert_eq!(writer(3, 2), by_root, "the root writes the row edge B lost");

    // With the root gone, edge A still serves the federation's ledger, and it is the root's.
    assert!(root.terminate().success());
    let (counts, served) = board(&edge_a).await;
    assert_eq!(counts, expected, "{served}");
    let store = swarmtrain_relay::store::Store::open(dirs[0].path()).expect("the root's store");
    let own = store.credits("digits").expect("the root's credits");
    assert_eq!(own.len(), 4);
    for (peer, credit) in own {
        let row = served["top"]
            .as_array()
            .expect("top")
            .iter()
            .find(|r| r["peer"] == peer.to_hex())
            .unwrap_or_else(|| panic!("{} is not on the shared leaderboard", peer.short()));
        let shared: swarmtrain_relay::store::Credit =
            serde_json::from_value(row.clone()).expect("a credit");
        assert_eq!(
            shared,
            credit,
            "peer {}: shared vs the root's own",
            peer.short()
        );
    }

    // The operator's audit: every row holds up; a credit raised and an entry replaced by
    // another peer's, as a relay with write access could, do not.
    let audit = || {
        std::process::Command::new(swarmtrain_tests::relay_binary())
            .args(["audit-ledger", "--ledger-url", &pg.url])
            .output()
            .expect("run audit-ledger")
    };
    let clean = audit();
    let said = String::from_utf8_lossy(&clean.stdout).into_owned();
    assert!(clean.status.success(), "{said}");
    assert!(said.contains("run digits: 10 entries"), "{said}");
    assert_eq!(
        said.matches("entries written by relay").count(),
        3,
        "{said}"
    );
    assert!(said.contains("every row holds up"), "{said}");
    client
        .execute(
            "UPDATE swarmtrain_credits SET samples = samples + 1000 WHERE peer = $1",
            &[&key(2).0.as_slice()],
        )
        .await
        .expect("raise a credit");
    client
        .execute(
            "UPDATE swarmtrain_entries SET signed = (SELECT signed FROM swarmtrain_entries \
             WHERE peer = $1 AND round = 0) WHERE peer = $2 AND round = 1",
            &[&key(1).0.as_slice(), &key(2).0.as_slice()],
        )
        .await
        .expect("replace an entry");
    let tampered = audit();
    let said = String::from_utf8_lossy(&tampered.stdout).into_owned();
    assert_eq!(tampered.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("PROBLEM credit of peer {}", hex(2))),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "PROBLEM entry of round 1, peer {}: it is signed by {}, not by its peer",
            hex(2),
            hex(1)
        )),
        "{said}"
    );
    assert!(said.contains("2 rows do not hold up"), "{said}");
}

/// The shared ledger's database on TLS only: a relay that does not trust the server's
/// certificate does not start; one given the CA (`--ledger-ca`) writes its peers' updates over
/// TLS and serves the leaderboard from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_ledger_reaches_its_database_over_tls_with_a_certificate_it_trusts() {
    let Some(pg) = swarmtrain_tests::Postgres::start_tls_only() else {
        return;
    };
    let url = format!("{}?sslmode=require", pg.url);
    let ca = pg.ca();
    let ca = ca.to_str().expect("a UTF-8 path");
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut untrusting =
        RelayProcess::start(dirs[0].path(), free_port(), &["--ledger-url", &url], &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = untrusting.exited() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "a relay that cannot trust the database's certificate started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "{status}");

    let relay = RelayProcess::start(
        dirs[1].path(),
        free_port(),
        &["--ledger-url", &url, "--ledger-ca", ca],
        &[],
    );
    let address = relay.tcp_address().await;
    two_peers_close_round_0(&address).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (counts, body) = board(&relay).await;
        if counts.len() == 2 && counts.iter().all(|(_, n)| *n == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "the leaderboard: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let config: tokio_postgres::Config = url.parse().expect("a connection string");
    let tls = swarmtrain_relay::ledger::tls(Some(std::path::Path::new(ca))).expect("tls");
    let (client, connection) = config.connect(tls).await.expect("connect over TLS");
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM swarmtrain_entries), \
                    (SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a \
                     USING (pid) WHERE a.backend_type = 'client backend')",
            &[],
        )
        .await
        .expect("query");
    assert_eq!(row.get::<_, i64>(0), 2, "both updates are in the database");
    assert!(
        row.get::<_, bool>(1),
        "every connection to the database is TLS"
    );
}

/// The newest closed round in `root`'s history: (round, contributors).
async fn last_closed(root: &RelayProcess) -> (u64, u64) {
    let status = root.json("api/status").await;
    let row = status["history"]
        .as_array()
        .and_then(|rows| rows.last())
        .cloned()
        .unwrap_or_default();
    (
        row["round"].as_u64().unwrap_or(0),
        row["contributors"].as_u64().unwrap_or(0),
    )
}

/// A partitioned edge (frozen with SIGSTOP: its connections open and silent) does not stall
/// the run: the root closes the round at its deadline (adapted to the peers' speed, 5 s here,
/// not the configured 600 s) with the other edge's update, and once the edge is back (SIGCONT)
/// rounds close with both edges' peers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_edge_does_not_stall_the_round_past_its_deadline() {
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let (root, edges) = root_and_two_edges(&dirs, &[]).await;
    let _peers = start_pinned(&root, &[(&edges[0], 1, 100), (&edges[1], 2, 100)], 2).await;
    // Three rounds at quorum set the adaptive deadline.
    let deadline = Instant::now() + Duration::from_secs(120);
    while last_closed(&root).await.0 < 3 {
        assert!(Instant::now() < deadline, "three rounds did not close");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let timeout = root.json("api/status").await["round_timeout_ms"]
        .as_u64()
        .expect("the round timeout");
    assert!(timeout < 600_000, "the deadline adapted: {timeout} ms");

    edges[1].signal("STOP");
    let stopped = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (partial, waited) = loop {
        let (round, contributors) = last_closed(&root).await;
        if contributors == 1 {
            break (round, stopped.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "no round closed without the partitioned edge's peer (last: round {round}, {contributors} updates)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "with edge B frozen, round {partial} closed with edge A's update {:.1} s later (the round timeout was {timeout} ms)",
        waited.as_secs_f64()
    );
    assert!(
        waited < Duration::from_millis(timeout + 15_000),
        "the root waited {waited:?} for a partitioned edge"
    );

    edges[1].signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (round, contributors) = last_closed(&root).await;
        if round > partial && contributors == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the edge's peer did not come back (last: round {round}, {contributors} updates)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The example configs (`deploy/federation/root.toml` and `edge.toml`) start a federation: the
/// files parse, and with the test's database and addresses given on the command line (which
/// win over the file) a peer on each relay trains a round, the root lists the edge at the URL its
/// file gives, and both serve the shared leaderboard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_starts_from_the_example_configs() {
    let Some(pg) = swarmtrain_tests::Postgres::start() else {
        return;
    };
    let config = |name: &str| {
        swarmtrain_tests::package_path(&format!("../deploy/federation/{name}"))
            .to_str()
            .expect("a UTF-8 path")
            .to_owned()
    };
    let (root_toml, edge_toml) = (config("root.toml"), config("edge.toml"));
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let root = RelayProcess::start(
        dirs[0].path(),
        free_port(),
        &["--config", &root_toml, "--ledger-url", &pg.url],
        &[],
    );
    root.json("api/status").await;
    let edge = RelayProcess::start(
        dirs[1].path(),
        free_port(),
        &[
            "--config",
            &edge_toml,
            "--upstream",
            &root.http,
            "--ledger-url",
            &pg.url,
        ],
        &[],
    );
    edge.json("api/status").await;
    // The edge reports the URL its file gives.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !listed(&root)
        .await
        .contains(&"edge https://edge1.example.org/".to_owned())
    {
        assert!(
            Instant::now() < deadline,
            "the root lists {:?}",
            listed(&root).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    train_pinned(&root, &[(&root, 1, 1), (&edge, 2, 1)], 2).await;
    let key = |id: u8| {
        swarmtrain_shared::Identity::from_seed([id; 32])
            .peer()
            .to_hex()
    };
    let mut expected = vec![(key(1), 1), (key(2), 1)];
    expected.sort();
    let deadline = Instant::now() + Duration::from_secs(60);
    for relay in [&root, &edge] {
        loop {
            let (counts, body) = board(relay).await;
            if counts == expected {
                break;
            }
            assert!(Instant::now() < deadline, "{} serves {body}", relay.http);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
