//! Building what the commands run: the npm package (`build-wasm`), the Vite example, the relay
//! and the release load generators.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use crate::Result;
use crate::utils::*;

/// Installs the embedding example's locked dependencies, type-checks it against the package's
/// generated declarations and bundles it with Vite (into `examples/vite/dist`, which `embed.test.mjs` serves).
pub(crate) fn build_example() -> Result {
    let example = root().join("examples/vite");
    // After `build_wasm`: the example links `web/pkg`.
    npm_ci(&example, "typescript")?;
    status(
        Command::new("npx")
            .args(["tsc", "--noEmit"])
            .current_dir(&example),
    )?;
    status(
        Command::new("npx")
            .args(["vite", "build"])
            .current_dir(&example),
    )
}

/// Builds the client for wasm32 and runs wasm-bindgen into `web/pkg` (the npm package).
pub(crate) fn build_wasm() -> Result {
    // The `wasm` profile (Cargo.toml): optimized for speed (opt-level 3), which still fits the
    // size goal on the wire once compressed.
    status(cargo().args([
        "build",
        "--profile",
        "wasm",
        "-p",
        "swarmtrain-client",
        "--lib",
        "--target",
        WASM_TARGET,
    ]))?;
    let wasm = target_dir()
        .join(WASM_TARGET)
        .join("wasm/swarmtrain_client.wasm");
    let out = root().join("web/pkg");
    // The compressed copies of the last build go first: never served beside a newer package.
    for file in ["swarmtrain_bg.wasm", "swarmtrain.js"] {
        for ext in ["br", "gz"] {
            let _ = fs::remove_file(out.join(format!("{file}.{ext}")));
        }
    }
    status(
        // Without the name section (2.4 MB raw, 0.4 MB gzip): panics still report their
        // message and location; only browser stack traces lose Rust function names.
        Command::new("wasm-bindgen")
            .args(["--target", "web", "--remove-name-section"])
            .args(["--out-name", "swarmtrain", "--out-dir"])
            .arg(&out)
            .arg(&wasm),
    )?;
    let version = fs::read_to_string(root().join("client-wasm/Cargo.toml"))
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("version = \"")
                    .map(|v| v.trim_end_matches('"').to_owned())
            })
        })
        .unwrap_or_else(|| "0.1.0".to_owned());
    let package = format!(
        r#"{{
  "name": "swarmtrain",
  "version": "{version}",
  "description": "Volunteer deep-learning training in the browser: Burn on WebGPU, libp2p to a swarmtrain relay",
  "license": "MIT OR Apache-2.0",
  "type": "module",
  "main": "swarmtrain.js",
  "types": "swarmtrain.d.ts",
  "files": ["swarmtrain_bg.wasm", "swarmtrain.js", "swarmtrain.d.ts", "swarmtrain_bg.wasm.d.ts", "snippets", "README.md"],
  "sideEffects": ["./snippets/*"]
}}
"#
    );
    fs::write(out.join("package.json"), package)
        .map_err(|e| format!("writing package.json: {e}"))?;
    fs::copy(root().join("client-wasm/README.md"), out.join("README.md"))
        .map_err(|e| format!("copying the package README: {e}"))?;
    // What travels on the wire: the relay serves these in place of the files to browsers that
    // accept brotli or gzip. Not part of the npm package (its `files` leave them out).
    let size = fs::metadata(out.join("swarmtrain_bg.wasm"))
        .map(|m| m.len())
        .unwrap_or(0);
    let (gzip, brotli) = precompress(&out.join("swarmtrain_bg.wasm"))?;
    let (js_gzip, js_brotli) = precompress(&out.join("swarmtrain.js"))?;
    eprintln!(
        "xtask: npm package in {} (wasm {:.2} MB raw; wasm and glue on the wire: {:.2} MB brotli, {:.2} MB gzip -9)",
        out.display(),
        size as f64 / 1e6,
        (brotli + js_brotli) as f64 / 1e6,
        (gzip + js_gzip) as f64 / 1e6,
    );
    Ok(())
}

/// Builds the relay binary and the native peer's (`swarmtrain-peer`) and returns the relay's
/// path; the peer's is beside it.
pub(crate) fn build_relay() -> Result<PathBuf> {
    status(
        cargo()
            .arg("build")
            .args(crate::commands::test::NATIVE)
            .args(["--bin", "swarmtrain-relay", "--bin", "swarmtrain-peer"]),
    )?;
    Ok(target_dir().join("debug/swarmtrain-relay"))
}

/// `swarmtrain-peer` with native wgpu training (`train --backend wgpu`; Mesa's lavapipe on a
/// machine without a GPU), copied to `swarmtrain-peer-wgpu` beside it: the next build of the
/// workspace's own `swarmtrain-peer` (without the feature) leaves it be. Its first build compiles
/// Burn's wgpu backend natively (about 4 minutes here).
pub(crate) fn build_wgpu_peer() -> Result<PathBuf> {
    status(cargo().args([
        "build",
        "-p",
        "swarmtrain-client",
        "--features",
        "wgpu",
        "--bin",
        "swarmtrain-peer",
    ]))?;
    let built = target_dir().join("debug/swarmtrain-peer");
    let copy = target_dir().join("debug/swarmtrain-peer-wgpu");
    std::fs::copy(&built, &copy)
        .map_err(|e| format!("copying {} to {}: {e}", built.display(), copy.display()))?;
    Ok(copy)
}

/// The release relay and the release `swarmtrain-peer` (the load generators).
pub(crate) fn build_release_relay_and_peer() -> Result {
    status(cargo().args([
        "build",
        "--release",
        "-p",
        "swarmtrain-relay",
        "-p",
        "swarmtrain-client",
        "--bin",
        "swarmtrain-relay",
        "--bin",
        "swarmtrain-peer",
    ]))
}
