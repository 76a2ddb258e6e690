//! A per-IP-address connection limit for the relay's libp2p node.
//!
//! libp2p's own [`libp2p::connection_limits`] bounds connections in total, in their handshake
//! and per peer ID, but peer IDs are free: one host can open a connection per throwaway key.
//! This behaviour refuses an inbound connection from an IP address that already holds
//! `max` established connections, as HTTP servers and reverse proxies do per client address.
//! Connections on transports without an IP address (in-memory tests) are not counted.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("{ip} already has {max} connections to this relay")]
pub struct TooManyFromIp {
    pub ip: IpAddr,
    pub max: usize,
}

/// At most `max` established inbound connections per remote IP address.
#[derive(Debug)]
pub struct PerIp {
    max: usize,
    by_ip: HashMap<IpAddr, usize>,
    by_connection: HashMap<ConnectionId, IpAddr>,
}

/// The IP address a multiaddr starts with, if any.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

impl PerIp {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            by_ip: HashMap::new(),
            by_connection: HashMap::new(),
        }
    }

    /// Established inbound connections from `ip` now.
    pub fn connections_from(&self, ip: &IpAddr) -> usize {
        self.by_ip.get(ip).copied().unwrap_or(0)
    }
}

impl NetworkBehaviour for PerIp {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        match ip_of(remote) {
            Some(ip) if self.connections_from(&ip) >= self.max => {
                Err(ConnectionDenied::new(TooManyFromIp { ip, max: self.max }))
            }
            _ => Ok(()),
        }
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // Checked again: many handshakes from one address may finish together.
        match ip_of(remote) {
            Some(ip) if self.connections_from(&ip) >= self.max => {
                Err(ConnectionDenied::new(TooManyFromIp { ip, max: self.max }))
            }
            _ => Ok(dummy::ConnectionHandler),
        }
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            // Counted once every behaviour has accepted the connection.
            FromSwarm::ConnectionEstablished(established) if established.endpoint.is_listener() => {
                if let Some(ip) = ip_of(established.endpoint.get_remote_address()) {
                    *self.by_ip.entry(ip).or_default() += 1;
                    self.by_connection.insert(established.connection_id, ip);
                }
            }
            FromSwarm::ConnectionClosed(closed) => {
                if let Some(ip) = self.by_connection.remove(&closed.connection_id)
                    && let Some(n) = self.by_ip.get_mut(&ip)
                {
                    *n -= 1;
                    if *n == 0 {
                        self.by_ip.remove(&ip);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
