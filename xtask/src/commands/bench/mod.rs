//! `cargo xtask bench …`: each benchmark measures the code users run and writes its report
//! under docs/benchmarks/.

mod browser;
mod diloco;
mod load;
mod robust;

use std::fs;
use std::process::Command;

use crate::Result;
use crate::commands::build::{build_relay, build_release_relay_and_peer, build_wasm};
use crate::utils::*;

pub(crate) fn bench(args: &[String]) -> Result {
    match args.first().map(String::as_str) {
        Some("robust") => robust::bench_robust(),
        Some("load") => load::bench_load(),
        Some("diloco") => diloco::bench_diloco(args.get(1).is_some_and(|a| a == "--report-only")),
        Some("soak") => bench_soak(&args[1..]),
        Some("browser") => browser::run(args.get(1).is_some_and(|a| a == "--report-only")),
        Some("flood") => bench_flood(),
        Some("verify") => bench_verify(),
        Some("joiners") => bench_joiners(),
        Some("internet") => bench_internet(),
        _ => Err(
            "usage: cargo xtask bench robust|diloco|load|soak|browser|flood|verify|joiners|internet"
                .into(),
        ),
    }
}

/// The relay's θ bytes out for browsers joining one round, without and with browser-to-browser
/// links (`tests/browser/joiners.mjs` writes docs/benchmarks/joiners.md).
pub(crate) fn bench_joiners() -> Result {
    browser_script(&["joiners.mjs"], &[])
}

/// Builds the package and the relay, then runs `node ARGS` in tests/browser with `envs`.
fn browser_script(args: &[&str], envs: &[(&str, std::path::PathBuf)]) -> Result {
    setup_wasm()?;
    build_wasm()?;
    setup_browser()?;
    let relay = build_relay()?;
    status(
        Command::new("node")
            .args(args)
            .current_dir(root().join("tests/browser"))
            .env("SWARMTRAIN_RELAY_BIN", relay)
            .env("SWARMTRAIN_ROOT", root())
            .envs(envs.iter().map(|(k, v)| (*k, v.as_os_str()))),
    )
}

/// The relay on a simulated internet, five times (`tests/browser/internet.test.mjs`, as root):
/// page load to first accepted update, link set-up and θ's rate over direct and TURN links,
/// written to docs/benchmarks/internet.md.
pub(crate) fn bench_internet() -> Result {
    browser_script(
        &["--test", "internet.test.mjs"],
        &[
            ("SWARMTRAIN_INTERNET_RUNS", "5".into()),
            (
                "SWARMTRAIN_INTERNET_REPORT",
                root().join("docs/benchmarks/internet.md"),
            ),
        ],
    )
}

/// The honest round time with and without a hostile flood (`tests/benches/flood.rs`), written
/// to docs/benchmarks/flood.md.
pub(crate) fn bench_flood() -> Result {
    let report = root().join("docs/benchmarks/flood.md");
    status(
        cargo()
            .args(["bench", "-p", "swarmtrain-tests", "--bench", "flood"])
            .env("SWARMTRAIN_FLOOD_REPORT", &report)
            .env("RUST_LOG", "error"),
    )
}

/// The relay's loss check of honest and false updates over several seeded runs and its cost,
/// the replay check's cost and a 100-round live run at the fraction that catches a peer
/// cheating in 10% of its rounds (`tests/benches/verify.rs`), written to
/// docs/benchmarks/verify.md.
pub(crate) fn bench_verify() -> Result {
    setup_corpus()?;
    let report = root().join("docs/benchmarks/verify.md");
    status(
        cargo()
            .args(["bench", "-p", "swarmtrain-tests", "--bench", "verify"])
            .env("SWARMTRAIN_VERIFY_REPORT", &report)
            .env("RUST_LOG", "error"),
    )
}

/// `swarmtrain-peer soak` on a release build (extra arguments go to it, e.g. `--rounds 20000`).
pub(crate) fn bench_soak(args: &[String]) -> Result {
    build_release_relay_and_peer()?;
    let dir = root().join("docs/benchmarks");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    status(
        Command::new(target_dir().join("release/swarmtrain-peer"))
            .current_dir(root())
            .arg("soak")
            .arg("--out")
            .arg(dir.join("soak.md"))
            .args(args),
    )
}
