//! `cargo xtask test`: every test, cargo's, the wasm suites in Chromium and the browser
//! end-to-end tests.

use std::ffi::OsStr;
use std::process::Command;

use crate::Result;
use crate::commands::build::{build_example, build_relay, build_wasm, build_wgpu_peer};
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
    //    checkpoint export read back by Python's safetensors; the shared ledger's test starts
    //    PostgreSQL servers of its own.
    let python = python_venv()?;
    let postgres = setup_postgres()?;
    status(
        cargo()
            .arg("test")
            .args(NATIVE)
            .args(&filter)
            .env("SWARMTRAIN_PYTHON", python)
            .env("SWARMTRAIN_POSTGRES_BIN", &postgres),
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
    //    embedded in a Vite + TypeScript page; two tabs on two edges of one root relay and a tab failing over between them; native
    //    volunteers on wgpu (lavapipe) and the CPU with a tab in one run; and the relay on a
    //    simulated internet (network namespaces, NAT routers, coturn, a Chromium in each home;
    //    needs root).
    build_example()?;
    let wgpu_peer = build_wgpu_peer()?;
    status(
        Command::new("node")
            .args([
                "--test",
                "--test-concurrency=1",
                "e2e.test.mjs",
                "webrtc.test.mjs",
                "interop.test.mjs",
                "embed.test.mjs",
                "federation.test.mjs",
                "volunteers.test.mjs",
                "internet.test.mjs",
            ])
            .current_dir(root().join("tests/browser"))
            .env("SWARMTRAIN_RELAY_BIN", relay)
            .env("SWARMTRAIN_WGPU_PEER_BIN", wgpu_peer)
            .env("SWARMTRAIN_POSTGRES_BIN", &postgres)
            .env("SWARMTRAIN_ROOT", root()),
    )
}

#[cfg(test)]
mod tests {
    /// The features of web-sys that a manifest's `web-sys = { … features = […] }` lines name.
    fn web_sys_features(manifest: &str) -> Vec<String> {
        manifest
            .lines()
            .filter(|line| line.trim_start().starts_with("web-sys"))
            .filter_map(|line| line.split_once("features = [").map(|(_, rest)| rest))
            .flat_map(|rest| rest.split(']').next().unwrap_or_default().split(','))
            .map(|feature| feature.trim().trim_matches('"').to_owned())
            .filter(|feature| !feature.is_empty())
            .collect()
    }

    /// The wasm suites reuse the package's build only while they ask web-sys for no feature
    /// the package does not: another feature set rebuilds Burn, wgpu and libp2p for wasm (3 min
    /// 37 s of a cold run, measured).
    #[test]
    fn the_wasm_suites_ask_web_sys_for_no_feature_the_package_lacks() {
        let read = |path: &str| {
            std::fs::read_to_string(super::root().join(path)).expect("a manifest of the workspace")
        };
        let package = web_sys_features(&read("client-wasm/Cargo.toml"));
        let suites = web_sys_features(&read("wasm-pack-tests/Cargo.toml"));
        assert!(
            package.contains(&"RtcPeerConnection".to_owned()),
            "{package:?}"
        );
        let missing: Vec<&String> = suites.iter().filter(|f| !package.contains(f)).collect();
        assert!(
            missing.is_empty(),
            "add {missing:?} to client-wasm's web-sys features"
        );
    }
}
