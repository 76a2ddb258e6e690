//! What the commands share.

mod json;
mod process;
mod setup;

pub(crate) use json::*;
pub(crate) use process::*;
pub(crate) use setup::*;
