//! Native platform: tokio, TCP to the relay, reqwest for HTTP (`swarmtrain_net::http::get`).

use std::future::Future;
use std::time::Duration;

use libp2p::{Swarm, identity::Keypair, noise, tcp, yamux};

use crate::rpc::Behaviour;

/// The relay's advertised transports this platform can dial, in order of preference.
pub const TRANSPORTS: &[&str] = &["tcp"];
/// Whether this platform may dial `address` (natively: any address of its transports).
pub fn can_dial(_address: &str) -> bool {
    true
}

/// Platform description reported in `Join`.
pub fn platform() -> String {
    format!("native {} {}", std::env::consts::OS, std::env::consts::ARCH)
}

pub async fn sleep(duration: Duration) {
    tokio::time::sleep(duration).await;
}

/// Lets the runtime's other tasks (the connection to the relay) run between training steps.
pub async fn yield_now() {
    tokio::task::yield_now().await;
}

pub fn spawn<F: Future<Output = ()> + Send + 'static>(future: F) {
    tokio::spawn(future);
}

/// TCP to the relay, and circuits through it (so a native peer can hold a reservation, as a
/// browser does; `_ice_servers` are for browser-to-browser WebRTC, which native peers lack).
pub fn build_swarm(
    keypair: Keypair,
    mut behaviour: Behaviour,
    idle: Duration,
    _ice_servers: Vec<crate::webrtc::IceServer>,
) -> Result<Swarm<Behaviour>, String> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| e.to_string())?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| e.to_string())?
        .with_behaviour(|_, relay_client| {
            behaviour.relay_client = Some(relay_client).into();
            behaviour
        })
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build())
}

pub async fn http_get(url: &str) -> Result<Vec<u8>, String> {
    swarmtrain_net::http::get(url).await
}
