//! The `/webrtc-signaling/0.0.1` side of browser-to-browser WebRTC, as a `NetworkBehaviour`:
//! it opens signaling streams on relayed connections for the transport's dials (dialing the
//! relayed address first where there is no such connection yet), hands inbound signaling
//! streams to the transport while it listens, and closes a relayed connection once a direct
//! one to the same peer exists, so the relay's circuit carries only the signaling.
//!
//! The SDP and ICE exchange itself happens in the transport (`webrtc::transport`, browser
//! only); this part is plain libp2p and compiles everywhere.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::StreamExt;
use futures::channel::mpsc;
use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    CloseConnection, ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId,
    FromSwarm, NetworkBehaviour, NotifyHandler, Stream, StreamProtocol, SubstreamProtocol,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/webrtc-signaling/0.0.1");

/// From the transport.
#[derive(Debug)]
pub enum Request {
    /// Open a signaling stream to `peer`, over `relayed` (a `/p2p-circuit/p2p/<peer>` address)
    /// if there is no relayed connection yet.
    Dial {
        id: u64,
        peer: PeerId,
        relayed: Multiaddr,
    },
    /// Whether inbound signaling streams are wanted.
    Listen(bool),
}

/// To the transport.
#[derive(Debug)]
pub enum Signaling {
    /// The stream for dial `id`: we send the offer.
    Outbound {
        id: u64,
        stream: Stream,
    },
    /// A peer wants to connect: we answer. `relayed` is the relayed address it came over.
    Inbound {
        peer: PeerId,
        relayed: Multiaddr,
        stream: Stream,
    },
    Failed {
        id: u64,
        error: String,
    },
}

/// Whether `addr` goes through a circuit relay (and is not itself a direct WebRTC address).
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit) && !is_webrtc(addr)
}

/// Whether `addr` is a browser-to-browser WebRTC address.
pub fn is_webrtc(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::WebRTC)
}

/// `…/p2p-circuit/webrtc/p2p/<peer>` → (`…/p2p-circuit/p2p/<peer>`, peer).
pub fn parse_dial(addr: &Multiaddr) -> Option<(Multiaddr, PeerId)> {
    let mut parts: Vec<Protocol<'_>> = addr.iter().collect();
    let Some(Protocol::P2p(peer)) = parts.pop() else {
        return None;
    };
    if parts.pop() != Some(Protocol::WebRTC) || !parts.contains(&Protocol::P2pCircuit) {
        return None;
    }
    let relayed = parts
        .into_iter()
        .chain([Protocol::P2p(peer)])
        .collect::<Multiaddr>();
    Some((relayed, peer))
}

/// `…/p2p-circuit/webrtc` (or a bare `/webrtc`).
pub fn is_listen_addr(addr: &Multiaddr) -> bool {
    let parts: Vec<Protocol<'_>> = addr.iter().collect();
    parts.last() == Some(&Protocol::WebRTC)
        && (parts.len() == 1 || parts[parts.len() - 2] == Protocol::P2pCircuit)
}

pub struct Behaviour {
    requests: mpsc::Receiver<Request>,
    to_transport: mpsc::Sender<Signaling>,
    listening: bool,
    /// Relayed connections per peer, with the address each came over.
    relayed: HashMap<PeerId, Vec<(ConnectionId, Multiaddr)>>,
    /// Peers we also hold a direct WebRTC connection to.
    direct: HashMap<PeerId, HashSet<ConnectionId>>,
    /// Dials waiting for a relayed connection to their peer.
    waiting: HashMap<PeerId, Vec<u64>>,
    /// Relayed dials in progress, for their failures.
    dialing: HashMap<ConnectionId, PeerId>,
    actions: VecDeque<ToSwarm<Infallible, u64>>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("listening", &self.listening)
            .field("relayed", &self.relayed.len())
            .field("direct", &self.direct.len())
            .finish_non_exhaustive()
    }
}

impl Behaviour {
    pub fn new(requests: mpsc::Receiver<Request>, to_transport: mpsc::Sender<Signaling>) -> Self {
        Self {
            requests,
            to_transport,
            listening: false,
            relayed: HashMap::new(),
            direct: HashMap::new(),
            waiting: HashMap::new(),
            dialing: HashMap::new(),
            actions: VecDeque::new(),
        }
    }

    /// Whether `connection` is a direct WebRTC connection.
    pub fn is_direct(&self, connection: ConnectionId) -> bool {
        self.direct.values().any(|set| set.contains(&connection))
    }

    /// The peers this node holds a direct WebRTC connection to.
    pub fn direct_peers(&self) -> Vec<PeerId> {
        self.direct.keys().copied().collect()
    }

    /// Hands `signaling` to the transport; when its queue is full the stream is dropped (and
    /// the dial it was for times out).
    fn hand_over(&mut self, signaling: Signaling) {
        if let Err(e) = self.to_transport.try_send(signaling) {
            tracing::info!("WebRTC signaling queue full: {:?} dropped", e.into_inner());
        }
    }

    fn fail(&mut self, id: u64, error: String) {
        self.hand_over(Signaling::Failed { id, error });
    }

