//! `cargo xtask run|test|bench`: the README's commands.
//!
//! Every step installs what it needs first, idempotently: the wasm32 rustup target, the pinned
//! `wasm-bindgen` CLI, Debian packages for the browser tests and npm packages for the browser
//! driver. Nothing here depends on anything but `std`, so the task runner builds in seconds.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Must match the `wasm-bindgen` pin in the workspace manifest (libp2p 0.57.1 pins it).
const WASM_BINDGEN_VERSION: &str = "0.2.108";
const WASM_TARGET: &str = "wasm32-unknown-unknown";
const APT_PACKAGES: &[&str] = &["chromium", "chromium-driver", "mesa-vulkan-drivers"];

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("build-wasm") => setup_wasm().and_then(|()| build_wasm()),
        Some("setup") => setup_wasm().and_then(|()| setup_browser()),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 run          build the browser package and start the relay on http://127.0.0.1:8080\n  \
                 test         install test dependencies and run every test (cargo, wasm in Chromium, end-to-end)\n  \
                 bench robust aggregator throughput beside numpy; writes docs/benchmarks/robust.md\n  \
                 build-wasm   build the npm package into web/pkg\n  \
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

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn status(cmd: &mut Command) -> Result {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd.status().map_err(|e| format!("could not start `{}`: {e}", describe(cmd)))?;
    if status.success() { Ok(()) } else { Err(format!("`{}` failed with {status}", describe(cmd))) }
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Adds the wasm32 target and installs the pinned wasm-bindgen CLI when missing.
fn setup_wasm() -> Result {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == WASM_TARGET) {
        status(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    }
    let have = output(Command::new("wasm-bindgen").arg("--version")).unwrap_or_default();
    if !have.contains(WASM_BINDGEN_VERSION) {
        status(cargo().args(["install", "--locked", "wasm-bindgen-cli", "--version", WASM_BINDGEN_VERSION]))?;
    }
    Ok(())
}

/// Installs Debian's Chromium, ChromeDriver and Mesa's software Vulkan, and playwright-core.
fn setup_browser() -> Result {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        let sudo = output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() != "0");
        let apt = |args: &[&str]| {
            let mut cmd = if sudo { Command::new("sudo") } else { Command::new("apt-get") };
            if sudo {
                cmd.arg("apt-get");
            }
            cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        };
        status(&mut apt(&["update"]))?;
        let mut install = apt(&["install", "-y", "--no-install-recommends"]);
        install.args(&missing);
        status(&mut install)?;
    }
    let e2e = root().join("tests/browser");
    if !e2e.join("node_modules/playwright-core").exists() {
        status(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&e2e))?;
    }
    Ok(())
}

/// Builds the client for wasm32 and runs wasm-bindgen into `web/pkg` (the npm package).
fn build_wasm() -> Result {
    status(cargo().args(["build", "--release", "-p", "swarmtrain-client", "--lib", "--target", WASM_TARGET]))?;
    let wasm = target_dir().join(WASM_TARGET).join("release/swarmtrain_client.wasm");
    let out = root().join("web/pkg");
    status(
        Command::new("wasm-bindgen")
            .args(["--target", "web", "--out-name", "swarmtrain", "--out-dir"])
            .arg(&out)
            .arg(&wasm),
    )?;
    let version = fs::read_to_string(root().join("client-wasm/Cargo.toml"))
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("version = \"").map(|v| v.trim_end_matches('"').to_owned())))
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
  "files": ["swarmtrain_bg.wasm", "swarmtrain.js", "swarmtrain.d.ts", "swarmtrain_bg.wasm.d.ts"],
  "sideEffects": ["./snippets/*"]
}}
"#
    );
    fs::write(out.join("package.json"), package).map_err(|e| format!("writing package.json: {e}"))?;
    let size = fs::metadata(out.join("swarmtrain_bg.wasm")).map(|m| m.len()).unwrap_or(0);
    eprintln!("xtask: npm package in {} (wasm {:.2} MB)", out.display(), size as f64 / 1e6);
    Ok(())
}

/// The native packages, built with the same feature set as `cargo test --workspace` so that
/// the relay binary reuses the test build instead of compiling Burn a second time.
const NATIVE: &[&str] = &["--workspace", "--exclude", "swarmtrain-wasm-tests"];

/// Builds the relay binary and returns its path.
fn build_relay() -> Result<PathBuf> {
    status(cargo().arg("build").args(NATIVE).args(["--bin", "swarmtrain-relay"]))?;
    Ok(target_dir().join("debug/swarmtrain-relay"))
}

fn run(args: &[String]) -> Result {
    setup_wasm()?;
    build_wasm()?;
    let relay = build_relay()?;
    let mut cmd = Command::new(relay);
    cmd.current_dir(root()).arg("serve").args(args);
    status(&mut cmd)
}

