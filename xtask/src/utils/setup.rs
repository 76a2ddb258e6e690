//! What the commands install first, idempotently: the wasm32 target and the pinned wasm-bindgen
//! CLI, Debian packages (Chromium, its driver, Mesa's Vulkan, fortunes, python3-venv, and for the
//! simulated internet iproute2, iptables, coturn and openssl), npm
//! packages from lock files, and a Python virtual environment for the comparisons.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Result;
use crate::utils::{cargo, output, root, status, target_dir};

/// Must match the `wasm-bindgen` pin in the workspace manifest (libp2p 0.57.1 pins it).
pub(crate) const WASM_BINDGEN_VERSION: &str = "0.2.108";

pub(crate) const WASM_TARGET: &str = "wasm32-unknown-unknown";

pub(crate) const APT_PACKAGES: &[&str] = &[
    "chromium",
    "chromium-driver",
    "mesa-vulkan-drivers",
    "fortunes",
    "python3-venv",
    // The simulated internet of tests/browser/internet.test.mjs: network namespaces and NAT
    // routers (iproute2, iptables), a TURN server (coturn), the relay's test certificate
    // (openssl).
    "iproute2",
    "iptables",
    "coturn",
    "openssl",
];

/// Adds the wasm32 target and installs the pinned wasm-bindgen CLI when missing.
pub(crate) fn setup_wasm() -> Result {
    let installed =
        output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == WASM_TARGET) {
        status(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    }
    let have = output(Command::new("wasm-bindgen").arg("--version")).unwrap_or_default();
    if !have.contains(WASM_BINDGEN_VERSION) {
        status(cargo().args([
            "install",
            "--locked",
            "wasm-bindgen-cli",
            "--version",
            WASM_BINDGEN_VERSION,
        ]))?;
    }
    Ok(())
}

/// Installs Debian's Chromium, ChromeDriver and Mesa's software Vulkan, and playwright-core.
/// Installs the Debian packages that are missing, with apt-get (through sudo when not root).
pub(crate) fn apt_install(packages: &[&str]) -> Result {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let sudo = output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() != "0");
    let apt = |args: &[&str]| {
        let mut cmd = if sudo {
            Command::new("sudo")
        } else {
            Command::new("apt-get")
        };
        if sudo {
            cmd.arg("apt-get");
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    status(&mut apt(&["update"]))?;
    let mut install = apt(&["install", "-y", "--no-install-recommends"]);
    install.args(&missing);
    status(&mut install)
}

/// Installs Debian's PostgreSQL (the shared ledger's tests start servers of their own from it)
/// and returns the folder of its programs (`initdb`, `pg_ctl`), the newest version there.
pub(crate) fn setup_postgres() -> Result<PathBuf> {
    apt_install(&["postgresql"])?;
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("/usr/lib/postgresql: {e}"))?
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("pg_ctl").exists())
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| "postgresql is installed but /usr/lib/postgresql/*/bin/pg_ctl is not".into())
}

pub(crate) fn setup_browser() -> Result {
    apt_install(APT_PACKAGES)?;
    npm_ci(&root().join("tests/browser"), "playwright-core")?;
    // The js-libp2p node of the interop test, bundled by Vite (versions locked in its
    // package-lock.json).
    let interop = root().join("tests/browser/interop");
    npm_ci(&interop, "libp2p")?;
    status(
        Command::new("npx")
            .args(["vite", "build"])
            .current_dir(interop),
    )
}

/// `npm ci` in `dir` unless its `node_modules` already holds `package`.
pub(crate) fn npm_ci(dir: &Path, package: &str) -> Result {
    if dir.join("node_modules").join(package).exists() {
        return Ok(());
    }
    status(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dir),
    )
}

/// Python packages from PyPI for the tests (reading checkpoints) and the benchmarks (numpy).
pub(crate) const PYTHON_PACKAGES: &[&str] = &["numpy", "safetensors", "moto[server]==5.2.5"];

/// A Python with [`PYTHON_PACKAGES`], in a virtual environment under the target directory.
pub(crate) fn python_venv() -> Result<PathBuf> {
    let venv = target_dir().join("python-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    if output(Command::new(&python).args(["-c", "import numpy, safetensors, moto.server"]))
        .is_none()
    {
        status(
            Command::new(&python)
                .args(["-m", "pip", "install", "--quiet"])
                .args(PYTHON_PACKAGES),
        )?;
    }
    Ok(python)
}

/// Debian's `fortunes` package ships the default corpus (read at run time, never committed).
pub(crate) fn setup_corpus() -> Result {
    apt_install(&["fortunes"])
}
