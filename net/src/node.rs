//! The libp2p behaviour every swarmtrain node runs, the relay and each peer alike: the
//! request-response protocol (`/swarmtrain/rpc/1`), gossipsub (the relay publishes signed round
//! announcements), identify (agent and protocols, so either side knows what it talks to) and
//! ping (liveness and round-trip time).

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{StreamProtocol, gossipsub, identify, ping};
use swarmtrain_shared::protocol::{MAX_FRAME_BYTES, RPC_PROTOCOL};

use crate::codec::FrameCodec;

/// The protocol version swarmtrain nodes announce in identify.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/swarmtrain/id/1";

/// How long a request may wait for its answer. Long polls for the next round wait up to a round
/// deadline, so this is generous.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(180);

/// How often each side pings the other.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// A ping unanswered for this long means the connection is dead: the client fails its
/// requests at once instead of waiting [`REQUEST_TIMEOUT`] (a relay that died without closing
/// its connections, as WebRTC after a SIGKILL or a half-open TCP connection leave it).
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// How many linked browsers the relay sends each announcement to (gossipsub's default mesh
/// degree); the others receive it over their links.
pub const DEFAULT_GOSSIP_FANOUT: usize = 6;

#[derive(NetworkBehaviour)]
pub struct Node {
    pub rpc: request_response::Behaviour<FrameCodec>,
    pub gossipsub: gossipsub::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").finish_non_exhaustive()
    }
}

impl Node {
    /// `support`: peers only send requests; the relay only answers them. `agent` names this
    /// node in identify (`swarmtrain-relay/0.1.0`, `swarmtrain-peer/0.1.0`). `fanout`: how
    /// many linked browsers the relay sends each announcement to itself
    /// ([`DEFAULT_GOSSIP_FANOUT`]; on browsers, the mesh degree among their links).
    pub fn new(
        support: ProtocolSupport,
        key: &Keypair,
        agent: &str,
        fanout: usize,
    ) -> Result<Self, String> {
        let config = request_response::Config::default()
            .with_request_timeout(REQUEST_TIMEOUT)
            .with_max_concurrent_streams(64);
        // Gossip messages are libp2p-signed; the announcement inside is ML-DSA-signed as well.
        // The relay does not flood: it marks every peer that is not subscribed to
        // `LINKED_TOPIC` as an explicit peer (which gets every message the relay publishes)
        // and sends to `fanout` of the linked browsers, which forward it over their mesh.
        // Browsers validate by hand: only the relay's messages are accepted and forwarded.
        let fanout = fanout.max(1);
        let gossip = gossipsub::ConfigBuilder::default()
            .max_transmit_size(MAX_FRAME_BYTES)
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            .flood_publish(false)
            .mesh_n(fanout)
            .mesh_n_low(fanout.min(5))
            .mesh_n_high(fanout.max(12))
            .mesh_outbound_min((fanout / 2).min(2))
            .heartbeat_interval(Duration::from_secs(1))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            rpc: request_response::Behaviour::new(
                [(StreamProtocol::new(RPC_PROTOCOL), support)],
                config,
            ),
            gossipsub: gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip,
            )?,
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL_VERSION.into(), key.public())
                    .with_agent_version(agent.into()),
            ),
            ping: ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(PING_INTERVAL)
                    .with_timeout(PING_TIMEOUT),
            ),
        })
    }
}
