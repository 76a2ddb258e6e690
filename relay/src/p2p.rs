//! The relay's libp2p node: TCP for native peers, WebSocket for browsers, noise + yamux, and
//! the request-response protocol. Each inbound request is handled by the coordinator
//! concurrently; the event loop sends the answers back as they complete.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{Future, StreamExt};
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm, identity::Keypair, noise, tcp, yamux};
use swarmtrain_client::rpc::{Behaviour, BehaviourEvent};
use tokio::sync::watch;

use crate::coordinator::Coordinator;

/// At most this many requests are handled (or parked as long polls) at once.
const MAX_IN_FLIGHT: usize = 4096;

pub async fn build_swarm(keypair: Keypair) -> anyhow::Result<Swarm<Behaviour>> {
    let agent = format!("swarmtrain-relay/{}", env!("CARGO_PKG_VERSION"));
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)?
        .with_websocket(noise::Config::new, yamux::Config::default)
        .await?
        .with_behaviour(|key| Behaviour::new(ProtocolSupport::Inbound, key.public(), &agent))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build())
}

type Pending = Pin<Box<dyn Future<Output = (ResponseChannel<Vec<u8>>, Vec<u8>)> + Send>>;

/// Runs the node until `shutdown` flips to true.
pub async fn run(mut swarm: Swarm<Behaviour>, coordinator: Arc<Coordinator>, mut shutdown: watch::Receiver<bool>) {
    let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
    let max_wait = Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            Some((channel, frame)) = pending.next(), if !pending.is_empty() => {
                if swarm.behaviour_mut().rpc.send_response(channel, frame).is_err() {
                    tracing::debug!("peer went away before its answer was sent");
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(BehaviourEvent::Rpc(request_response::Event::Message {
                    peer,
                    message: request_response::Message::Request { request, channel, .. },
                    ..
                })) => {
                    if pending.len() >= MAX_IN_FLIGHT {
                        tracing::warn!(%peer, "too many requests in flight; dropping one");
                        continue;
                    }
                    let coordinator = coordinator.clone();
                    pending.push(Box::pin(async move {
                        let answer = coordinator.handle(&request, max_wait).await;
                        (channel, answer)
                    }));
                }
                SwarmEvent::Behaviour(BehaviourEvent::Rpc(request_response::Event::InboundFailure { peer, error, .. })) => {
                    tracing::debug!(%peer, %error, "inbound request failed");
                }
                SwarmEvent::NewListenAddr { address, .. } => tracing::debug!(%address, "listening"),
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                    tracing::debug!(%peer_id, addr = %endpoint.get_remote_address(), "connection established");
                }
                _ => {}
            },
        }
    }
}

/// Waits for the swarm's first listen address on each of `listeners` and returns them.
pub async fn listen(swarm: &mut Swarm<Behaviour>, listeners: &[Multiaddr]) -> anyhow::Result<Vec<Multiaddr>> {
    for addr in listeners {
        swarm.listen_on(addr.clone())?;
    }
    let mut bound = Vec::new();
    while bound.len() < listeners.len() {
        match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await? {
            SwarmEvent::NewListenAddr { address, .. } => bound.push(address),
            SwarmEvent::ListenerError { error, .. } => anyhow::bail!("listener failed: {error}"),
            _ => {}
        }
    }
    Ok(bound)
}
