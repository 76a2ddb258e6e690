//! The swarmtrain training peer.
//!
//! In a browser this is the npm package `swarmtrain`: `Trainer.connect({ relay })`, then
//! `start()`, joins the relay's run and trains on WebGPU (or on the CPU where WebGPU is
//! missing), in a Web Worker when given one ([`local`]).
//! Natively the same code is a volunteer worker and the peer of the in-process tests:
//! [`peer::run`] over any Burn autodiff backend.
//!
//! [`platform`] is the only module that knows which target it is compiled for.

pub mod bench;
pub mod edge;
pub mod flag;
pub mod local;
pub mod peer;
pub mod platform;
pub mod replica;
pub mod rpc;
pub mod theta;
pub mod verifier;
pub mod webrtc;

pub use flag::Flag;
pub use peer::{PeerConfig, PeerError, PeerEvent};
