//! The libp2p and HTTP pieces that the relay and the peers (native and in the browser) share,
//! above the core and the wire format of `swarmtrain-shared`:
//!
//! - [`codec`]: the request-response frame codec;
//! - [`node`]: the behaviour every node runs (request-response, gossipsub, identify, ping) and
//!   its settings;
//! - [`http`]: the relay's `/api/bootstrap` document, its URLs and (natively) `GET`;
//! - `keyfile` (native): a node's identity seed in a file; `signal` (native): SIGINT or SIGTERM.

pub mod codec;
pub mod http;
#[cfg(not(target_arch = "wasm32"))]
pub mod keyfile;
pub mod node;
#[cfg(not(target_arch = "wasm32"))]
pub mod signal;

pub use codec::FrameCodec;

/// Milliseconds since the Unix epoch on this machine's clock (the relay's and each peer's;
/// signed envelopes expire on the relay's, which peers learn from `/api/bootstrap`).
pub fn unix_ms() -> u64 {
    web_time::SystemTime::now()
        .duration_since(web_time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
pub use http::{Bootstrap, IceServer};
pub use node::{DEFAULT_GOSSIP_FANOUT, Node, NodeEvent};
