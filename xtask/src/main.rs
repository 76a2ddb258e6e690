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
use utils::{setup_browser, setup_postgres, setup_wasm};

type Result<T = ()> = std::result::Result<T, String>;

/// A `cargo xtask` command: its name, its arguments and what it does (the usage line), and
/// what runs it with the arguments after its name. `bench` has one line per benchmark
/// ([`commands::bench::BENCHES`]).
struct Task {
    name: &'static str,
    args: &'static str,
    about: &'static str,
    run: fn(&[String]) -> Result,
}

const TASKS: &[Task] = &[
    Task {
        name: "run",
        args: "",
        about: "build the browser package and start the relay on http://127.0.0.1:8080 with the runs of relay.toml",
        run,
    },
    Task {
        name: "test",
        args: "",
        about: "install test dependencies and run every test (cargo, wasm in Chromium, end-to-end, README's commands)",
        run: test,
    },
    Task {
        name: "bench",
        args: "NAME",
        about: "a benchmark (below)",
        run: bench,
    },
    Task {
        name: "build-wasm",
        args: "",
        about: "build the npm package into web/pkg, with brotli and gzip copies for the relay to serve",
        run: |_| setup_wasm().and_then(|()| build_wasm()),
    },
    Task {
        name: "fuzz",
        args: "[--seconds N] [TARGET…]",
        about: "run the cargo fuzz targets N s each (default 60); writes docs/benchmarks/fuzz.md",
        run: fuzz::run,
    },
    Task {
        name: "check-docs",
        args: "",
        about: "build the relay and the native peer and check every command README.md and docs/ show (part of test)",
        run: |_| {
            let relay = commands::build::build_relay()?;
            commands::readme::check(relay.parent().ok_or("the relay binary has no folder")?)
        },
    },
    Task {
        name: "setup",
        args: "",
        about: "install the toolchain pieces, browser packages and PostgreSQL only",
        run: |_| {
            setup_wasm()?;
            setup_browser()?;
            setup_postgres().map(drop)
        },
    },
];

/// What `cargo xtask` with no command (or an unknown one) prints: every command and benchmark.
fn usage() -> String {
    let mut out = String::from("usage: cargo xtask <command>\n\ncommands:\n");
    for task in TASKS {
        let name = format!("{} {}", task.name, task.args);
        out.push_str(&format!("  {:<34} {}\n", name.trim_end(), task.about));
    }
    for bench in commands::bench::BENCHES {
        out.push_str(&format!(
            "  {:<34} {}\n",
            format!("bench {}", bench.name),
            bench.about
        ));
    }
    out
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let name = args.first().map(String::as_str).unwrap_or_default();
    let Some(task) = TASKS.iter().find(|t| t.name == name) else {
        eprint!("{}", usage());
        return ExitCode::from(2);
    };
    let result = (task.run)(&args[1..]);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err}");
            ExitCode::FAILURE
        }
    }
}