    fn close_relayed(&mut self, peer: PeerId) {
        if self.direct.get(&peer).is_none_or(HashSet::is_empty) {
            return;
        }
        for (connection, _) in self.relayed.get(&peer).into_iter().flatten() {
            self.actions.push_back(ToSwarm::CloseConnection {
                peer_id: peer,
                connection: CloseConnection::One(*connection),
            });
        }
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Listen(on) => self.listening = on,
            Request::Dial { id, peer, relayed } => {
                if let Some((connection, _)) = self.relayed.get(&peer).and_then(|c| c.first()) {
                    self.actions.push_back(ToSwarm::NotifyHandler {
                        peer_id: peer,
                        handler: NotifyHandler::One(*connection),
                        event: id,
                    });
                    return;
                }
                let waiting = self.waiting.entry(peer).or_default();
                waiting.push(id);
                if waiting.len() == 1 {
                    // Always: the transport's own dial of this peer is in progress.
                    let opts = DialOpts::peer_id(peer)
                        .addresses(vec![relayed])
                        .condition(PeerCondition::Always)
                        .build();
                    self.dialing.insert(opts.connection_id(), peer);
                    self.actions.push_back(ToSwarm::Dial { opts });
                }
            }
        }
    }

    fn on_established(&mut self, peer: PeerId, connection: ConnectionId, addr: &Multiaddr) {
        self.dialing.remove(&connection);
        if is_webrtc(addr) {
            self.direct.entry(peer).or_default().insert(connection);
            self.close_relayed(peer);
        } else if is_relayed(addr) {
            self.relayed
                .entry(peer)
                .or_default()
                .push((connection, addr.clone()));
            for id in self.waiting.remove(&peer).unwrap_or_default() {
                self.actions.push_back(ToSwarm::NotifyHandler {
                    peer_id: peer,
                    handler: NotifyHandler::One(connection),
                    event: id,
                });
            }
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        local_addr: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::new(is_relayed(local_addr)))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        addr: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::new(is_relayed(addr)))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                let addr = match e.endpoint {
                    libp2p::core::ConnectedPoint::Dialer { address, .. } => address,
                    libp2p::core::ConnectedPoint::Listener { local_addr, .. } => local_addr,
                };
                self.on_established(e.peer_id, e.connection_id, addr);
            }
            FromSwarm::ConnectionClosed(e) => {
                if let Some(list) = self.relayed.get_mut(&e.peer_id) {
                    list.retain(|(c, _)| *c != e.connection_id);
                    if list.is_empty() {
                        self.relayed.remove(&e.peer_id);
                    }
                }
                if let Some(set) = self.direct.get_mut(&e.peer_id) {
                    set.remove(&e.connection_id);
                    if set.is_empty() {
                        self.direct.remove(&e.peer_id);
                    }
                }
            }
            FromSwarm::DialFailure(e) => {
                if let Some(peer) = self.dialing.remove(&e.connection_id) {
                    for id in self.waiting.remove(&peer).unwrap_or_default() {
                        self.fail(id, format!("no relayed connection to {peer}: {}", e.error));
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            HandlerEvent::Outbound(id, stream) => {
                self.hand_over(Signaling::Outbound { id, stream });
            }
            HandlerEvent::Failed(id, error) => self.fail(id, error),
            HandlerEvent::Inbound(stream) => {
                let relayed = self
                    .relayed
                    .get(&peer)
                    .and_then(|list| list.iter().find(|(c, _)| *c == connection))
                    .map(|(_, addr)| addr.clone());
                match relayed {
                    Some(relayed) if self.listening => {
                        self.hand_over(Signaling::Inbound {
                            peer,
                            relayed,
                            stream,
                        });
                    }
                    _ => tracing::debug!(%peer, "signaling stream refused: not listening"),
                }
            }
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        while let Poll::Ready(Some(request)) = self.requests.poll_next_unpin(cx) {
            self.on_request(request);
        }
        match self.actions.pop_front() {
            Some(action) => Poll::Ready(action),
            None => Poll::Pending,
        }
    }
}

#[derive(Debug)]
pub enum HandlerEvent {
    Outbound(u64, Stream),
    Inbound(Stream),
    Failed(u64, String),
}

/// Opens signaling streams when told to and takes the remote's on relayed connections.
#[derive(Debug)]
pub struct Handler {
    relayed: bool,
    to_open: VecDeque<u64>,
    events: VecDeque<HandlerEvent>,
}

impl Handler {
    fn new(relayed: bool) -> Self {
        Self {
            relayed,
            to_open: VecDeque::new(),
            events: VecDeque::new(),
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = u64;
    type ToBehaviour = HandlerEvent;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = u64;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, ()> {
        SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL), ())
    }

    fn connection_keep_alive(&self) -> bool {
        !self.to_open.is_empty()
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, u64, HandlerEvent>> {
        if let Some(event) = self.events.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(event));
        }
        if let Some(id) = self.to_open.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL), id),
            });
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, id: u64) {
        self.to_open.push_back(id);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), u64>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                info: id,
            }) => self.events.push_back(HandlerEvent::Outbound(id, stream)),
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) if self.relayed => self.events.push_back(HandlerEvent::Inbound(stream)),
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info: id, error }) => {
                self.events.push_back(HandlerEvent::Failed(
                    id,
                    format!("signaling stream: {error}"),
                ))
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let relay: PeerId = PeerId::random();
        let peer: PeerId = PeerId::random();
        let dial: Multiaddr =
            format!("/ip4/127.0.0.1/tcp/1/ws/p2p/{relay}/p2p-circuit/webrtc/p2p/{peer}")
                .parse()
                .unwrap();
        let (relayed, to) = parse_dial(&dial).unwrap();
        assert_eq!(to, peer);
        assert_eq!(
            relayed.to_string(),
            format!("/ip4/127.0.0.1/tcp/1/ws/p2p/{relay}/p2p-circuit/p2p/{peer}")
        );
        assert!(is_listen_addr(
            &format!("/ip4/127.0.0.1/tcp/1/ws/p2p/{relay}/p2p-circuit/webrtc")
                .parse()
                .unwrap()
        ));
        assert!(!is_listen_addr(
            &format!("/ip4/127.0.0.1/tcp/1/ws/p2p/{relay}/p2p-circuit")
                .parse()
                .unwrap()
        ));
    }
}
