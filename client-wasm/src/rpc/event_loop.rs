//! The task that owns a connection's `Swarm`: it turns [`Command`]s from the
//! [`RelayClient`](super::RelayClient) handles into requests, and swarm events into answers,
//! gossip and [`RelayInfo`] changes (published on a `watch` channel).

use std::collections::HashMap;

use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, identify, ping};
use swarmtrain_net::node::NodeEvent;
use swarmtrain_shared::protocol::LINKED_TOPIC;
use tokio::sync::watch;

use super::signer::SharedKeys;
use super::{Behaviour, BehaviourEvent, Gossiped, RelayInfo, RpcError};
use crate::theta::Served;

/// An answer awaited by a handle: the response's bytes, or why there is none.
pub(super) type Reply = oneshot::Sender<Result<Vec<u8>, RpcError>>;

/// What a handle asks of the event loop.
pub(super) enum Command {
    /// A request frame to the relay.
    Request {
        frame: Vec<u8>,
        reply: Reply,
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
        reply: Reply,
    },
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

/// Whether the loop goes on after an event.
enum Flow {
    Continue,
    /// The relay stopped answering: the connection ends.
    Stop,
}

/// One connection's swarm and what its handles wait for.
pub(super) struct EventLoop {
    pub(super) swarm: Swarm<Behaviour>,
    /// The relay's peer ID and the address it was dialed at.
    pub(super) relay: PeerId,
    pub(super) relay_address: Multiaddr,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) info: watch::Sender<RelayInfo>,
    /// θ this browser serves to linked browsers.
    pub(super) served: Served,
    pub(super) keys: SharedKeys,
    pub(super) gossip: mpsc::Sender<Gossiped>,
    /// Requests to the relay awaiting their response.
    pub(super) pending: HashMap<OutboundRequestId, Reply>,
    /// θ requests to linked browsers awaiting theirs.
    pub(super) pending_theta: HashMap<OutboundRequestId, Reply>,
}

