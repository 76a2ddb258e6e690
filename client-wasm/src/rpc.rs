//! The peer ↔ relay exchange over libp2p request-response.
//!
//! Each request and each response is one postcard frame of at most
//! [`MAX_FRAME_BYTES`](swarmtrain_shared::protocol::MAX_FRAME_BYTES) (16 KiB, WebRTC's limit);
//! longer input is refused without being buffered. Longer signed messages go in parts, and θ
//! comes in chunks. Round announcements also arrive by gossipsub.
//!
//! [`RelayClient`] is a cloneable handle; an event loop task owns the `Swarm` and answers the
//! handle's commands through oneshot channels. The handle signs for one identity: its libp2p key
//! is derived from the identity's seed, and each message goes in a fresh
//! [`Envelope`] (this connection's peer ID, the next sequence number, an expiry on the relay's
//! clock).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use futures::{SinkExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, gossipsub, identify, ping, relay};
use swarmtrain_shared::Identity;
use swarmtrain_shared::leaves::{Manifest, leaf_range};
use swarmtrain_shared::protocol::{
    self, ClientToRelay, ENVELOPE_VALIDITY_MS, Envelope, Fetch, LINKED_TOPIC, MAX_MESSAGE_BYTES,
    ParamsHash, RelayToClient, Request, Submission, WireError,
};
use swarmtrain_shared::seal::{self, Offerer, SessionKeys};

use swarmtrain_net::codec::FrameCodec;
use swarmtrain_net::node::{DEFAULT_GOSSIP_FANOUT, Node, NodeEvent};

use crate::platform;
use crate::theta::{
    self, Assembly, Served, Source, THETA_PROTOCOL, THETA_TIMEOUT, ThetaAnswer, ThetaRequest,
    ThetaSources,
};

/// Appends `chunk` (at `offset` of `total`) to `bytes`; true once all `total` bytes are there.
fn append_chunk(
    bytes: &mut Vec<u8>,
    total: usize,
    offset: usize,
    chunk: &[u8],
) -> Result<bool, RpcError> {
    if total > MAX_MESSAGE_BYTES
        || offset != bytes.len()
        || chunk.is_empty()
        || offset + chunk.len() > total
    {
        return Err(RpcError::Wire(WireError::Malformed(format!(
            "chunk {offset}+{} of {total}",
            chunk.len()
        ))));
    }
    bytes.extend_from_slice(chunk);
    Ok(bytes.len() == total)
}

/// The peer's behaviour: the [`Node`] the relay runs too, and what only browsers use.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub node: Node,
    /// Browsers: a circuit relay reservation on the relay, and dials through it.
    pub relay_client: Toggle<relay::client::Behaviour>,
    /// Browsers: the WebRTC signaling with other browsers over relayed connections.
    pub webrtc: Toggle<crate::webrtc::signaling::Behaviour>,
    /// Browsers: θ served to and fetched from linked browsers ([`THETA_PROTOCOL`]).
    pub theta: Toggle<request_response::Behaviour<FrameCodec>>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour").finish_non_exhaustive()
    }
}

impl Behaviour {
    /// A peer's node: it sends requests and answers none.
    pub fn new(key: &Keypair, agent: &str) -> Result<Self, String> {
        Ok(Self {
            node: Node::new(ProtocolSupport::Outbound, key, agent, DEFAULT_GOSSIP_FANOUT)?,
            relay_client: None.into(),
            webrtc: None.into(),
            theta: None.into(),
        })
    }