fn test(args: &[String]) -> Result {
    setup_wasm()?;
    setup_browser()?;
    build_wasm()?;
    let filter: Vec<&OsStr> = args.iter().map(OsStr::new).collect();

    // 1. Native tests: unit tests, the in-process multi-peer tests, bad-input tests.
    status(cargo().arg("test").args(NATIVE).args(&filter))?;

    // 2. wasm_bindgen_test suites in headless Chromium, driven by Debian's chromedriver.
    //    wasm-bindgen-test-runner reads webdriver.json (the Chromium flags) from the crate dir.
    let mut wasm = cargo();
    wasm.current_dir(root().join("wasm-pack-tests"))
        .args(["test", "--release", "--target", WASM_TARGET])
        .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER", "wasm-bindgen-test-runner")
        .env("CHROMEDRIVER", "/usr/bin/chromedriver")
        .env("WASM_BINDGEN_TEST_TIMEOUT", "300")
        .env_remove("CARGO_TARGET_DIR")
        .env("CARGO_TARGET_DIR", target_dir());
    status(&mut wasm)?;

    // 3. The browser end-to-end test: a real relay, real Chromium, the Contribute button.
    let relay = build_relay()?;
    status(
        Command::new("node")
            .args(["--test", "e2e.test.mjs"])
            .current_dir(root().join("tests/browser"))
            .env("SWARMTRAIN_RELAY_BIN", relay)
            .env("SWARMTRAIN_ROOT", root()),
    )
}

fn bench(args: &[String]) -> Result {
    match args.first().map(String::as_str) {
        Some("robust") => bench_robust(),
        _ => Err("usage: cargo xtask bench robust".into()),
    }
}

/// A Python with numpy from PyPI, in a virtual environment under the target directory.
fn numpy_python() -> Result<PathBuf> {
    let venv = target_dir().join("bench-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    if output(Command::new(&python).args(["-c", "import numpy"])).is_none() {
        status(Command::new(&python).args(["-m", "pip", "install", "--quiet", "numpy"]))?;
    }
    Ok(python)
}

/// The median point estimate, in seconds, from a criterion `estimates.json`.
fn criterion_median(group: &str, name: &str) -> Result<f64> {
    let path = target_dir().join("criterion").join(group).join(name).join("new/estimates.json");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let median = text.find("\"median\"").ok_or("no median in estimates")?;
    let after = &text[median..];
    let at = after.find("\"point_estimate\":").ok_or("no point estimate")? + "\"point_estimate\":".len();
    let number: String = after[at..].chars().take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+')).collect();
    number.parse::<f64>().map(|ns| ns * 1e-9).map_err(|e| format!("{number}: {e}"))
}

fn json_number(json: &str, key: &str) -> Result<f64> {
    let at = json.find(&format!("\"{key}\":")).ok_or_else(|| format!("numpy gave no {key}"))? + key.len() + 3;
    let number: String =
        json[at..].trim_start().chars().take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+')).collect();
    number.parse().map_err(|e| format!("{key}: {e}"))
}

/// Aggregators on 16 × 1M f32, ours (criterion) and numpy's, in one run.
fn bench_robust() -> Result {
    let python = numpy_python()?;
    status(cargo().args(["bench", "-p", "swarmtrain-shared", "--bench", "aggregate"]))?;
    let script = root().join("xtask/bench/numpy_aggregate.py");
    let out = Command::new(&python).arg(&script).output().map_err(|e| format!("numpy benchmark: {e}"))?;
    if !out.status.success() {
        return Err(format!("numpy benchmark failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let numpy = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = numpy.split("\"numpy\": \"").nth(1).and_then(|v| v.split('"').next()).unwrap_or("?").to_owned();

    let group = "aggregate_16x1M";
    let ours = |name: &str| criterion_median(group, name);
    let mean = ours("mean")?;
    let copy = criterion_median("memory", "copy_256MB")?;
    let bandwidth = 2.0 * 256.0 * 1048576.0 / copy / 1e9;
    let mean_bandwidth = 16.0 * 1048576.0 * 4.0 / mean / 1e9;
    let mut table = String::from("| aggregator | ours (median) | numpy (median) | numpy / ours | ours / our mean |\n| --- | --- | --- | --- | --- |\n");
    let ms = |s: f64| format!("{:.1} ms", s * 1e3);
    for (name, reference) in [
        ("mean", Some("mean")),
        ("median", Some("median")),
        ("trimmed_mean", Some("trimmed_mean_sort")),
        ("multi_krum", None),
        ("geometric_median", None),
        ("centered_clipping", None),
    ] {
        let t = ours(name)?;
        let (np, ratio) = match reference {
            Some(key) => {
                let n = json_number(&numpy, key)?;
                (ms(n), format!("{:.1}×", n / t))
            }
            None => ("—".into(), "—".into()),
        };
        table.push_str(&format!("| {name} | {} | {np} | {ratio} | {:.2}× |\n", ms(t), t / mean));
    }
    let partition = json_number(&numpy, "trimmed_mean_partition")?;
    let report = format!(
        "# Aggregator throughput: 16 updates × 1M f32\n\n\
         Produced by `cargo xtask bench robust` ({} cores). Ours: criterion medians from \
         `shared/benches/aggregate.rs`; numpy {version}: medians of 9 runs of \
         `xtask/bench/numpy_aggregate.py`, in the same run. Trimmed mean drops 3 of 16 on each \
         side (numpy: `np.sort` along peers; with `np.partition` it took {}).\n\n{table}\n\
         Memory bandwidth (256 MB copy, read + write): {bandwidth:.1} GB/s; our mean streams its \
         64 MB input at {mean_bandwidth:.1} GB/s ({:.0}% of that).\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        ms(partition),
        100.0 * mean_bandwidth / bandwidth,
    );
    let dir = root().join("docs/benchmarks");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    fs::write(dir.join("robust.md"), &report).map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(())
}
