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

/// A STUN or TURN server for ICE (`RTCIceServer`). Without any, peers offer host candidates
/// only, which connect on one network; across NATs a deployment needs STUN, and TURN where
/// STUN cannot punch through.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(target_arch = "wasm32", derive(tsify_next::Tsify))]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(target_arch = "wasm32", tsify(optional))]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(target_arch = "wasm32", tsify(optional))]
    pub credential: Option<String>,
}
