//! The relay as a libp2p node: gossiped announcements, WebRTC-direct with a certificate that
//! survives restarts, a circuit relay v2 server, and several runs on one relay.

use std::time::Duration;

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, SwarmBuilder, identify, noise, ping, relay, tcp, yamux};
use swarmtrain_net::{Node, NodeEvent};
use swarmtrain_relay::{Relay, RelayConfig, digits_run};
use swarmtrain_shared::PeerKey;
use swarmtrain_shared::protocol::{
    self, ClientToRelay, Codec, Fetch, RelayToClient, Request, Update,
};
use swarmtrain_shared::robust::Rule;
use swarmtrain_tests::{
    accepted_updates, init_logging, join_raw, metrics, spawn_peer_in, start_relay,
};

const WAIT: Duration = Duration::from_secs(60);

/// Three subscribers on a relay whose fanout is 1: one without direct links, two that say they
/// hold links (subscribed to `LINKED_TOPIC`, as a browser with a WebRTC link is). The relay
/// sends the announcement itself to the first and to one of the others; the third is left to
/// the mesh (here, with no real links, gossipsub's IHAVE at the next heartbeat repairs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_announcements_arrive_by_gossip() {
    init_logging();
    let mut run = digits_run();
    run.quorum = 1;
    let relay = Relay::start(RelayConfig {
        http: "127.0.0.1:0".parse().expect("addr"),
        runs: vec![run],
        gossip_fanout: 1,
        ..RelayConfig::default()
    })
    .await
    .expect("relay starts");
    let (client, _, welcome, round0) = join_raw(&relay, [11; 32]).await;
    let mut linked = Vec::new();
    for seed in [12, 13] {
        let (peer, ..) = join_raw(&relay, [seed; 32]).await;
        for topic in [
            protocol::rounds_topic("digits"),
            protocol::LINKED_TOPIC.into(),
        ] {
            peer.subscribe(topic).await.expect("subscribe");
        }
        linked.push(peer);
    }
    // The longest answer the relay gives fits the frame size every WebRTC stack reads.
    let welcome_frame =
        protocol::encode(&RelayToClient::Welcome(Box::new(welcome.clone()))).expect("encode");
    assert!(
        welcome_frame.len() <= protocol::PREFERRED_FRAME_BYTES,
        "welcome of {} bytes",
        welcome_frame.len()
    );
    client
        .subscribe(protocol::rounds_topic("digits"))
        .await
        .expect("subscribe");
    // Give the subscription time to reach the relay before the round closes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let payload = protocol::params_to_bytes(&vec![0.01; round0.n_params as usize]);
    let update = ClientToRelay::Update(Update {
        run_id: "digits".into(),
        round: 0,
        base: round0.params,
        n_samples: 32,
        inner_steps: 1,
        loss: 1.0,
        codec: Codec::F32,
        payload: protocol::PayloadRef::of(&payload),
        state: protocol::PayloadRef::of(&[]),
    });
    // This update (19 KB) is longer than a frame: it goes in parts.
    let answer = client.send(update, payload).await.expect("answer");
    assert!(
        matches!(answer, RelayToClient::Accepted { round: 0 }),
        "{answer:?}"
    );
    let gossiped = tokio::time::timeout(WAIT, client.next_gossip())
        .await
        .expect("gossip in time")
        .expect("gossip");
    assert_eq!(gossiped.forwarded_by, None, "from the relay itself");
    let frame = gossiped.data;
    // Gossiped without the relay's 1,952-byte key: the signature (3,309 bytes) and a short body.
    assert!(frame.len() < 3500, "{} bytes", frame.len());
    let announcement =
        protocol::verify_gossiped(&frame, welcome.relay_key()).expect("signed by the relay");
    assert_eq!(
        (announcement.run_id.as_str(), announcement.round),
        ("digits", 1)
    );
    for peer in &linked {
        let gossiped = tokio::time::timeout(WAIT, peer.next_gossip())
            .await
            .expect("gossip in time")
            .expect("gossip");
        assert_eq!(gossiped.data, frame);
    }
    let metrics = metrics(&relay).await;
    for line in [
        "swarmtrain_linked_peers 2",
        "swarmtrain_announcements_sent_total 2",
        "swarmtrain_announcements_to_mesh_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    relay.shutdown().await;
}

#[derive(NetworkBehaviour)]
struct Probe {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    relay: relay::client::Behaviour,
}

