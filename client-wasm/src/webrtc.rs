//! Browser-to-browser WebRTC to the libp2p spec (libp2p/specs `webrtc/webrtc.md`), which
//! rust-libp2p 0.57 does not have (libp2p/rust-libp2p#4389):
//!
//! - [`message`]: the signaling and data-channel protobuf messages;
//! - [`stream`]: a libp2p stream over one data channel (framing, `FIN`/`FIN_ACK`, reset);
//! - [`signaling`]: the `/webrtc-signaling/0.0.1` behaviour on relayed connections;
//! - in the browser only, [`transport`] (dial and listen through a circuit relay),
//!   `handshake` (SDP offer/answer and ICE trickle), `connection` (a `StreamMuxer` over an
//!   `RTCPeerConnection`) and `channel` (an `RTCDataChannel` as a [`stream::Channel`]).
//!
//! The first three are plain Rust and tested natively.

pub mod message;
pub mod signaling;
pub mod stream;

#[cfg(target_arch = "wasm32")]
pub mod channel;
#[cfg(target_arch = "wasm32")]
mod connection;
#[cfg(target_arch = "wasm32")]
mod handshake;
#[cfg(target_arch = "wasm32")]
pub mod transport;

/// A STUN or TURN server for ICE (`RTCIceServer`); the relay's bootstrap document carries the
/// operator's.
pub use swarmtrain_net::IceServer;

/// How a direct link reaches the other browser: the ICE candidate pair its peer connection
/// selected (`getStats`), so a page, a test or an operator sees whether it went straight
/// (`host`), through the NATs' mappings (`srflx`, `prflx`) or through a TURN server (`relay`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(target_arch = "wasm32", derive(tsify_next::Tsify))]
pub struct LinkPath {
    /// This side's candidate type: `host`, `srflx`, `prflx` or `relay`.
    pub local: String,
    /// The other side's candidate type.
    pub remote: String,
    /// This side's candidate address (`ip:port`; the TURN server's relayed address for `relay`).
    pub local_address: String,
    /// The other side's candidate address.
    pub remote_address: String,
    /// `udp` or `tcp`.
    pub protocol: String,
}

impl LinkPath {
    /// `relay` when either side relays through TURN, else `direct`.
    pub fn kind(&self) -> &'static str {
        if self.local == "relay" || self.remote == "relay" {
            "relay"
        } else {
            "direct"
        }
    }
}

/// The paths of the links this node set up, by the other browser's peer ID (newest kept; the
/// transport records them, the peer's `direct` event reads them).
static PATHS: std::sync::Mutex<Vec<(libp2p::PeerId, LinkPath)>> = std::sync::Mutex::new(Vec::new());

/// At most this many paths are remembered.
const MAX_PATHS: usize = 64;

/// Records the path of a new link to `peer`.
pub fn record_path(peer: libp2p::PeerId, path: LinkPath) {
    if let Ok(mut paths) = PATHS.lock() {
        paths.retain(|(p, _)| *p != peer);
        if paths.len() >= MAX_PATHS {
            paths.remove(0);
        }
        paths.push((peer, path));
    }
}

/// The path of the newest link to `peer`, if this node set one up.
pub fn path_of(peer: &libp2p::PeerId) -> Option<LinkPath> {
    PATHS
        .lock()
        .ok()?
        .iter()
        .find(|(p, _)| p == peer)
        .map(|(_, path)| path.clone())
}
