//! The relay's libp2p node.
//!
//! Transports: TCP for native peers, WebSocket and WebRTC-direct for browsers, each with its own
//! security (noise for TCP and WebSocket, DTLS for WebRTC) and multiplexing. Behaviours: the
//! swarmtrain request-response protocol, gossipsub (the relay publishes each run's signed round
//! announcements: to every peer without direct links, and to a fanout of the browsers linked
//! to each other, which forward them), identify, ping, and a circuit relay v2 server that
//! carries the WebRTC signaling between browsers (at most [`CIRCUIT_BYTES`] a circuit; their
//! traffic then goes over their direct links), for peers whose identity has joined a run
//! unless the operator opens it to all. Connection limits: libp2p's `connection_limits` and a
//! per-address limit (`crate::limits`).
//!
//! Each inbound request is handled by the coordinator concurrently; the event loop sends the
//! answers back as they complete. Messages longer than a frame arrive in parts and are
//! reassembled here, per connection, within a memory budget: only on a connection whose
//! identity has joined a run (passed its admission policy), and no longer than the longest
//! update the relay's runs use.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::stream::FuturesUnordered;
use futures::{Future, StreamExt};
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, Transport as _, gossipsub, identity::Keypair, noise, relay, tcp,
    websocket, yamux,
};
use libp2p_webrtc::tokio::Certificate;
use swarmtrain_net::{Node, NodeEvent};
use swarmtrain_shared::protocol::{self, Refusal, RefusalKind, RelayToClient, Request};
use swarmtrain_shared::transfer::{Progress, Reassembly};
use tokio::sync::{broadcast, watch};

use crate::Runs;
use crate::boxed::Boxed;
use crate::coordinator::{Answer, encode_answer};
use crate::runs::Conn;
use crate::runs::{BAN_SECS, MAX_STRIKES};

/// At most this many requests are handled (or parked as long polls) at once.
const MAX_IN_FLIGHT: usize = 4096;
/// At most this many from one identity (or, before its peer ID has signed as one, from one
/// peer ID): an honest peer has one long poll and one other request out at a time, so neither
/// a few connections nor many peer IDs of one identity can take every slot.
pub const MAX_IN_FLIGHT_PER_PEER: usize = 8;
/// libp2p connections the relay keeps open at once ([`libp2p::connection_limits`]).
pub const MAX_CONNECTIONS: u32 = 20_000;
/// Incoming connections still in their handshake at once.
pub const MAX_PENDING_INCOMING: u32 = 512;
/// Connections of one peer ID at once (tabs sharing an identity share its peer ID).
pub const MAX_CONNECTIONS_PER_PEER: u32 = 8;

/// Whom quotas, strikes and bans are kept for: the identity a peer ID has signed as, once it
/// has; before that, the peer ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Account {
    Identity(swarmtrain_shared::PeerKey),
    Peer(PeerId),
}

impl Account {
    fn of(runs: &Runs, peer: PeerId) -> Self {
        runs.identity_of(&peer)
            .map_or(Self::Peer(peer), Self::Identity)
    }
}

/// The relay's behaviour: the swarmtrain node plus a circuit relay v2 server. The swarm holds it
/// [`Boxed`], so that each connection's handler lives on the heap.
#[derive(NetworkBehaviour)]
pub struct RelayBehaviour {
    /// libp2p's connection limits: in total, pending and per peer ID.
    pub limits: libp2p::connection_limits::Behaviour,
    /// At most so many connections from one IP address.
    pub per_ip: crate::limits::PerIp,
    pub node: Node,
    pub circuit: relay::Behaviour,
}

impl std::fmt::Debug for RelayBehaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBehaviour").finish_non_exhaustive()
    }
}