    /// Serves θ to linked browsers and fetches it from them (browsers).
    pub fn with_theta(mut self) -> Self {
        self.theta = Some(request_response::Behaviour::new(
            [(StreamProtocol::new(THETA_PROTOCOL), ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(THETA_TIMEOUT)
                .with_max_concurrent_streams(16),
        ))
        .into();
        self
    }
}

/// Why a request to the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("could not reach the relay: {0}")]
    Network(String),
    #[error("the relay's answer is not valid: {0}")]
    Wire(#[from] WireError),
    #[error("the connection's event loop has stopped")]
    Closed,
    #[error("the relay refused: {0}")]
    Refused(String),
    #[error("could not sign the message: {0}")]
    Sign(String),
    #[error("the key exchange with the relay failed: {0}")]
    Seal(#[from] seal::SealError),
    /// A linked browser did not give what was asked (θ it does not hold, a bad answer, a
    /// closed link).
    #[error("{0}")]
    Peer(String),
}

enum Command {
    Request {
        frame: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, RpcError>>,
    },
    Subscribe {
        topic: String,
    },
    /// Take WebRTC connections from other browsers through the relay (a circuit reservation
    /// and a `/p2p-circuit/webrtc` listener).
    ListenDirect,
    /// Connect to these browsers over WebRTC, signaling through the relay.
    DialDirect {
        peers: Vec<PeerId>,
    },
    /// A θ request to a linked browser.
    Theta {
        peer: PeerId,
        frame: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, RpcError>>,
    },
}

/// Announcements received by gossip, kept until read; when it is full, new ones are dropped
/// (the long poll still finds their round).
const GOSSIP_QUEUE: usize = 8;

/// A message from the relay on a subscribed topic (as sent: its content is not yet verified).
#[derive(Clone, Debug)]
pub struct Gossiped {
    pub data: Vec<u8>,
    /// The linked browser that forwarded it; None: it came from the relay itself.
    pub forwarded_by: Option<PeerId>,
}

/// A handle to the connection to one relay. Dropping every clone ends the connection.
#[derive(Clone, Debug)]
pub struct RelayClient {
    commands: mpsc::Sender<Command>,
    info: Arc<Mutex<RelayInfo>>,
    gossip: Arc<futures::lock::Mutex<mpsc::Receiver<Gossiped>>>,
    signer: Arc<Signer>,
    served: Served,
}

/// Signs this connection's envelopes.
#[derive(Debug)]
struct Signer {
    identity: Identity,
    peer_id: PeerId,
    /// The next sequence number: starts at the clock in µs, so a peer that reconnects with the
    /// same identity continues above the numbers it used before.
    seq: AtomicU64,
    /// The relay's clock minus ours, in ms.
    clock_offset_ms: AtomicI64,
    /// The session keys agreed with the relay ([`RelayClient::agree_keys`]), which seal update
    /// payloads and open θ chunks. They belong to one libp2p connection: the event loop forgets
    /// them when that connection closes (a later request redials, and keys are agreed again).
    keys: SharedKeys,
}

pub use swarmtrain_net::unix_ms;

/// The relay as identify and ping see it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RelayInfo {
    /// The relay's agent version, e.g. `swarmtrain-relay/0.1.0`.
    pub agent: Option<String>,
    /// The protocols the relay speaks.
    pub protocols: Vec<String>,
    /// The last measured round-trip time.
    pub rtt: Option<Duration>,
    /// Browsers this node holds a direct WebRTC connection to.
    pub direct_peers: Vec<PeerId>,
    /// The last ping round trip over each direct connection.
    pub direct_rtt: HashMap<PeerId, Duration>,
    /// Why listening for or dialing other browsers failed, the latest first.
    pub direct_error: Option<String>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Request { .. } => f.write_str("Command::Request"),
            Command::Subscribe { topic } => write!(f, "Command::Subscribe({topic})"),
            Command::ListenDirect => f.write_str("Command::ListenDirect"),
            Command::DialDirect { peers } => write!(f, "Command::DialDirect({peers:?})"),
            Command::Theta { peer, .. } => write!(f, "Command::Theta({peer})"),
        }
    }
}

impl RelayClient {
    /// Dials the relay at `address` (which must end in `/p2p/<relay peer id>`) as `identity`,
    /// whose seed gives the connection's libp2p key.
    pub fn connect(address: Multiaddr, identity: &Identity) -> Result<Self, RpcError> {
        Self::connect_with(address, identity, Vec::new())
    }