/// A bare libp2p node over TCP and WebRTC-direct with identify, ping and a circuit relay client,
/// with the libp2p key of the identity `seed` (a browser's peer ID is derived the same way).
fn probe(seed: [u8; 32]) -> Swarm<Probe> {
    let identity = swarmtrain_shared::Identity::from_seed(seed);
    let key = libp2p::identity::Keypair::ed25519_from_bytes(*identity.network_secret())
        .expect("libp2p key");
    SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_other_transport(|key| {
            let certificate =
                libp2p_webrtc::tokio::Certificate::generate(&mut rand::rng()).expect("certificate");
            libp2p_webrtc::tokio::Transport::new(key.clone(), certificate)
        })
        .expect("webrtc")
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .expect("relay client")
        .with_behaviour(|key, relay| Probe {
            identify: identify::Behaviour::new(identify::Config::new(
                "/probe/1".into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(
                ping::Config::new().with_interval(Duration::from_millis(200)),
            ),
            relay,
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Drives `swarm` until `done` says what it waited for.
async fn until<T>(
    swarm: &mut Swarm<Probe>,
    what: &str,
    mut done: impl FnMut(SwarmEvent<ProbeEvent>) -> Option<T>,
) -> T {
    let wait = async {
        loop {
            if let Some(t) = done(swarm.select_next_some().await) {
                return t;
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A node with the swarmtrain behaviour over WebRTC-direct only.
fn rpc_over_webrtc() -> Swarm<Node> {
    SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_other_transport(|key| {
            let certificate =
                libp2p_webrtc::tokio::Certificate::generate(&mut rand::rng()).expect("certificate");
            libp2p_webrtc::tokio::Transport::new(key.clone(), certificate)
        })
        .expect("webrtc")
        .with_behaviour(|key| {
            Node::new(
                ProtocolSupport::Outbound,
                key,
                "swarmtrain-test/0",
                swarmtrain_net::DEFAULT_GOSSIP_FANOUT,
            )
            .expect("behaviour")
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Sends one request frame and waits for the decoded answer.
async fn rpc_call(swarm: &mut Swarm<Node>, relay: PeerId, frame: Vec<u8>) -> RelayToClient {
    let id = swarm.behaviour_mut().rpc.send_request(&relay, frame);
    let wait = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(NodeEvent::Rpc(request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                })) if request_id == id => return protocol::decode(&response).expect("an answer"),
                SwarmEvent::Behaviour(NodeEvent::Rpc(
                    request_response::Event::OutboundFailure {
                        request_id, error, ..
                    },
                )) if request_id == id => {
                    panic!("request failed: {error}")
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .expect("an answer over WebRTC in time")
}

async fn get_json(url: String) -> serde_json::Value {
    let body = reqwest::get(&url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .bytes()
        .await
        .expect("body");
    serde_json::from_slice(&body).expect("json")
}

fn certhash(address: &str) -> String {
    let address: Multiaddr = address.parse().expect("multiaddr");
    address
        .iter()
        .find_map(|p| match p {
            Protocol::Certhash(hash) => Some(format!("{hash:?}")),
            _ => None,
        })
        .expect("a certhash")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_direct_works_and_its_certificate_survives_a_restart() {
    init_logging();
    // The probe below dials over WebRTC before any relay has chosen the crypto provider.
    swarmtrain_relay::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || RelayConfig {
        http: "127.0.0.1:0".parse().expect("addr"),
        web_dir: swarmtrain_tests::package_path("../web"),
        data_dir: Some(dir.path().to_path_buf()),
        ..RelayConfig::default()
    };
    let relay = Relay::start(config()).await.expect("relay starts");
    let address = relay.bootstrap.addresses["webrtc-direct"][0].clone();
    assert!(
        address.contains("/udp/") && address.contains("/webrtc-direct/certhash/"),
        "{address}"
    );

    // A node dials the relay over WebRTC-direct: identify and ping run over the data channels.
    let mut node = probe([63; 32]);
    // libp2p-webrtc dials from its listener's UDP socket.
    node.listen_on(
        "/ip4/127.0.0.1/udp/0/webrtc-direct"
            .parse()
            .expect("multiaddr"),
    )
    .expect("listen");
    let relay_addr = address.parse::<Multiaddr>().expect("multiaddr");
    node.dial(relay_addr.clone()).expect("dial");
    // A WebRTC dial whose handshake fails (UDP on a loaded machine: this wait once timed out in
    // CI) is dialed again, as a peer would, twice at most.
    let mut failed_dials = Vec::new();
    let agent = loop {
        let event = until(&mut node, "identify over WebRTC", |e| match e {
            SwarmEvent::Behaviour(ProbeEvent::Identify(identify::Event::Received {
                info, ..
            })) => Some(Ok(info.agent_version)),
            SwarmEvent::OutgoingConnectionError { error, .. } => Some(Err(error.to_string())),
            _ => None,
        })
        .await;
        match event {
            Ok(agent) => break agent,
            Err(error) => {
                failed_dials.push(error);
                assert!(
                    failed_dials.len() < 3,
                    "WebRTC dials failed: {failed_dials:?}"
                );
                node.dial(relay_addr.clone()).expect("dial");
            }
        }
    };
    if !failed_dials.is_empty() {
        println!("WebRTC-direct: dialed again after {failed_dials:?}");
    }
    assert!(agent.starts_with("swarmtrain-relay/"), "{agent}");
    let rtt = until(&mut node, "ping over WebRTC", |e| match e {
        SwarmEvent::Behaviour(ProbeEvent::Ping(ping::Event {
            result: Ok(rtt), ..
        })) => Some(rtt),
        _ => None,
    })
    .await;
    println!("WebRTC-direct: {agent}, ping {rtt:?}");

    // The swarmtrain protocol itself over WebRTC: a signed join, and θ fetched in 16 KiB chunks.
    let mut peer = rpc_over_webrtc();
    peer.listen_on(
        "/ip4/127.0.0.1/udp/0/webrtc-direct"
            .parse()
            .expect("multiaddr"),
    )
    .expect("listen");
    let relay_id: PeerId = relay.bootstrap.peer_id.parse().expect("peer id");
    peer.dial(address.parse::<Multiaddr>().expect("multiaddr"))
        .expect("dial");
    let identity = swarmtrain_shared::Identity::from_seed([12; 32]);
    let join = ClientToRelay::Join(swarmtrain_shared::protocol::Join {
        version: swarmtrain_shared::protocol::PROTOCOL_VERSION,
        run_id: "digits".into(),
        capabilities: swarmtrain_shared::protocol::Capabilities {
            backend: "none".into(),
            platform: "webrtc test".into(),
        },
        role: swarmtrain_shared::protocol::Role::Train,
        proof_of_work: None,
    });
    let envelope = protocol::Envelope {
        peer_id: peer.local_peer_id().to_bytes(),
        seq: 1,
        expires_ms: swarmtrain_relay::runs::unix_ms() + 60_000,
        message: join,
    };
    let frame = protocol::encode(&Request::Submit(protocol::Submission {
        signed: identity.sign(&envelope).expect("sign"),
        payload: Vec::new(),
    }))
    .expect("encode");
    let welcome = match rpc_call(&mut peer, relay_id, frame).await {
        RelayToClient::Welcome(welcome) => *welcome,
        other => panic!("expected a welcome, got {other:?}"),
    };
    let round = welcome
        .round
        .verify_from(&PeerKey::from_public_key(welcome.relay_key()))
        .expect("signed");
    let fetch = Request::Fetch(Fetch::Params {
        run_id: "digits".into(),
        hash: round.params,
        offset: 0,
    });
    match rpc_call(
        &mut peer,
        relay_id,
        protocol::encode(&fetch).expect("encode"),
    )
    .await
    {
        RelayToClient::Chunk {
            total,
            offset: 0,
            bytes,
        } => {
            assert_eq!(total, 4 * round.n_params);
            assert_eq!(bytes.len(), protocol::CHUNK_BYTES.min(total as usize));
        }
        other => panic!("expected a chunk, got {other:?}"),
    }
    relay.shutdown().await;

    let again = Relay::start(config()).await.expect("relay restarts");
    let readdress = again.bootstrap.addresses["webrtc-direct"][0].clone();
    assert_eq!(
        certhash(&address),
        certhash(&readdress),
        "the certhash is the same after a restart"
    );
    again.shutdown().await;
    let pem =
        std::fs::read_to_string(dir.path().join("webrtc.pem")).expect("the certificate is kept");
    assert!(pem.contains("BEGIN"), "PEM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_reach_each_other_through_the_circuit_relay() {
    init_logging();
    let relay = start_relay(digits_run()).await;
    let relay_tcp: Multiaddr = relay.bootstrap.addresses["tcp"][0]
        .parse()
        .expect("multiaddr");
    let relay_id: PeerId = relay.bootstrap.peer_id.parse().expect("peer id");

    // A peer ID whose identity has not joined a run may not reserve: throwaway peer IDs would
    // otherwise hold every reservation and fill `/api/reachable`.
    let mut a = probe([61; 32]);
    let a_id = *a.local_peer_id();
    a.listen_on(relay_tcp.clone().with(Protocol::P2pCircuit))
        .expect("listen via relay");
    until(&mut a, "a refused reservation", |e| match e {
        SwarmEvent::ListenerClosed { reason: Err(_), .. } => Some(()),
        SwarmEvent::Behaviour(ProbeEvent::Relay(
            relay::client::Event::ReservationReqAccepted { .. },
        )) => panic!("a peer that never joined holds a reservation"),
        _ => None,
    })
    .await;
    let listed = get_json(format!("{}api/reachable", relay.url())).await;
    assert_eq!(listed["peers"], serde_json::json!([]), "{listed}");
    let metrics = metrics(&relay).await;
    let line = r#"swarmtrain_relaying_refused_total{kind="reservation"} 1"#;
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");

    // Once its identity has joined (here from another connection of the same peer ID), A
    // listens through the relay (a reservation), and B, joined too, dials A's relayed address.
    let _a_joined = join_raw(&relay, [61; 32]).await;
    let _b_joined = join_raw(&relay, [62; 32]).await;
    a.listen_on(relay_tcp.clone().with(Protocol::P2pCircuit))
        .expect("listen via relay");
    until(&mut a, "a reservation", |e| match e {
        SwarmEvent::Behaviour(ProbeEvent::Relay(
            relay::client::Event::ReservationReqAccepted { relay_peer_id, .. },
        )) => {
            assert_eq!(relay_peer_id, relay_id);
            Some(())
        }
        _ => None,
    })
    .await;
    // The relay lists A as reachable, for browsers to dial browser-to-browser.
    let listed = get_json(format!("{}api/reachable", relay.url())).await;
    assert_eq!(listed["peers"][0], a_id.to_string(), "{listed}");

    let mut b = probe([62; 32]);
    let via_relay = relay_tcp
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(a_id));
    b.dial(via_relay).expect("dial A via the relay");
    let (mut a_connected, mut b_pinged) = (false, false);
    let wait = async {
        while !(a_connected && b_pinged) {
            tokio::select! {
                event = a.select_next_some() => {
                    if let SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } = event
                        && peer_id != relay_id
                    {
                        assert!(endpoint.is_relayed(), "A's connection from B is relayed");
                        a_connected = true;
                    }
                }
                event = b.select_next_some() => {
                    if let SwarmEvent::Behaviour(ProbeEvent::Ping(ping::Event { peer, result: Ok(_), .. })) = event
                        && peer == a_id
                    {
                        b_pinged = true;
                    }
                }
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .expect("B reaches A through the relay");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_coordinates_two_runs_with_their_own_specs() {
    init_logging();
    let mut digits = digits_run();
    digits.quorum = 1;
    digits.inner.steps = 10;
    let mut robust = digits.clone();
    robust.run_id = "digits-robust".into();
    robust.codec = Codec::Int8Block { block: 64 };
    robust.aggregator = Rule::Median;
    let config = RelayConfig {
        http: "127.0.0.1:0".parse().expect("addr"),
        web_dir: swarmtrain_tests::package_path("../web"),
        runs: vec![digits, robust.clone()],
        ..RelayConfig::default()
    };
    let relay = Relay::start(config).await.expect("relay starts");
    assert_eq!(relay.bootstrap.runs, ["digits", "digits-robust"]);

    let first = spawn_peer_in(&relay, 1, 2, None);
    let second = spawn_peer_in(&relay, 2, 2, Some("digits-robust"));
    for peer in [first, second] {
        let (trained, events) = tokio::time::timeout(Duration::from_secs(300), peer.finish())
            .await
            .expect("in time");
        assert_eq!(trained, 2);
        assert!(accepted_updates(&events) == 2, "{events:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let default = relay.runs.get("digits").expect("digits").status().await;
    let other = relay
        .runs
        .get("digits-robust")
        .expect("second run")
        .status()
        .await;
    assert!(
        default.round >= 2 && other.round >= 2,
        "both runs advanced: {} and {}",
        default.round,
        other.round
    );
    assert_eq!(other.spec.aggregator, "Median");
    assert!(other.spec.codec.contains("Int8"), "{}", other.spec.codec);
    assert_ne!(
        default.params_hash, other.params_hash,
        "each run has its own parameters"
    );

    // The HTTP side lists both; an unknown run is refused.
    let listed = get_json(format!("{}api/runs", relay.url())).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(2));
    let missing = reqwest::get(format!("{}api/runs/nope/status", relay.url()))
        .await
        .expect("GET");
    assert_eq!(missing.status(), reqwest::StatusCode::NOT_FOUND);
    let metrics = metrics(&relay).await;
    assert!(
        metrics.contains("swarmtrain_round{run=\"digits-robust\"}"),
        "{metrics}"
    );
    // The relay's own load, for the operator view.
    for gauge in ["swarmtrain_connections ", "process_resident_memory_bytes "] {
        assert!(metrics.contains(gauge), "{gauge} in {metrics}");
    }
    relay.shutdown().await;
}