/// Loads the WebRTC certificate kept as PEM in `path`, creating it if missing, so that the
/// relay's `/certhash` (and so its WebRTC-direct address) survives restarts.
pub fn load_or_create_certificate(path: &Path) -> anyhow::Result<Certificate> {
    match std::fs::read_to_string(path) {
        Ok(pem) => Certificate::from_pem(&pem)
            .with_context(|| format!("{} does not hold a WebRTC certificate", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let certificate = Certificate::generate(&mut rand::rng())?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            std::io::Write::write_all(&mut file, certificate.serialize_pem().as_bytes())?;
            Ok(certificate)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub async fn build_swarm(
    keypair: Keypair,
    certificate: Certificate,
    gossip_fanout: usize,
    wss: Option<&crate::tls::Certified>,
    connections_per_ip: usize,
    joined_only: Option<Arc<Runs>>,
) -> anyhow::Result<Swarm<Boxed<RelayBehaviour>>> {
    let agent = format!("swarmtrain-relay/{}", env!("CARGO_PKG_VERSION"));
    // The WebSocket listener, with the operator's certificate when there is one (then it
    // listens as `/tls/ws`, which browsers dial as `wss://`).
    let mut ws = websocket::Config::new(tcp::tokio::Transport::new(
        tcp::Config::default().nodelay(true),
    ));
    if let Some(certified) = wss {
        ws.set_tls_config(
            websocket::tls::Config::new(
                websocket::tls::PrivateKey::new(certified.key.secret_der().to_vec()),
                certified
                    .chain
                    .iter()
                    .map(|c| websocket::tls::Certificate::new(c.to_vec())),
            )
            .context("the TLS certificate for wss")?,
        );
    }
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_other_transport(|key| libp2p_webrtc::tokio::Transport::new(key.clone(), certificate))?
        .with_other_transport(|key| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                ws.upgrade(libp2p::core::upgrade::Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()),
            )
        })?
        .with_dns()?
        .with_behaviour(|key| {
            let mut circuit = relay::Config {
                max_circuit_bytes: CIRCUIT_BYTES,
                max_reservations: MAX_RESERVATIONS,
                max_reservations_per_peer: 1,
                max_circuits: MAX_CIRCUITS,
                max_circuits_per_peer: 4,
                ..relay::Config::default()
            };
            // Beside libp2p's default rate limiters (per peer ID and per IP): only a peer whose
            // identity has joined a run may reserve (and so be listed by `/api/reachable`) or
            // open a circuit, unless the operator opened the relay to every libp2p peer. A
            // throwaway peer ID gets `RESOURCE_LIMIT_EXCEEDED`.
            if let Some(runs) = joined_only {
                let gate = |runs: Arc<Runs>| -> Box<dyn relay::RateLimiter> {
                    Box::new(move |peer: PeerId, _: &Multiaddr, _: std::time::Instant| {
                        runs.has_joined(&peer)
                    })
                };
                circuit.reservation_rate_limiters.push(gate(runs.clone()));
                circuit.circuit_src_rate_limiters.push(gate(runs));
            }
            Ok(Boxed(RelayBehaviour {
                limits: libp2p::connection_limits::Behaviour::new(
                    libp2p::connection_limits::ConnectionLimits::default()
                        .with_max_established(Some(MAX_CONNECTIONS))
                        .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
                        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER)),
                ),
                per_ip: crate::limits::PerIp::new(connections_per_ip),
                node: Node::new(ProtocolSupport::Inbound, key, &agent, gossip_fanout)?,
                circuit: relay::Behaviour::new(key.public().to_peer_id(), circuit),
            }))
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build())
}

/// Bytes a circuit relays (each way) before the relay cuts it: WebRTC signaling between two
/// browsers (Noise, identify, the SDP offer and answer, a few ICE candidates) takes a few KiB,
/// and once their direct connection is up they close the circuit. So θ, updates and gossip
/// between linked browsers never cost the relay bandwidth (libp2p's default is 128 KiB).
pub const CIRCUIT_BYTES: u64 = 64 * 1024;
/// Circuit relay reservations at once (libp2p's default is 128); one per peer ID. A browser
/// needs one to take links from other browsers.
pub const MAX_RESERVATIONS: usize = 2048;
/// Circuits (WebRTC signaling in progress) at once (libp2p's default is 16), four per peer ID.
pub const MAX_CIRCUITS: usize = 512;

/// What the libp2p node shows the HTTP side: the peers that hold a circuit relay reservation
/// here, newest last (browsers that take WebRTC connections from other browsers through this
/// relay, `GET /api/reachable`; bounded by the circuit relay's own reservation limit), and the
/// libp2p connections open (`/metrics`).
#[derive(Debug, Default)]
pub struct Network {
    reachable: std::sync::Mutex<Vec<PeerId>>,
    connections: std::sync::atomic::AtomicUsize,
    circuits_cut: std::sync::atomic::AtomicU64,
    linked: std::sync::atomic::AtomicUsize,
    /// Incoming connections refused by a connection limit (in total, per peer ID, per IP).
    pub refused_connections: std::sync::atomic::AtomicU64,
    /// Circuit relay reservations and circuits refused (a peer that has not joined, a rate or
    /// a limit).
    refused_reservations: std::sync::atomic::AtomicU64,
    refused_circuits: std::sync::atomic::AtomicU64,
    /// HTTP API requests shed because too many were in progress (see `http::app`).
    pub api_shed: std::sync::atomic::AtomicU64,
    gossip_sent: std::sync::atomic::AtomicU64,
    gossip_to_mesh: std::sync::atomic::AtomicU64,
    /// Bytes of request-response frames received and sent (what a federation's root carries).
    rpc_bytes_in: std::sync::atomic::AtomicU64,
    rpc_bytes_out: std::sync::atomic::AtomicU64,
    /// Open connections by the transport they came over.
    by_transport: std::sync::Mutex<std::collections::BTreeMap<&'static str, usize>>,
}

/// The transport a connection came over, from the address it came from: `tcp`, `ws`, `wss`,
/// `webrtc-direct`, or `other`.
pub fn transport_of(remote: &Multiaddr) -> &'static str {
    use libp2p::multiaddr::Protocol;
    let mut kind = "other";
    let mut tls = false;
    for p in remote.iter() {
        kind = match p {
            Protocol::Tcp(_) => "tcp",
            Protocol::Tls => {
                tls = true;
                kind
            }
            Protocol::Wss(_) => "wss",
            Protocol::Ws(_) if tls => "wss",
            Protocol::Ws(_) => "ws",
            Protocol::WebRTCDirect => "webrtc-direct",
            _ => kind,
        };
    }
    kind
}