    /// [`connect`](Self::connect), with the STUN/TURN servers that browser-to-browser WebRTC
    /// connections use (browsers only).
    pub fn connect_with(
        address: Multiaddr,
        identity: &Identity,
        ice_servers: Vec<crate::webrtc::IceServer>,
    ) -> Result<Self, RpcError> {
        let relay = address
            .iter()
            .find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                _ => None,
            })
            .ok_or_else(|| RpcError::Network(format!("{address} names no relay peer id")))?;
        let keypair = Keypair::ed25519_from_bytes(*identity.network_secret())
            .map_err(|e| RpcError::Network(format!("deriving the libp2p key: {e}")))?;
        let peer_id = keypair.public().to_peer_id();
        let agent = format!("swarmtrain-peer/{}", env!("CARGO_PKG_VERSION"));
        let behaviour = Behaviour::new(&keypair, &agent).map_err(RpcError::Network)?;
        let mut swarm =
            platform::build_swarm(keypair, behaviour, Duration::from_secs(300), ice_servers)
                .map_err(RpcError::Network)?;
        swarm.add_peer_address(relay, address.clone());
        swarm
            .dial(address.clone())
            .map_err(|e| RpcError::Network(e.to_string()))?;
        let (commands, receiver) = mpsc::channel(16);
        let info = Arc::new(Mutex::new(RelayInfo::default()));
        let (gossip_tx, gossip) = mpsc::channel(GOSSIP_QUEUE);
        let served = Served::default();
        let keys = Arc::new(Mutex::new(None));
        platform::spawn(event_loop(
            swarm,
            (relay, address),
            receiver,
            (info.clone(), served.clone(), keys.clone()),
            gossip_tx,
        ));
        let micros = web_time::SystemTime::now()
            .duration_since(web_time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Ok(Self {
            commands,
            info,
            gossip: Arc::new(futures::lock::Mutex::new(gossip)),
            served,
            signer: Arc::new(Signer {
                identity: Identity::from_seed(*identity.seed()),
                peer_id,
                seq: AtomicU64::new(micros),
                clock_offset_ms: AtomicI64::new(0),
                keys,
            }),
        })
    }

    /// This connection's libp2p peer ID (derived from the identity).
    pub fn peer_id(&self) -> PeerId {
        self.signer.peer_id
    }

    /// The identity this handle signs for.
    pub fn identity(&self) -> &Identity {
        &self.signer.identity
    }

    /// Tells the handle the relay's clock (Unix ms, as `/api/bootstrap` reports it), so that
    /// envelope expiries are on the relay's clock whatever this machine's says.
    pub fn set_relay_clock(&self, relay_unix_ms: u64) {
        let offset = relay_unix_ms as i64 - unix_ms() as i64;
        self.signer.clock_offset_ms.store(offset, Ordering::Relaxed);
    }

    /// A fresh envelope for `message`: this connection, the next sequence number, and an expiry
    /// [`ENVELOPE_VALIDITY_MS`] from now on the relay's clock.
    pub fn envelope(&self, message: ClientToRelay) -> Envelope {
        let now = unix_ms() as i64 + self.signer.clock_offset_ms.load(Ordering::Relaxed);
        Envelope {
            peer_id: self.signer.peer_id.to_bytes(),
            seq: self.signer.seq.fetch_add(1, Ordering::Relaxed),
            expires_ms: now.max(0) as u64 + ENVELOPE_VALIDITY_MS,
            message,
        }
    }

    /// Signs `message` in a fresh envelope, sends it with `payload` (an update's encoded Δ,
    /// else empty; sealed once keys are agreed) and waits for the relay's answer.
    pub async fn send(
        &self,
        message: ClientToRelay,
        payload: Vec<u8>,
    ) -> Result<RelayToClient, RpcError> {
        let envelope = self.envelope(message);
        let payload = match self.keys() {
            Some(keys) if !payload.is_empty() => {
                keys.seal(&seal::payload_context(envelope.seq), &payload)
            }
            _ => payload,
        };
        let signed = self
            .signer
            .identity
            .sign(&envelope)
            .map_err(|e| RpcError::Sign(e.to_string()))?;
        self.submit(&Submission { signed, payload }).await
    }

    /// The session keys agreed with the relay, if any.
    pub fn keys(&self) -> Option<Arc<SessionKeys>> {
        self.signer.keys.lock().ok().and_then(|k| k.clone())
    }

    /// Agrees ML-KEM-768 + X25519 session keys with the relay ([`swarmtrain_shared::seal`]),
    /// whose ML-DSA key `relay_key` must sign its half; from then on update payloads and θ
    /// chunks on this connection are sealed. The relay answers only after a `Join`.
    pub async fn agree_keys(&self, relay_key: &[u8]) -> Result<(), RpcError> {
        let (offerer, offer) = Offerer::new()?;
        let signed = self
            .signer
            .identity
            .sign(&self.envelope(ClientToRelay::KeyOffer(offer)))
            .map_err(|e| RpcError::Sign(e.to_string()))?;
        let digest = seal::digest_signed(&signed);
        let accept = match self
            .submit(&Submission {
                signed,
                payload: Vec::new(),
            })
            .await?
        {
            RelayToClient::KeyAccept(accept) => accept,
            RelayToClient::Rejected { reason, .. } => return Err(RpcError::Refused(reason)),
            _ => return Err(unexpected("a key accept")),
        };
        let keys = offerer.finish(&digest, relay_key, &accept)?;
        let confirm = ClientToRelay::KeyConfirm {
            transcript: keys.transcript(),
        };
        match self.send(confirm, Vec::new()).await? {
            RelayToClient::KeysAgreed => {}
            RelayToClient::Rejected { reason, .. } => return Err(RpcError::Refused(reason)),
            _ => return Err(unexpected("keys agreed")),
        }
        if let Ok(mut slot) = self.signer.keys.lock() {
            *slot = Some(Arc::new(keys));
        }
        Ok(())
    }

    /// Subscribes to a gossipsub topic; its messages come out of [`RelayClient::next_gossip`].
    pub async fn subscribe(&self, topic: String) -> Result<(), RpcError> {
        self.commands
            .clone()
            .send(Command::Subscribe { topic })
            .await
            .map_err(|_| RpcError::Closed)
    }

    /// The relay's next message on a subscribed topic.
    pub async fn next_gossip(&self) -> Option<Gossiped> {
        self.gossip.lock().await.next().await
    }

    /// What identify and ping have told about the relay so far.
    /// Takes WebRTC connections from other browsers through the relay (browsers only; a
    /// native node cannot and records why in [`RelayInfo::direct_error`]).
    pub async fn listen_direct(&self) -> Result<(), RpcError> {
        self.commands
            .clone()
            .send(Command::ListenDirect)
            .await
            .map_err(|_| RpcError::Closed)
    }

    /// Connects to `peers` over WebRTC, signaling through the relay.
    pub async fn dial_direct(&self, peers: Vec<PeerId>) -> Result<(), RpcError> {
        self.commands
            .clone()
            .send(Command::DialDirect { peers })
            .await
            .map_err(|_| RpcError::Closed)
    }

    pub fn relay_info(&self) -> RelayInfo {
        self.info.lock().map(|i| i.clone()).unwrap_or_default()
    }

    /// Sends one submission as it is, in parts when it is longer than a frame, and waits for the
    /// relay's answer (tests use it to send forged and replayed messages).
    pub async fn submit(&self, submission: &Submission) -> Result<RelayToClient, RpcError> {
        let frames = protocol::requests_for(submission)?;
        let last = frames.len() - 1;
        for (i, frame) in frames.into_iter().enumerate() {
            let answer: RelayToClient = protocol::decode(&self.request_frame(frame).await?)?;
            match answer {
                RelayToClient::PartReceived { .. } if i < last => continue,
                answer => return Ok(answer),
            }
        }
        Err(RpcError::Closed)
    }

    /// θ by its hash from the relay, whole.
    pub async fn fetch_params(&self, run_id: &str, hash: ParamsHash) -> Result<Vec<u8>, RpcError> {
        self.fetch_whole(|offset| Fetch::Params {
            run_id: run_id.to_owned(),
            hash,
            offset,
        })
        .await
    }

    /// The state a verifier's replay job names ([`Fetch::State`]), whole and checked against
    /// its digest and length.
    pub async fn fetch_state(
        &self,
        run_id: &str,
        state: &protocol::PayloadRef,
    ) -> Result<Vec<u8>, RpcError> {
        let bytes = self
            .fetch_whole(|offset| Fetch::State {
                run_id: run_id.to_owned(),
                digest: state.digest,
                offset,
            })
            .await?;
        if bytes.len() != state.len as usize {
            return Err(RpcError::Wire(WireError::Malformed(
                "the state is not as long as its job says".into(),
            )));
        }
        Ok(bytes)
    }

    /// An object from the relay, chunk by chunk (`fetch` names the chunk at an offset), checked
    /// against the digest it is fetched by.
    async fn fetch_whole(&self, fetch: impl Fn(u32) -> Fetch) -> Result<Vec<u8>, RpcError> {
        let digest = fetch(0).digest();
        let mut bytes = Vec::new();
        loop {
            let offset = bytes.len();
            let (total, chunk) = self.relay_chunk(fetch(offset as u32)).await?;
            if append_chunk(&mut bytes, total, offset, &chunk)? {
                break;
            }
        }
        if blake3::hash(&bytes).as_bytes() != &digest {
            return Err(RpcError::Wire(WireError::Malformed(
                "the fetched bytes do not match their hash".into(),
            )));
        }
        Ok(bytes)
    }

    /// One chunk from the relay: (the object's length, the bytes from `fetch`'s offset on).
    async fn relay_chunk(&self, fetch: Fetch) -> Result<(usize, Vec<u8>), RpcError> {
        let (digest, offset) = (fetch.digest(), fetch.offset());
        let answer: RelayToClient = protocol::decode(
            &self
                .request_frame(protocol::encode(&Request::Fetch(fetch))?)
                .await?,
        )?;
        match answer {
            RelayToClient::Chunk {
                total,
                offset: at,
                bytes,
            } if at == offset => {
                let bytes = match self.keys() {
                    Some(keys) => keys.open(&seal::chunk_context(&digest, at, total), &bytes)?,
                    None => bytes,
                };
                Ok((total as usize, bytes))
            }
            RelayToClient::Rejected { reason, .. } => Err(RpcError::Refused(reason)),
            _ => Err(unexpected("a chunk")),
        }
    }

    /// Bytes `range` of a θ of `total` bytes from the relay.
    async fn relay_range(
        &self,
        run_id: &str,
        hash: ParamsHash,
        total: usize,
        range: Range<usize>,
    ) -> Result<Vec<u8>, RpcError> {
        let mut bytes = Vec::with_capacity(range.len());
        while bytes.len() < range.len() {
            let offset = range.start + bytes.len();
            let (length, chunk) = self
                .relay_chunk(Fetch::Params {
                    run_id: run_id.to_owned(),
                    hash,
                    offset: offset as u32,
                })
                .await?;
            if length != total || chunk.is_empty() || offset + chunk.len() > total {
                return Err(unexpected("a chunk of the announced θ"));
            }
            let want = (range.len() - bytes.len()).min(chunk.len());
            bytes.extend_from_slice(&chunk[..want]);
        }
        Ok(bytes)
    }

    /// θ (`total` bytes, by its hash, both from the signed announcement) from every browser
    /// linked to this one at once and, when they cannot finish it, from the relay (see
    /// [`crate::theta`]); then served to linked browsers. Every byte from a peer is checked
    /// against the hash before it is used.
    pub async fn fetch_params_anywhere(
        &self,
        run_id: &str,
        hash: ParamsHash,
        total: usize,
    ) -> Result<(Vec<u8>, ThetaSources), RpcError> {
        let mut peers = self.relay_info().direct_peers;
        let mut sources = ThetaSources::default();
        let bytes = match self
            .manifest_from(&mut peers, hash, total, &mut sources)
            .await
        {
            Some(manifest) => {
                let (bytes, found) = self.fetch_leaves(run_id, hash, manifest, &peers).await?;
                sources.relay_bytes = found.relay_bytes;
                sources.peers = found.peers;
                sources.failures.extend(found.failures);
                bytes
            }
            None => {
                let bytes = self.fetch_params(run_id, hash).await?;
                sources.relay_bytes = bytes.len() as u64;
                bytes
            }
        };
        self.served.keep(hash, &bytes);
        Ok((bytes, sources))
    }

    /// The θ's manifest from the first linked browser that gives a right one, all asked at
    /// once; those that fail are recorded in `sources` and left out of `peers`.
    async fn manifest_from(
        &self,
        peers: &mut Vec<PeerId>,
        hash: ParamsHash,
        total: usize,
        sources: &mut ThetaSources,
    ) -> Option<Manifest> {
        if !theta::by_leaves(total) {
            return None;
        }
        let one = |peer: PeerId| async move {
            let mut cvs = Vec::new();
            loop {
                let request = ThetaRequest::Manifest {
                    hash: hash.0,
                    from: cvs.len() as u32,
                };
                let answer = self
                    .ask_peer(peer, &request)
                    .await
                    .map_err(|e| (peer, e.to_string()))?;
                if theta::manifest_page(&mut cvs, total, answer).map_err(|e| (peer, e))? {
                    break;
                }
            }
            Manifest::verify(hash, total, cvs).ok_or_else(|| {
                (
                    peer,
                    "sent a manifest that does not match the θ's hash".into(),
                )
            })
        };
        let mut asked: futures::stream::FuturesUnordered<_> =
            peers.iter().map(|&p| one(p)).collect();
        let first = async {
            while let Some(result) = asked.next().await {
                match result {
                    Ok(manifest) => return Some(manifest),
                    Err((peer, e)) => {
                        peers.retain(|p| *p != peer);
                        sources.failures.push(format!("{peer} {e}"));
                    }
                }
            }
            None
        };
        // One deadline for the whole manifest, every page and every peer: past it, the θ
        // comes from the relay.
        let found = {
            let deadline = platform::sleep(theta::MANIFEST_DEADLINE);
            futures::pin_mut!(first, deadline);
            match futures::future::select(first, deadline).await {
                futures::future::Either::Left((manifest, _)) => Ok(manifest),
                futures::future::Either::Right(_) => Err(()),
            }
        };
        found.unwrap_or_else(|()| {
            sources.failures.push(format!(
                "no manifest from the linked browsers within {:?}",
                theta::MANIFEST_DEADLINE
            ));
            None
        })
    }

    /// The leaves of `manifest` from `peers` ([`theta::PIPELINE`] requests in flight each) and
    /// the relay.
    async fn fetch_leaves(
        &self,
        run_id: &str,
        hash: ParamsHash,
        manifest: Manifest,
        peers: &[PeerId],
    ) -> Result<(Vec<u8>, ThetaSources), RpcError> {
        let total = manifest.total();
        let workers = peers.len() * theta::PIPELINE;
        let state = Mutex::new(Assembly::new(manifest, workers));
        let lock = || state.lock().expect("θ assembly");
        let started = web_time::Instant::now();
        let peer_worker = |peer: PeerId| {
            let lock = &lock;
            async move {
                loop {
                    // (Not `while let`: its guard would live across the await.)
                    let next = lock().next_for(peer);
                    let Some(index) = next else { break };
                    let request = ThetaRequest::Leaf {
                        hash: hash.0,
                        index: index as u32,
                    };
                    let why = match self.ask_peer(peer, &request).await {
                        Ok(ThetaAnswer::Leaf { index: i, bytes }) if i as usize == index => {
                            if lock().put(index, &bytes, Source::Peer(peer)) {
                                continue;
                            }
                            "sent a leaf that does not match the manifest".to_owned()
                        }
                        Ok(ThetaAnswer::NotHere) => "no longer holds this θ".to_owned(),
                        Ok(_) => "answered another question".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    lock().give_up(peer, index, why);
                }
                lock().done();
            }
        };
        let relay = async {
            loop {
                if lock().complete() {
                    return Ok(());
                }
                let next = lock().next_for_relay(started.elapsed() >= theta::RELAY_PATIENCE);
                let Some(run) = next else {
                    platform::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let span = leaf_range(total, run.start).start..leaf_range(total, run.end - 1).end;
                match self.relay_range(run_id, hash, total, span.clone()).await {
                    Ok(bytes) => {
                        let mut state = lock();
                        for index in run {
                            let leaf = leaf_range(total, index);
                            let leaf = &bytes[leaf.start - span.start..leaf.end - span.start];
                            if !state.put(index, leaf, Source::Relay) {
                                return Err(RpcError::Wire(WireError::Malformed(
                                    "the relay sent θ that does not match its hash".into(),
                                )));
                            }
                        }
                    }
                    Err(e) => {
                        lock().release(run);
                        return Err(e);
                    }
                }
            }
        };
        let workers = peers
            .iter()
            .flat_map(|&peer| std::iter::repeat_n(peer, theta::PIPELINE))
            .map(peer_worker);
        // Once θ is whole (the relay's loop ends then), workers still waiting on a slow peer are
        // dropped rather than waited for.
        {
            let peers_done = futures::future::join_all(workers);
            futures::pin_mut!(relay, peers_done);
            match futures::future::select(relay, peers_done).await {
                futures::future::Either::Left((relay, _)) => {
                    relay?;
                    lock().give_up_owing();
                }
                futures::future::Either::Right((_, relay)) => relay.await?,
            }
        }
        Ok(state.into_inner().expect("θ assembly").into_bytes())
    }

    /// One θ request to a linked browser.
    async fn ask_peer(
        &self,
        peer: PeerId,
        request: &ThetaRequest,
    ) -> Result<ThetaAnswer, RpcError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .clone()
            .send(Command::Theta {
                peer,
                frame: protocol::encode(request)?,
                reply,
            })
            .await
            .map_err(|_| RpcError::Closed)?;
        let answer = answer.await.map_err(|_| RpcError::Closed)??;
        Ok(protocol::decode(&answer)?)
    }

    /// Sends raw request bytes and returns the raw answer (tests use it to send bad input).
    pub async fn request_frame(&self, frame: Vec<u8>) -> Result<Vec<u8>, RpcError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .clone()
            .send(Command::Request { frame, reply })
            .await
            .map_err(|_| RpcError::Closed)?;
        answer.await.map_err(|_| RpcError::Closed)?
    }
}

