//! `cargo xtask run`: the browser package, then the relay with relay.toml's runs.

use std::process::Command;

use crate::Result;
use crate::commands::build::{build_relay, build_wasm};
use crate::utils::*;

/// The relay with the two runs of `relay.toml` (the language model, then the digits), unless
/// the arguments name another config file.
pub(crate) fn run(args: &[String]) -> Result {
    setup_wasm()?;
    setup_corpus()?;
    build_wasm()?;
    let relay = build_relay()?;
    let mut cmd = Command::new(relay);
    cmd.current_dir(root()).arg("serve");
    if !args.iter().any(|a| a == "--config") && std::env::var_os("SWARMTRAIN_CONFIG").is_none() {
        cmd.arg("--config").arg(root().join("relay.toml"));
    }
    status(cmd.args(args))
}