impl Network {
    fn connected(&self, remote: &Multiaddr, delta: isize) {
        if let Ok(mut counts) = self.by_transport.lock() {
            let n = counts.entry(transport_of(remote)).or_default();
            *n = n.saturating_add_signed(delta);
        }
    }

    /// Open libp2p connections by transport (`/metrics`, the operator view).
    pub fn connections_by_transport(&self) -> Vec<(&'static str, usize)> {
        self.by_transport
            .lock()
            .map(|c| c.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    fn add_reachable(&self, peer: PeerId) {
        if let Ok(mut peers) = self.reachable.lock() {
            peers.retain(|p| *p != peer);
            peers.push(peer);
        }
    }

    fn remove_reachable(&self, peer: &PeerId) {
        if let Ok(mut peers) = self.reachable.lock() {
            peers.retain(|p| p != peer);
        }
    }

    /// At most `limit` reachable peers that pass `keep`, the most recent first.
    pub fn newest_reachable(&self, limit: usize, keep: impl Fn(&PeerId) -> bool) -> Vec<PeerId> {
        self.reachable
            .lock()
            .map(|p| {
                p.iter()
                    .rev()
                    .filter(|p| keep(p))
                    .take(limit)
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Circuit relay reservations and circuits refused so far.
    pub fn refused_relaying(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.refused_reservations.load(Relaxed),
            self.refused_circuits.load(Relaxed),
        )
    }

    /// Peers holding a reservation.
    pub fn reachable(&self) -> usize {
        self.reachable.lock().map_or(0, |p| p.len())
    }

    /// Open libp2p connections.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Peers subscribed to `LINKED_TOPIC`: browsers holding direct links.
    pub fn linked(&self) -> usize {
        self.linked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Announcement copies the relay sent itself, and those it left to the browsers' mesh.
    pub fn gossip_copies(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.gossip_sent.load(Relaxed),
            self.gossip_to_mesh.load(Relaxed),
        )
    }

    /// Bytes of request-response frames received and sent.
    pub fn rpc_bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.rpc_bytes_in.load(Relaxed),
            self.rpc_bytes_out.load(Relaxed),
        )
    }

    /// Circuits that ended in an error: over [`CIRCUIT_BYTES`] or its time limit, or a side gone.
    pub fn circuits_cut(&self) -> u64 {
        self.circuits_cut.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A request being answered: whether it counts against its peer's requests in flight, the
/// peer, where to answer, and the answer.
type Pending = Pin<
    Box<dyn Future<Output = (Option<Account>, PeerId, ResponseChannel<Vec<u8>>, Answer)> + Send>,
>;
/// The work that produces an answer.
type Work = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// Accounts with strikes remembered beyond which those with a single strike are forgotten.
const MAX_STRUCK: usize = 100_000;

/// At most this many banned peer IDs are remembered (about 60 bytes each); banned identities
/// are kept by [`Runs`].
const MAX_BANNED: usize = 10_000;

/// Whether `answer` refuses a message for a reason an honest peer never earns
/// ([`RefusalKind::is_hostile`]).
fn is_strike(answer: &Answer) -> bool {
    matches!(answer, Err(refusal) if refusal.kind.is_hostile())
}

/// Counts a strike against `account` (`peer`: the peer ID that earned it, if a message did);
/// the [`MAX_STRIKES`]th closes the connections of the account's every peer ID and bans them.
fn strike(
    strikes: &mut HashMap<Account, u32>,
    banned: &mut HashMap<PeerId, tokio::time::Instant>,
    runs: &Runs,
    swarm: &mut Swarm<Boxed<RelayBehaviour>>,
    account: Account,
    peer: Option<PeerId>,
) {
    let n = strikes.entry(account).or_default();
    *n += 1;
    if *n < MAX_STRIKES {
        return;
    }
    strikes.remove(&account);
    tracing::warn!(
        ?peer,
        ?account,
        strikes = MAX_STRIKES,
        ban_secs = BAN_SECS,
        "closing connections for their strikes"
    );
    runs.note_closed_for_strikes();
    let mut peers: Vec<PeerId> = peer.into_iter().collect();
    if let Account::Identity(identity) = account {
        runs.ban_identity(identity);
        peers.extend(runs.peer_ids_of(&identity));
    }
    for peer in peers {
        ban(banned, peer);
        let _ = swarm.disconnect_peer_id(peer);
    }
}

/// Bans `peer` for [`BAN_SECS`]; when [`MAX_BANNED`] are remembered, expired bans are dropped
/// first, and if none has expired the ban is not remembered (the connection is still closed).
fn ban(banned: &mut HashMap<PeerId, tokio::time::Instant>, peer: PeerId) {
    let now = tokio::time::Instant::now();
    if banned.len() >= MAX_BANNED {
        banned.retain(|_, until| *until > now);
    }
    if banned.len() < MAX_BANNED {
        banned.insert(peer, now + Duration::from_secs(BAN_SECS));
    }
}

/// How many copies of an announcement on `topic` gossipsub sends: one to each subscriber
/// without links (an explicit peer), and `fanout` to those with links; the remaining linked
/// subscribers (the second number) receive it over their links.
fn recipients(
    gossipsub: &gossipsub::Behaviour,
    topic: &gossipsub::TopicHash,
    linked: &HashSet<PeerId>,
    fanout: usize,
) -> (u64, u64) {
    let (mut direct, mut covered) = (0u64, 0u64);
    for (peer, topics) in gossipsub.all_peers() {
        if topics.contains(&topic) {
            if linked.contains(peer) {
                covered += 1;
            } else {
                direct += 1;
            }
        }
    }
    let to_fanout = covered.min(fanout as u64);
    (direct + to_fanout, covered - to_fanout)
}

/// How the node spreads announcements and buffers long messages.
#[derive(Clone, Copy, Debug)]
pub struct NodeLimits {
    /// Linked browsers each announcement is sent to (as in [`build_swarm`]).
    pub fanout: usize,
    /// Bytes of long messages in reassembly, all connections together.
    pub reassembly_budget: usize,
}

/// Runs the node until `shutdown` flips to true.
pub async fn run(
    mut swarm: Swarm<Boxed<RelayBehaviour>>,
    runs: Arc<Runs>,
    mut announcements: broadcast::Receiver<(String, Vec<u8>)>,
    network: Arc<Network>,
    NodeLimits {
        fanout,
        reassembly_budget,
    }: NodeLimits,
    mut strike_reports: tokio::sync::mpsc::Receiver<swarmtrain_shared::PeerKey>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
    // Requests in `pending` per account; refusals are answered at once and not counted.
    let mut in_flight: HashMap<Account, usize> = HashMap::new();
    // Strikes per account (refusals an honest peer never earns) and the peer IDs closed for
    // them, with when their ban ends (banned identities are kept by `Runs`).
    let mut strikes: HashMap<Account, u32> = HashMap::new();
    let mut banned: HashMap<PeerId, tokio::time::Instant> = HashMap::new();
    // One long message in progress per connection, each owed a fair share of the budget.
    let mut parts: Reassembly<libp2p::swarm::ConnectionId> =
        Reassembly::with_limits(reassembly_budget, runs.max_submission_bytes());
    let started = tokio::time::Instant::now();
    let max_wait = Duration::from_secs(60);
    // Peers that said they hold direct links (bounded by the open connections).
    let mut linked: HashSet<PeerId> = HashSet::new();
    let linked_topic = gossipsub::IdentTopic::new(protocol::LINKED_TOPIC).hash();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            announcement = announcements.recv() => match announcement {
                Ok((run_id, frame)) => {
                    let topic = gossipsub::IdentTopic::new(protocol::rounds_topic(&run_id));
                    let (sent, to_mesh) = recipients(&swarm.behaviour().node.gossipsub, &topic.hash(), &linked, fanout);
                    match swarm.behaviour_mut().node.gossipsub.publish(topic, frame) {
                        Ok(_) => {
                            use std::sync::atomic::Ordering::Relaxed;
                            network.gossip_sent.fetch_add(sent, Relaxed);
                            network.gossip_to_mesh.fetch_add(to_mesh, Relaxed);
                            tracing::debug!(run = run_id, sent, to_mesh, "announcement gossiped");
                        }
                        Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
                        Err(e) => tracing::warn!(error = %e, run = run_id, "could not gossip the announcement"),
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => tracing::warn!(n, "announcements skipped"),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            // An identity whose update failed its replay (or was never revealed).
            Some(identity) = strike_reports.recv() => {
                strike(&mut strikes, &mut banned, &runs, &mut swarm, Account::Identity(identity), None);
            }
            Some((counted, peer, channel, answer)) = pending.next(), if !pending.is_empty() => {
                if let Some(account) = counted && let Some(n) = in_flight.get_mut(&account) {
                    *n -= 1;
                    if *n == 0 {
                        in_flight.remove(&account);
                    }
                }
                if is_strike(&answer) {
                    // Against the identity once the peer ID has signed as one: a new peer ID
                    // brings no new strikes, and the ban reaches every peer ID of the identity.
                    let account = Account::of(&runs, peer);
                    strike(&mut strikes, &mut banned, &runs, &mut swarm, account, Some(peer));
                }
                let frame = encode_answer(answer);
                network.rpc_bytes_out.fetch_add(frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if swarm.behaviour_mut().node.rpc.send_response(channel, frame).is_err() {
                    tracing::debug!("peer went away before its answer was sent");
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(RelayBehaviourEvent::Node(NodeEvent::Rpc(request_response::Event::Message {
                    peer,
                    connection_id,
                    message: request_response::Message::Request { request, channel, .. },
                }))) => {
                    network.rpc_bytes_in.fetch_add(request.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    let runs = runs.clone();
                    let conn = Conn { peer, id: connection_id };
                    let account = Account::of(&runs, peer);
                    let mine = in_flight.get(&account).copied().unwrap_or(0);
                    let busy = if mine >= MAX_IN_FLIGHT_PER_PEER {
                        Some((RefusalKind::PeerBusy, format!("{mine} requests from this identity are in flight; wait for an answer")))
                    } else if pending.len() >= MAX_IN_FLIGHT {
                        Some((RefusalKind::RelayBusy, format!("the relay has {MAX_IN_FLIGHT} requests in flight; try again shortly")))
                    } else {
                        None
                    };
                    if let Some((kind, reason)) = busy {
                        // Refused with a reason, logged and counted; outside the quota (it
                        // resolves as soon as the count is taken).
                        pending.push(Box::pin(async move { (None, peer, channel, runs.refuse(kind, reason).await) }));
                        continue;
                    }
                    *in_flight.entry(account).or_default() += 1;
                    let now_ms = started.elapsed().as_millis() as u64;
                    // Checking signatures and handling messages runs on the runtime's workers, not
                    // on this loop, so that a flood of messages to check does not hold up the network.
                    let work: Work = match protocol::decode::<Request>(&request) {
                        Err(e) => Box::pin(async move { runs.refuse(RefusalKind::Malformed, e.to_string()).await }),
                        Ok(Request::Submit(submission)) => Box::pin(async move { runs.handle(submission, conn, max_wait).await }),
                        Ok(Request::Fetch(fetch)) => Box::pin(async move { runs.fetch(fetch, conn).await }),
                        // Buffer space is for connections whose identity has joined a run.
                        Ok(Request::Part(_)) if !runs.has_joined(&peer) => Box::pin(async move {
                            let reason = "join a run before sending a long message".to_owned();
                            runs.refuse(RefusalKind::UnboundPart, reason).await
                        }),
                        Ok(Request::Part(part)) => match parts.accept(connection_id, part, now_ms) {
                            Ok(Progress::More { received }) => Box::pin(async move { Ok(RelayToClient::PartReceived { received }) }),
                            Ok(Progress::Complete(bytes)) => Box::pin(async move {
                                match postcard::from_bytes(&bytes) {
                                    Ok(submission) => runs.handle(submission, conn, max_wait).await,
                                    Err(e) => runs.refuse(RefusalKind::Malformed, format!("malformed frame: {e}")).await,
                                }
                            }),
                            // A full buffer is the relay's state, not the sender's fault.
                            Err(e) if e.is_busy() => Box::pin(async move { runs.refuse(RefusalKind::RelayBusy, e.to_string()).await }),
                            Err(e) => Box::pin(async move { runs.refuse(RefusalKind::BadPart, e.to_string()).await }),
                        },
                    };
                    let task = tokio::spawn(work);
                    let answer: Pending = Box::pin(async move {
                        let answer = task.await.unwrap_or_else(|e| {
                            tracing::error!(error = %e, "a request's handler failed");
                            Err(Refusal {
                                kind: RefusalKind::Internal,
                                reason: "the relay failed to handle this request".into(),
                            })
                        });
                        (Some(account), peer, channel, answer)
                    });
                    pending.push(answer);
                }
                SwarmEvent::Behaviour(RelayBehaviourEvent::Node(NodeEvent::Rpc(request_response::Event::InboundFailure { peer, error, .. }))) => {
                    tracing::debug!(%peer, %error, "inbound request failed");
                }
                SwarmEvent::Behaviour(RelayBehaviourEvent::Circuit(event)) => {
                    tracing::debug!(?event, "circuit relay");
                    match event {
                        relay::Event::ReservationReqAccepted { src_peer_id, .. } => network.add_reachable(src_peer_id),
                        relay::Event::ReservationClosed { src_peer_id }
                        | relay::Event::ReservationTimedOut { src_peer_id } => network.remove_reachable(&src_peer_id),
                        relay::Event::ReservationReqDenied { src_peer_id, status } => {
                            network.refused_reservations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::info!(%src_peer_id, ?status, "reservation refused: the peer has not joined a run, or a limit");
                        }
                        relay::Event::CircuitReqDenied { src_peer_id, dst_peer_id, status } => {
                            network.refused_circuits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::info!(%src_peer_id, %dst_peer_id, ?status, "circuit refused: the dialer has not joined a run, or a limit");
                        }
                        relay::Event::CircuitClosed { src_peer_id, dst_peer_id, error: Some(error) } => {
                            network.circuits_cut.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::info!(%src_peer_id, %dst_peer_id, %error, "circuit cut");
                        }
                        _ => {}
                    }
                }
                // A peer without direct links is an explicit peer, which gossipsub sends every
                // announcement; one subscribed to LINKED_TOPIC is left to the fanout and the mesh.
                SwarmEvent::Behaviour(RelayBehaviourEvent::Node(NodeEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic }))) => {
                    let gossipsub = &mut swarm.behaviour_mut().node.gossipsub;
                    if topic == linked_topic {
                        linked.insert(peer_id);
                        gossipsub.remove_explicit_peer(&peer_id);
                    } else if !linked.contains(&peer_id) {
                        gossipsub.add_explicit_peer(&peer_id);
                    }
                    network.linked.store(linked.len(), std::sync::atomic::Ordering::Relaxed);
                }
                SwarmEvent::Behaviour(RelayBehaviourEvent::Node(NodeEvent::Gossipsub(gossipsub::Event::Unsubscribed { peer_id, topic }))) if topic == linked_topic => {
                    linked.remove(&peer_id);
                    swarm.behaviour_mut().node.gossipsub.add_explicit_peer(&peer_id);
                    network.linked.store(linked.len(), std::sync::atomic::Ordering::Relaxed);
                }
                SwarmEvent::NewListenAddr { address, .. } => tracing::debug!(%address, "listening"),
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                    network.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    network.connected(endpoint.get_remote_address(), 1);
                    tracing::debug!(%peer_id, addr = %endpoint.get_remote_address(), "connection established");
                    if banned.get(&peer_id).is_some_and(|until| *until > tokio::time::Instant::now()) {
                        tracing::debug!(%peer_id, "refusing a banned peer ID");
                        let _ = swarm.disconnect_peer_id(peer_id);
                    }
                }
                SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                    if matches!(error, libp2p::swarm::ListenError::Denied { .. }) {
                        network.refused_connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(addr = %send_back_addr, %error, "connection refused by a limit");
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, endpoint, .. } => {
                    network.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    network.connected(endpoint.get_remote_address(), -1);
                    parts.drop_sender(&connection_id);
                    runs.connection_closed(connection_id);
                    if num_established == 0 {
                        // Explicit peers that are gone would be dialled again by gossipsub.
                        swarm.behaviour_mut().node.gossipsub.remove_explicit_peer(&peer_id);
                        if linked.remove(&peer_id) {
                            network.linked.store(linked.len(), std::sync::atomic::Ordering::Relaxed);
                        }
                        // An identity's strikes outlive its connections (reconnecting does not
                        // clear them), up to a bound.
                        if strikes.len() > MAX_STRUCK {
                            strikes.retain(|_, n| *n > 1);
                        }
                        runs.unbind(&peer_id);
                        strikes.remove(&Account::Peer(peer_id));
                    }
                }
                _ => {}
            },
        }
    }
}

/// Starts listening on each of `listeners` and returns the addresses bound, in order.
pub async fn listen(
    swarm: &mut Swarm<Boxed<RelayBehaviour>>,
    listeners: &[Multiaddr],
) -> anyhow::Result<Vec<Multiaddr>> {
    let mut ids = Vec::new();
    for addr in listeners {
        ids.push(
            swarm
                .listen_on(addr.clone())
                .with_context(|| format!("listening on {addr}"))?,
        );
    }
    let mut bound: Vec<Option<Multiaddr>> = vec![None; listeners.len()];
    while bound.iter().any(Option::is_none) {
        match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await? {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if let Some(i) = ids.iter().position(|id| *id == listener_id) {
                    bound[i].get_or_insert(address);
                }
            }
            SwarmEvent::ListenerError { error, .. } => anyhow::bail!("listener failed: {error}"),
            _ => {}
        }
    }
    Ok(bound.into_iter().flatten().collect())
}

/// The node's event loop on in-memory transports (no sockets): a relay swarm running [`run`]
/// and a peer's [`Node`], both with noise and yamux as on TCP.
#[cfg(test)]
mod tests {
    use libp2p::core::transport::MemoryTransport;
    use libp2p::core::upgrade::Version;
    use libp2p::{Transport as _, request_response};

    use super::*;

    fn memory_swarm<B: NetworkBehaviour>(
        key: Keypair,
        behaviour: impl FnOnce(&Keypair) -> B,
    ) -> Swarm<B> {
        libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_other_transport(|key| {
                Ok(MemoryTransport::default()
                    .upgrade(Version::V1)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default())
                    .boxed())
            })
            .expect("transport")
            .with_behaviour(|key| behaviour(key))
            .expect("behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
            .build()
    }

    struct Relay {
        address: Multiaddr,
        peer_id: PeerId,
        announce: crate::coordinator::Announcements,
        network: Arc<Network>,
        _shutdown: watch::Sender<bool>,
    }

    /// A relay node on `/memory/N` with a fanout of 1, running [`run`] for one digits run.
    async fn relay(port: u64) -> Relay {
        let (runs, announce) = crate::testing::runs(None).await;
        let key = Keypair::generate_ed25519();
        let peer_id = key.public().to_peer_id();
        let mut swarm = memory_swarm(key, |key| {
            Boxed(RelayBehaviour {
                limits: libp2p::connection_limits::Behaviour::new(Default::default()),
                per_ip: crate::limits::PerIp::new(1),
                node: Node::new(ProtocolSupport::Inbound, key, "relay-test", 1).expect("node"),
                circuit: relay::Behaviour::new(key.public().to_peer_id(), relay::Config::default()),
            })
        });
        let address: Multiaddr = format!("/memory/{port}").parse().expect("addr");
        swarm.listen_on(address.clone()).expect("listen");
        let network = Arc::new(Network::default());
        let (shutdown, shutdown_rx) = watch::channel(false);
        tokio::spawn(run(
            swarm,
            runs,
            announce.subscribe(),
            network.clone(),
            NodeLimits {
                fanout: 1,
                reassembly_budget: swarmtrain_shared::transfer::DEFAULT_BUDGET,
            },
            tokio::sync::mpsc::channel(1).1,
            shutdown_rx,
        ));
        Relay {
            address,
            peer_id,
            announce,
            network,
            _shutdown: shutdown,
        }
    }

    fn peer(relay: &Relay) -> Swarm<Node> {
        let mut swarm = memory_swarm(Keypair::generate_ed25519(), |key| {
            Node::new(ProtocolSupport::Outbound, key, "peer-test", 6).expect("node")
        });
        swarm
            .dial(
                relay
                    .address
                    .clone()
                    .with(libp2p::multiaddr::Protocol::P2p(relay.peer_id)),
            )
            .expect("dial");
        swarm
    }

    /// Drives `swarm` until `f` picks something out of an event.
    async fn until<T>(
        swarm: &mut Swarm<Node>,
        mut f: impl FnMut(SwarmEvent<NodeEvent>) -> Option<T>,
    ) -> T {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(t) = f(swarm.select_next_some().await) {
                    return t;
                }
            }
        })
        .await
        .expect("in time")
    }

    async fn ask(swarm: &mut Swarm<Node>, relay: PeerId, frame: Vec<u8>) -> RelayToClient {
        let id = swarm.behaviour_mut().rpc.send_request(&relay, frame);
        let answer = until(swarm, |event| match event {
            SwarmEvent::Behaviour(NodeEvent::Rpc(request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            })) if request_id == id => Some(response),
            _ => None,
        })
        .await;
        protocol::decode(&answer).expect("an answer the wire decodes")
    }