fn set_direct_error(info: &Mutex<RelayInfo>, error: String) {
    if let Ok(mut info) = info.lock() {
        info.direct_error = Some(error);
    }
}

/// Records the browsers this one is linked to, and subscribes to [`LINKED_TOPIC`] while there
/// is at least one (so that the relay leaves this peer's announcements to the mesh).
fn update_direct(swarm: &mut Swarm<Behaviour>, info: &Mutex<RelayInfo>) {
    let peers = swarm
        .behaviour()
        .webrtc
        .as_ref()
        .map(|w| w.direct_peers())
        .unwrap_or_default();
    let linked = gossipsub::IdentTopic::new(LINKED_TOPIC);
    let gossipsub = &mut swarm.behaviour_mut().node.gossipsub;
    if peers.is_empty() {
        gossipsub.unsubscribe(&linked);
    } else if let Err(e) = gossipsub.subscribe(&linked) {
        tracing::warn!(error = %e, "could not subscribe to the linked topic");
    }
    if let Ok(mut info) = info.lock() {
        info.direct_rtt.retain(|p, _| peers.contains(p));
        info.direct_peers = peers;
    }
}

fn unexpected(what: &str) -> RpcError {
    RpcError::Wire(WireError::Malformed(format!("expected {what}")))
}

/// The session keys of the connection to the relay, shared with its event loop.
type SharedKeys = Arc<Mutex<Option<Arc<SessionKeys>>>>;

