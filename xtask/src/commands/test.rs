//! `cargo xtask test`: every test, cargo's, the wasm suites in Chromium and the browser
//! end-to-end tests.

use std::ffi::OsStr;
use std::process::Command;

use crate::Result;
use crate::commands::build::{build_example, build_relay, build_wasm};
use crate::utils::*;

/// The native packages, built with the same feature set as `cargo test --workspace` so that
/// the relay binary reuses the test build instead of compiling Burn a second time.
pub(crate) const NATIVE: &[&str] = &["--workspace", "--exclude", "swarmtrain-wasm-tests"];

pub(crate) fn test(args: &[String]) -> Result {
    setup_wasm()?;
    setup_browser()?;
    build_wasm()?;
    let filter: Vec<&OsStr> = args.iter().map(OsStr::new).collect();

    // 1. Native tests: unit tests, the in-process multi-peer tests, bad-input tests, and the
    //    checkpoint export read back by Python's safetensors.
    let python = python_venv()?;
    status(
        cargo()
            .arg("test")
            .args(NATIVE)
            .args(&filter)
            .env("SWARMTRAIN_PYTHON", python),
    )?;

    // 1b. Every command line README.md and docs/ show parses with the binaries' own clap.
    let relay = build_relay()?;
    crate::commands::readme::check(relay.parent().ok_or("the relay binary has no folder")?)?;

    // 2. wasm_bindgen_test suites in headless Chromium, driven by Debian's chromedriver.
    //    wasm-bindgen-test-runner reads webdriver.json (the Chromium flags) from the crate dir.
    let mut wasm = cargo();
    wasm.current_dir(root().join("wasm-pack-tests"))
        // The package's profile (and, in client-wasm/Cargo.toml, the same web-sys features), so
        // the dependencies are built once for both.
        .args(["test", "--profile", "wasm", "--target", WASM_TARGET])
        .env(
            "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER",
            "wasm-bindgen-test-runner",
        )
        .env("CHROMEDRIVER", "/usr/bin/chromedriver")
        .env("WASM_BINDGEN_TEST_TIMEOUT", "300")
        .env_remove("CARGO_TARGET_DIR")
        .env("CARGO_TARGET_DIR", target_dir());
    status(&mut wasm)?;

    // 3. The browser end-to-end tests: a real relay, real Chromium, the Contribute button;
    //    two tabs linked browser-to-browser; the same links with a js-libp2p node; the package
    //    embedded in a Vite + TypeScript page; and the relay on a simulated internet (network
    //    namespaces, NAT routers, coturn, a Chromium in each home; needs root).
    build_example()?;
    status(
        Command::new("node")
            .args([
                "--test",
                "--test-concurrency=1",
                "e2e.test.mjs",
                "webrtc.test.mjs",
                "interop.test.mjs",
                "embed.test.mjs",
                "internet.test.mjs",
            ])
            .current_dir(root().join("tests/browser"))
            .env("SWARMTRAIN_RELAY_BIN", relay)
            .env("SWARMTRAIN_ROOT", root()),
    )
}