    #[tokio::test]
    async fn garbage_is_refused_with_a_reason_and_a_flood_of_it_closes_and_bans_the_peer() {
        let relay = relay(rand::random::<u64>() | 1).await;
        let mut peer = peer(&relay);
        for i in 1..MAX_STRIKES {
            match ask(&mut peer, relay.peer_id, vec![0xff; 40]).await {
                RelayToClient::Rejected { kind, .. } => {
                    assert_eq!(kind, "malformed", "request {i}")
                }
                other => panic!("request {i}: {other:?}"),
            }
        }
        // The last strike closes the connection (its refusal goes down with it).
        peer.behaviour_mut()
            .rpc
            .send_request(&relay.peer_id, vec![0xff; 40]);
        until(&mut peer, |event| {
            matches!(event, SwarmEvent::ConnectionClosed { .. }).then_some(())
        })
        .await;
        // Dialling again, the same peer ID is let in and closed at once.
        peer.dial(
            relay
                .address
                .clone()
                .with(libp2p::multiaddr::Protocol::P2p(relay.peer_id)),
        )
        .expect("dial");
        until(&mut peer, |event| {
            matches!(
                event,
                SwarmEvent::ConnectionClosed { .. } | SwarmEvent::OutgoingConnectionError { .. }
            )
            .then_some(())
        })
        .await;
    }