async fn event_loop(
    mut swarm: Swarm<Behaviour>,
    (relay, relay_address): (PeerId, Multiaddr),
    mut commands: mpsc::Receiver<Command>,
    (info, served, keys): (Arc<Mutex<RelayInfo>>, Served, SharedKeys),
    mut gossip: mpsc::Sender<Gossiped>,
) {
    let mut pending: HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>, RpcError>>> =
        HashMap::new();
    let mut pending_theta: HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>, RpcError>>> =
        HashMap::new();
    loop {
        futures::select! {
            command = commands.next() => match command {
                Some(Command::Request { frame, reply }) => {
                    let id = swarm.behaviour_mut().node.rpc.send_request(&relay, frame);
                    pending.insert(id, reply);
                }
                Some(Command::Subscribe { topic }) => {
                    if let Err(e) = swarm.behaviour_mut().node.gossipsub.subscribe(&gossipsub::IdentTopic::new(topic)) {
                        tracing::warn!(error = %e, "could not subscribe");
                    }
                }
                Some(Command::ListenDirect) => {
                    let circuit = relay_address.clone().with(Protocol::P2pCircuit);
                    for addr in [circuit.clone(), circuit.with(Protocol::WebRTC)] {
                        if let Err(e) = swarm.listen_on(addr.clone()) {
                            tracing::info!(%addr, error = %e, "cannot listen for other browsers");
                            set_direct_error(&info, format!("listening on {addr}: {e}"));
                        }
                    }
                }
                Some(Command::DialDirect { peers }) => {
                    for peer in peers {
                        let addr = relay_address
                            .clone()
                            .with(Protocol::P2pCircuit)
                            .with(Protocol::WebRTC)
                            .with(Protocol::P2p(peer));
                        if let Err(e) = swarm.dial(addr.clone()) {
                            tracing::info!(%addr, error = %e, "cannot dial another browser");
                            set_direct_error(&info, format!("dialing {peer}: {e}"));
                        }
                    }
                }
                Some(Command::Theta { peer, frame, reply }) => match swarm.behaviour_mut().theta.as_mut() {
                    Some(theta) => {
                        pending_theta.insert(theta.send_request(&peer, frame), reply);
                    }
                    None => {
                        let _ = reply.send(Err(RpcError::Network("this node does not fetch θ from peers".into())));
                    }
                },
                // Every handle is gone: close the connection.
                None => return,
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(BehaviourEvent::Node(NodeEvent::Rpc(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response },
                    ..
                }))) => {
                    if let Some(reply) = pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Node(NodeEvent::Rpc(request_response::Event::OutboundFailure {
                    request_id, error, ..
                }))) => {
                    if let Some(reply) = pending.remove(&request_id) {
                        let _ = reply.send(Err(RpcError::Network(error.to_string())));
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Theta(request_response::Event::Message {
                    message: request_response::Message::Request { request, channel, .. },
                    ..
                })) => {
                    let answer = served.answer(&request);
                    if let Some(theta) = swarm.behaviour_mut().theta.as_mut() {
                        let _ = theta.send_response(channel, answer);
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Theta(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response },
                    ..
                })) => {
                    if let Some(reply) = pending_theta.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Theta(request_response::Event::OutboundFailure {
                    request_id, error, ..
                })) => {
                    if let Some(reply) = pending_theta.remove(&request_id) {
                        let _ = reply.send(Err(RpcError::Peer(format!("did not answer: {error}"))));
                    }
                }
                // Only the relay's messages are accepted, and so forwarded to linked browsers;
                // others are dropped. A full queue drops the newest (the long poll still finds
                // the round).
                SwarmEvent::Behaviour(BehaviourEvent::Node(NodeEvent::Gossipsub(gossipsub::Event::Message { propagation_source, message_id, message }))) => {
                    let from_relay = message.source == Some(relay);
                    let verdict = if from_relay {
                        gossipsub::MessageAcceptance::Accept
                    } else {
                        tracing::debug!(%propagation_source, source = ?message.source, "gossip not from the relay dropped");
                        gossipsub::MessageAcceptance::Reject
                    };
                    swarm.behaviour_mut().node.gossipsub.report_message_validation_result(&message_id, &propagation_source, verdict);
                    if from_relay {
                        let forwarded_by = (propagation_source != relay).then_some(propagation_source);
                        let _ = gossip
                            .try_send(Gossiped { data: message.data, forwarded_by })
                            .inspect_err(|_| tracing::debug!("gossip queue full; announcement dropped"));
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Node(NodeEvent::Identify(identify::Event::Received { peer_id, info: received, .. })))
                    if peer_id == relay =>
                {
                    if let Ok(mut info) = info.lock() {
                        info.agent = Some(received.agent_version);
                        info.protocols = received.protocols.iter().map(ToString::to_string).collect();
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Node(NodeEvent::Ping(ping::Event { peer, connection, result: Ok(rtt) })))
                    if swarm.behaviour().webrtc.as_ref().is_some_and(|w| w.is_direct(connection)) =>
                {
                    if let Ok(mut info) = info.lock() {
                        info.direct_rtt.insert(peer, rtt);
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Node(NodeEvent::Ping(ping::Event { peer, result: Ok(rtt), .. }))) if peer == relay => {
                    if let Ok(mut info) = info.lock() {
                        info.rtt = Some(rtt);
                    }
                }
                // The relay stopped answering: fail every request now and end this connection
                // (later requests fail as `Closed`); the peer connects again.
                SwarmEvent::Behaviour(BehaviourEvent::Node(NodeEvent::Ping(ping::Event { peer, result: Err(e), .. }))) if peer == relay => {
                    tracing::warn!(error = %e, "the relay stopped answering pings");
                    for (_, reply) in pending.drain() {
                        let _ = reply.send(Err(RpcError::Network(format!("the relay stopped answering pings ({e})"))));
                    }
                    break;
                }
                SwarmEvent::ConnectionClosed { peer_id, cause, num_established, .. } if peer_id == relay => {
                    tracing::debug!(?cause, "connection to the relay closed");
                    // The relay keeps session keys per connection: a redial needs new ones.
                    if num_established == 0
                        && let Ok(mut keys) = keys.lock()
                    {
                        *keys = None;
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } if peer_id != relay => {
                    tracing::info!(%peer_id, addr = %endpoint.get_remote_address(), "connected to another peer");
                    update_direct(&mut swarm, &info);
                }
                SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                    tracing::info!(%peer_id, ?cause, "connection to another peer closed");
                    update_direct(&mut swarm, &info);
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } if peer != relay => {
                    tracing::info!(%peer, %error, "could not connect to another peer");
                    set_direct_error(&info, format!("connecting to {peer}: {error}"));
                }
                _ => {}
            },
        }
    }
}
