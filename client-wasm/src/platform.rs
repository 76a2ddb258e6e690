//! The platform shim: the only place in the client that names a target.
//!
//! `native` and `web` export the same names: `sleep`, `yield_now`, `spawn`, `build_swarm`,
//! `http_get`, `TRANSPORTS` (which of the relay's addresses to dial), `can_dial` and `platform`. The browser facade
//! (`Trainer`, its training worker and `TrainingBench`, exported to JavaScript) lives in `web`.

#[cfg(not(target_arch = "wasm32"))]
#[path = "platform/native.rs"]
mod imp;
#[cfg(target_arch = "wasm32")]
#[path = "platform/web.rs"]
mod imp;

pub use imp::*;