impl EventLoop {
    /// Runs until every handle is dropped or the relay stops answering pings.
    pub(super) async fn run(mut self) {
        loop {
            futures::select! {
                command = self.commands.next() => match command {
                    Some(command) => self.handle_command(command),
                    // Every handle is gone: close the connection.
                    None => return,
                },
                event = self.swarm.select_next_some() => {
                    if let Flow::Stop = self.handle_event(event) {
                        return;
                    }
                }
            }
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Request { frame, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .node
                    .rpc
                    .send_request(&self.relay, frame);
                self.pending.insert(id, reply);
            }
            Command::Subscribe { topic } => {
                let topic = gossipsub::IdentTopic::new(topic);
                if let Err(e) = self.swarm.behaviour_mut().node.gossipsub.subscribe(&topic) {
                    tracing::warn!(error = %e, "could not subscribe");
                }
            }
            Command::ListenDirect => {
                let circuit = self.relay_address.clone().with(Protocol::P2pCircuit);
                for addr in [circuit.clone(), circuit.with(Protocol::WebRTC)] {
                    if let Err(e) = self.swarm.listen_on(addr.clone()) {
                        tracing::info!(%addr, error = %e, "cannot listen for other browsers");
                        self.direct_error(format!("listening on {addr}: {e}"));
                    }
                }
            }
            Command::DialDirect { peers } => {
                for peer in peers {
                    let addr = self
                        .relay_address
                        .clone()
                        .with(Protocol::P2pCircuit)
                        .with(Protocol::WebRTC)
                        .with(Protocol::P2p(peer));
                    if let Err(e) = self.swarm.dial(addr.clone()) {
                        tracing::info!(%addr, error = %e, "cannot dial another browser");
                        self.direct_error(format!("dialing {peer}: {e}"));
                    }
                }
            }
            Command::Theta { peer, frame, reply } => {
                match self.swarm.behaviour_mut().theta.as_mut() {
                    Some(theta) => {
                        self.pending_theta
                            .insert(theta.send_request(&peer, frame), reply);
                    }
                    None => {
                        let _ = reply.send(Err(RpcError::Network(
                            "this node does not fetch θ from peers".into(),
                        )));
                    }
                }
            }
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) -> Flow {
        let relay = self.relay;
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Node(event)) => return self.node_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Theta(event)) => self.theta_event(event),
            SwarmEvent::ConnectionClosed {
                peer_id,
                cause,
                num_established,
                ..
            } if peer_id == relay => {
                tracing::debug!(?cause, "connection to the relay closed");
                // The relay keeps session keys per connection: a redial needs new ones.
                if num_established == 0
                    && let Ok(mut keys) = self.keys.lock()
                {
                    *keys = None;
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } if peer_id != relay => {
                tracing::info!(%peer_id, addr = %endpoint.get_remote_address(), "connected to another peer");
                self.update_direct();
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                tracing::info!(%peer_id, ?cause, "connection to another peer closed");
                self.update_direct();
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } if peer != relay => {
                tracing::info!(%peer, %error, "could not connect to another peer");
                self.direct_error(format!("connecting to {peer}: {error}"));
            }
            _ => {}
        }
        Flow::Continue
    }

    /// The relay's request-response, gossip, identify and ping.
    fn node_event(&mut self, event: NodeEvent) -> Flow {
        let relay = self.relay;
        match event {
            NodeEvent::Rpc(request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            }) => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            NodeEvent::Rpc(request_response::Event::OutboundFailure {
                request_id, error, ..
            }) => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(RpcError::Network(error.to_string())));
                }
            }
            NodeEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.gossip_message(propagation_source, message_id, message),
            NodeEvent::Identify(identify::Event::Received {
                peer_id,
                info: received,
                ..
            }) if peer_id == relay => self.info.send_modify(|info| {
                info.agent = Some(received.agent_version);
                info.protocols = received.protocols.iter().map(ToString::to_string).collect();
            }),
            NodeEvent::Ping(ping::Event {
                peer,
                connection,
                result: Ok(rtt),
            }) if self
                .swarm
                .behaviour()
                .webrtc
                .as_ref()
                .is_some_and(|w| w.is_direct(connection)) =>
            {
                self.info.send_modify(|info| {
                    info.direct_rtt.insert(peer, rtt);
                });
            }
            NodeEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) if peer == relay => self.info.send_modify(|info| info.rtt = Some(rtt)),
            // The relay stopped answering: fail every request now and end this connection
            // (later requests fail as `Closed`); the peer connects again.
            NodeEvent::Ping(ping::Event {
                peer,
                result: Err(e),
                ..
            }) if peer == relay => {
                tracing::warn!(error = %e, "the relay stopped answering pings");
                for (_, reply) in self.pending.drain() {
                    let _ = reply.send(Err(RpcError::Network(format!(
                        "the relay stopped answering pings ({e})"
                    ))));
                }
                return Flow::Stop;
            }
            _ => {}
        }
        Flow::Continue
    }

    /// Only the relay's messages are accepted, and so forwarded to linked browsers; others are
    /// dropped. A full queue drops the newest (the long poll still finds the round).
    fn gossip_message(
        &mut self,
        propagation_source: PeerId,
        message_id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
        let from_relay = message.source == Some(self.relay);
        let verdict = if from_relay {
            gossipsub::MessageAcceptance::Accept
        } else {
            tracing::debug!(%propagation_source, source = ?message.source, "gossip not from the relay dropped");
            gossipsub::MessageAcceptance::Reject
        };
        self.swarm
            .behaviour_mut()
            .node
            .gossipsub
            .report_message_validation_result(&message_id, &propagation_source, verdict);
        if from_relay {
            let forwarded_by = (propagation_source != self.relay).then_some(propagation_source);
            let _ = self
                .gossip
                .try_send(Gossiped {
                    data: message.data,
                    forwarded_by,
                })
                .inspect_err(|_| tracing::debug!("gossip queue full; announcement dropped"));
        }
    }

    /// θ between linked browsers: requests answered from what this browser serves, and the
    /// answers to its own.
    fn theta_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message {
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let answer = self.served.answer(&request);
                if let Some(theta) = self.swarm.behaviour_mut().theta.as_mut() {
                    let _ = theta.send_response(channel, answer);
                }
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.pending_theta.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(reply) = self.pending_theta.remove(&request_id) {
                    let _ = reply.send(Err(RpcError::Peer(format!("did not answer: {error}"))));
                }
            }
            _ => {}
        }
    }

    fn direct_error(&self, error: String) {
        self.info
            .send_modify(|info| info.direct_error = Some(error));
    }

    /// Records the browsers this one is linked to, and subscribes to [`LINKED_TOPIC`] while
    /// there is at least one (so that the relay leaves this peer's announcements to the mesh).
    fn update_direct(&mut self) {
        let peers = self
            .swarm
            .behaviour()
            .webrtc
            .as_ref()
            .map(|w| w.direct_peers())
            .unwrap_or_default();
        let linked = gossipsub::IdentTopic::new(LINKED_TOPIC);
        let gossipsub = &mut self.swarm.behaviour_mut().node.gossipsub;
        if peers.is_empty() {
            gossipsub.unsubscribe(&linked);
        } else if let Err(e) = gossipsub.subscribe(&linked) {
            tracing::warn!(error = %e, "could not subscribe to the linked topic");
        }
        self.info.send_modify(|info| {
            info.direct_rtt.retain(|p, _| peers.contains(p));
            info.direct_peers = peers;
        });
    }
}
