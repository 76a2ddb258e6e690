//! `cargo xtask run|test|bench`: the README's commands.
//!
//! Every step installs what it needs first, idempotently: the wasm32 rustup target, the pinned
//! `wasm-bindgen` CLI, Debian packages for the browser tests and npm packages for the browser
//! driver. Its dependencies are `serde_json` and `plotters` (SVG only), so the task runner
//! builds in seconds.
//!
//! One file per command under `commands/` (`bench/` one per benchmark), what they share under
//! `utils/` (processes, installs, JSON).

use std::env;
use std::process::ExitCode;

mod commands;
mod utils;

use commands::{bench::bench, build::build_wasm, fuzz, run::run, test::test};
use utils::{setup_browser, setup_wasm};

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("build-wasm") => setup_wasm().and_then(|()| build_wasm()),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("setup") => setup_wasm().and_then(|()| setup_browser()),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 run          build the browser package and start the relay on http://127.0.0.1:8080 with the runs of relay.toml\n  \
                 test         install test dependencies and run every test (cargo, wasm in Chromium, end-to-end)\n  \
                 bench robust aggregator throughput beside numpy and the attack grid; writes docs/benchmarks/robust.md, attacks.md and attacks-lm.md\n  \
                 bench load   1,000 simulated peers on one relay; writes docs/benchmarks/load.md\n  \
                 bench soak   100,000 fast rounds on one relay: round time, memory, disk; writes docs/benchmarks/soak.md\n  \
                 bench diloco DiLoCo vs data-parallel on the language model; writes docs/benchmarks/diloco.md\n  \
                 bench browser training steps per second in Chromium (WebGPU, CPU), natively and in TF.js; writes docs/benchmarks/browser.md\n  \
                 bench flood  honest round time, a newcomer's first accepted update and memory under hostile floods; writes docs/benchmarks/flood.md\n  \
                 bench verify the relay's checks: the loss check over seeded runs, what a check and a replay cost, a 100-round run catching a sometime cheat; writes docs/benchmarks/verify.md\n  \
                 bench joiners the relay's θ bytes out for 8 browsers joining a round, without and with browser links; writes docs/benchmarks/joiners.md\n  \
                 bench internet the relay on a simulated internet (root): first update, link set-up, θ over direct and TURN links; writes docs/benchmarks/internet.md\n  \
                 build-wasm   build the npm package into web/pkg\n  \
                 fuzz [--seconds N] [TARGET…]  run the cargo fuzz targets N s each (default 60); writes docs/benchmarks/fuzz.md\n  \
                 setup        install the toolchain pieces and browser packages only"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err}");
            ExitCode::FAILURE
        }
    }
}
