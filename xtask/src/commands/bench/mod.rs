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

/// A benchmark: its name after `cargo xtask bench`, what it measures and writes (the usage
/// line), and what runs it with the arguments after its name.
pub(crate) struct Bench {
    pub name: &'static str,
    pub about: &'static str,
    run: fn(&[String]) -> Result,
}

fn report_only(args: &[String]) -> bool {
    args.first().is_some_and(|a| a == "--report-only")
}

/// Every benchmark: `cargo xtask bench NAME` runs the one named, `cargo xtask` lists them all.
pub(crate) const BENCHES: &[Bench] = &[
    Bench {
        name: "robust",
        about: "aggregator throughput beside numpy and the attack grid; writes docs/benchmarks/robust.md, attacks.md and attacks-lm.md",
        run: |_| robust::bench_robust(),
    },
    Bench {
        name: "load",
        about: "1,000 simulated peers on one relay (docs/benchmarks/load.md); with --relays N --peers M, M peers on the N edges of a root (a row of docs/benchmarks/federation.md)",
        run: load::bench_load,
    },
    Bench {
        name: "soak",
        about: "100,000 fast rounds on one relay: round time, memory, disk; writes docs/benchmarks/soak.md",
        run: bench_soak,
    },
    Bench {
        name: "diloco",
        about: "DiLoCo vs data-parallel on the language model; writes docs/benchmarks/diloco.md",
        run: |args| diloco::bench_diloco(report_only(args)),
    },
    Bench {
        name: "browser",
        about: "training steps per second in Chromium (WebGPU, CPU), natively and in TF.js, and the package's size on the wire; writes docs/benchmarks/browser.md",
        run: |args| browser::run(report_only(args)),
    },
    Bench {
        name: "flood",
        about: "honest round time, a newcomer's first accepted update and memory under hostile floods; writes docs/benchmarks/flood.md",
        run: |_| bench_flood(),
    },
    Bench {
        name: "ledger",
        about: "the federation's shared ledger (PostgreSQL) against a relay's own (redb): writes and credit reads for 10,000 peers; writes docs/benchmarks/ledger.md",
        run: |_| bench_ledger(),
    },
    Bench {
        name: "verify",
        about: "the relay's checks: the loss check over seeded runs, what a check and a replay cost, a 100-round run catching a sometime cheat; writes docs/benchmarks/verify.md",
        run: |_| bench_verify(),
    },
    Bench {
        name: "joiners",
        about: "the relay's θ bytes out for 8 browsers joining a round, without and with browser links; writes docs/benchmarks/joiners.md",
        run: |_| bench_joiners(),
    },
    Bench {
        name: "internet",
        about: "the relay on a simulated internet (root): first update, link set-up, θ over direct and TURN links; writes docs/benchmarks/internet.md",
        run: |_| bench_internet(),
    },
];

pub(crate) fn bench(args: &[String]) -> Result {
    let name = args.first().map(String::as_str).unwrap_or_default();
    match BENCHES.iter().find(|b| b.name == name) {
        Some(bench) => (bench.run)(&args[1..]),
        None => Err(format!(
            "usage: cargo xtask bench {}",
            BENCHES.iter().map(|b| b.name).collect::<Vec<_>>().join("|")
        )),
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

/// The shared ledger in PostgreSQL against the data directory's, on the same signed entries
/// (`tests/benches/ledger.rs`), written to docs/benchmarks/ledger.md.
pub(crate) fn bench_ledger() -> Result {
    let postgres = setup_postgres()?;
    let report = root().join("docs/benchmarks/ledger.md");
    status(
        cargo()
            .args(["bench", "-p", "swarmtrain-tests", "--bench", "ledger"])
            .env("SWARMTRAIN_LEDGER_REPORT", &report)
            .env("SWARMTRAIN_POSTGRES_BIN", postgres)
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