    #[tokio::test]
    async fn announcements_go_to_unlinked_peers_and_a_fanout_of_linked_ones() {
        let relay = relay(rand::random::<u64>() | 1).await;
        let topic = gossipsub::IdentTopic::new(protocol::rounds_topic("digits"));
        let linked = gossipsub::IdentTopic::new(protocol::LINKED_TOPIC);
        let mut unlinked = peer(&relay);
        let mut a = peer(&relay);
        let mut b = peer(&relay);
        for swarm in [&mut unlinked, &mut a, &mut b] {
            swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(&topic)
                .expect("subscribe");
        }
        for swarm in [&mut a, &mut b] {
            swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(&linked)
                .expect("subscribe");
        }
        // Until the relay has seen both linked subscriptions, drive the three peers.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while relay.network.linked() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay saw {} linked peers",
                relay.network.linked()
            );
            for swarm in [&mut unlinked, &mut a, &mut b] {
                let _ =
                    tokio::time::timeout(Duration::from_millis(20), swarm.select_next_some()).await;
            }
        }
        relay
            .announce
            .send(("digits".into(), b"round 1".to_vec()))
            .expect("the node listens");
        // The unlinked peer gets it from the relay and so does one of the linked ones (the
        // fanout); the other would hear it over its links, which these peers do not have, so
        // gossipsub's IHAVE at a later heartbeat brings it.
        for swarm in [&mut unlinked, &mut a, &mut b] {
            let data = until(swarm, |event| match event {
                SwarmEvent::Behaviour(NodeEvent::Gossipsub(gossipsub::Event::Message {
                    message,
                    ..
                })) => Some(message.data),
                _ => None,
            })
            .await;
            assert_eq!(data, b"round 1");
        }
        assert_eq!(relay.network.gossip_copies(), (2, 1));
    }
}
