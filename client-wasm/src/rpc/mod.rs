//! The peer ↔ relay exchange over libp2p request-response.
//!
//! Each request and each response is one postcard frame of at most
//! [`MAX_FRAME_BYTES`](swarmtrain_shared::protocol::MAX_FRAME_BYTES) (16 KiB, WebRTC's limit);
//! longer input is refused without being buffered. Longer signed messages go in parts, and θ
//! comes in chunks. Round announcements also arrive by gossipsub.
//!
//! [`RelayClient`] is a cloneable handle; an [`EventLoop`] task owns the `Swarm`, answers the
//! handle's commands through oneshot channels and publishes [`RelayInfo`] (the relay's agent
//! and round trip, the direct links) on a `watch` channel. The handle signs for one identity:
//! its libp2p key is derived from the identity's seed (`signer`). θ from linked browsers is
//! fetched by [`RelayClient::fetch_params_anywhere`] (in `crate::theta`) through
//! [`RelayClient::ask_peer`] and [`RelayClient::relay_range`].

mod event_loop;
mod signer;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use futures::{SinkExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{Multiaddr, PeerId, StreamProtocol, relay};
use swarmtrain_shared::Identity;
use swarmtrain_shared::protocol::{
    self, Fetch, MAX_MESSAGE_BYTES, ParamsHash, RelayToClient, Request, Submission, WireError,
};
use swarmtrain_shared::seal::{self};
use tokio::sync::watch;

use swarmtrain_net::codec::FrameCodec;
use swarmtrain_net::node::{DEFAULT_GOSSIP_FANOUT, Node};

use crate::platform;
use crate::theta::{Served, THETA_PROTOCOL, THETA_TIMEOUT, ThetaAnswer, ThetaRequest};
use event_loop::{Command, EventLoop};
use signer::{SharedKeys, Signer};

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
    info: watch::Receiver<RelayInfo>,
    gossip: Arc<futures::lock::Mutex<mpsc::Receiver<Gossiped>>>,
    signer: Arc<Signer>,
    served: Served,
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
        let (info_tx, info) = watch::channel(RelayInfo::default());
        let (gossip_tx, gossip) = mpsc::channel(GOSSIP_QUEUE);
        let served = Served::default();
        let keys: SharedKeys = Arc::new(Mutex::new(None));
        platform::spawn(
            EventLoop {
                swarm,
                relay,
                relay_address: address,
                commands: receiver,
                info: info_tx,
                served: served.clone(),
                keys: keys.clone(),
                gossip: gossip_tx,
                pending: HashMap::new(),
                pending_theta: HashMap::new(),
            }
            .run(),
        );
        Ok(Self {
            commands,
            info,
            gossip: Arc::new(futures::lock::Mutex::new(gossip)),
            served,
            signer: Arc::new(Signer::new(identity, peer_id, keys)),
        })
    }

    /// This connection's libp2p peer ID (derived from the identity).
    pub fn peer_id(&self) -> PeerId {
        self.signer.peer_id()
    }

    /// The identity this handle signs for.
    pub fn identity(&self) -> &Identity {
        self.signer.identity()
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

    /// What identify and ping have told about the relay, and the direct links, so far.
    pub fn relay_info(&self) -> RelayInfo {
        self.info.borrow().clone()
    }

    /// The same, as it changes: a receiver whose `changed()` resolves at the next change (or
    /// errs once the connection has ended).
    pub fn watch_info(&self) -> watch::Receiver<RelayInfo> {
        self.info.clone()
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
    pub(crate) async fn relay_range(
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

    /// One θ request to a linked browser.
    pub(crate) async fn ask_peer(
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

    /// The θ versions this browser serves to linked browsers.
    pub(crate) fn served(&self) -> &Served {
        &self.served
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

pub(crate) fn unexpected(what: &str) -> RpcError {
    RpcError::Wire(WireError::Malformed(format!("expected {what}")))
}
