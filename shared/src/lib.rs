//! swarmtrain's shared core: the wire format, identities and signatures, the model, the data
//! pipeline, the inner training loop, the DiLoCo outer step, aggregation and the round state
//! machine.
//!
//! Everything here is pure: no I/O, no runtime, no target-specific code. The browser client,
//! the native volunteers, the relay and the tests all call this crate unchanged. Model and
//! training code is generic over Burn's `Backend`; only entry points name a backend.

pub mod admission;
pub mod aggregate;
pub mod attack;
pub mod checkpoint;
pub mod compress;
pub mod crypto;
pub mod data;
pub mod exact;
pub mod leaves;
pub mod lm;
pub mod lm_train;
pub mod model;
pub mod outer;
pub mod params;
pub mod privacy;
pub mod protocol;
pub mod replay;
pub mod robust;
pub mod round;
pub mod seal;
pub mod sim;
pub mod text;
pub mod train;
pub mod transfer;
pub mod verify;

pub use crypto::{Identity, PeerKey, Signed};
