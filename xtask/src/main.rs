//! `cargo xtask run|test|bench`: the README's commands.
//!
//! Every step installs what it needs first, idempotently: the wasm32 rustup target, the pinned
//! `wasm-bindgen` CLI, Debian packages for the browser tests and npm packages for the browser
//! driver. The only dependency is `serde_json`, so the task runner builds in seconds.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod bench_browser;
mod fuzz;

/// Must match the `wasm-bindgen` pin in the workspace manifest (libp2p 0.57.1 pins it).
const WASM_BINDGEN_VERSION: &str = "0.2.108";
const WASM_TARGET: &str = "wasm32-unknown-unknown";
const APT_PACKAGES: &[&str] = &[
    "chromium",
    "chromium-driver",
    "mesa-vulkan-drivers",
    "fortunes",
    "python3-venv",
];

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
                 bench robust aggregator throughput beside numpy and the attack grid; writes docs/benchmarks/robust.md and attacks.md\n  \
                 bench load   1,000 simulated peers on one relay; writes docs/benchmarks/load.md\n  \
                 bench soak   100,000 fast rounds on one relay: round time, memory, disk; writes docs/benchmarks/soak.md\n  \
                 bench diloco DiLoCo vs data-parallel on the language model; writes docs/benchmarks/diloco.md\n  \
                 bench joiners the relay's θ bytes out for 8 browsers joining a round, without and with browser links; writes docs/benchmarks/joiners.md\n  \
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

/// The workspace root. `cargo run` sets CARGO_MANIFEST_DIR for the binary it starts, which is
/// right for this checkout even when the binary was built from another one sharing the
/// CARGO_TARGET_DIR (cargo does not rebuild xtask for a moved checkout, so the path compiled in
/// can name a clone that is gone).
fn root() -> PathBuf {
    let manifest = env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest
        .parent()
        .map_or_else(|| manifest.clone(), Path::to_path_buf)
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn status(cmd: &mut Command) -> Result {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("could not start `{}`: {e}", describe(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed with {status}", describe(cmd)))
    }
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
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
fn apt_install(packages: &[&str]) -> Result {
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

fn setup_browser() -> Result {
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

/// Installs the embedding example's locked dependencies, type-checks it against the package's
/// generated declarations and bundles it with Vite (into `examples/vite/dist`, which `embed.test.mjs` serves).
fn build_example() -> Result {
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

/// `npm ci` in `dir` unless its `node_modules` already holds `package`.
fn npm_ci(dir: &Path, package: &str) -> Result {
    if dir.join("node_modules").join(package).exists() {
        return Ok(());
    }
    status(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dir),
    )
}

/// Builds the client for wasm32 and runs wasm-bindgen into `web/pkg` (the npm package).
fn build_wasm() -> Result {
    // The `wasm` profile (Cargo.toml): optimized for size.
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
    let size = fs::metadata(out.join("swarmtrain_bg.wasm"))
        .map(|m| m.len())
        .unwrap_or(0);
    let gzip = bench_browser::gzip_size(&out.join("swarmtrain_bg.wasm"))?;
    eprintln!(
        "xtask: npm package in {} (wasm {:.2} MB, {} KiB gzip -9)",
        out.display(),
        size as f64 / 1e6,
        gzip / 1024
    );
    Ok(())
}

/// The native packages, built with the same feature set as `cargo test --workspace` so that
/// the relay binary reuses the test build instead of compiling Burn a second time.
const NATIVE: &[&str] = &["--workspace", "--exclude", "swarmtrain-wasm-tests"];

/// Builds the relay binary and returns its path.
fn build_relay() -> Result<PathBuf> {
    status(
        cargo()
            .arg("build")
            .args(NATIVE)
            .args(["--bin", "swarmtrain-relay"]),
    )?;
    Ok(target_dir().join("debug/swarmtrain-relay"))
}

/// The relay with the two runs of `relay.toml` (the language model, then the digits), unless
/// the arguments name another config file.
fn run(args: &[String]) -> Result {
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

fn test(args: &[String]) -> Result {
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

    // 2. wasm_bindgen_test suites in headless Chromium, driven by Debian's chromedriver.
    //    wasm-bindgen-test-runner reads webdriver.json (the Chromium flags) from the crate dir.
    let mut wasm = cargo();
    wasm.current_dir(root().join("wasm-pack-tests"))
        // The package's profile, so the dependencies are built once for both.
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
    //    embedded in a Vite + TypeScript page.
    build_example()?;
    let relay = build_relay()?;
    status(
        Command::new("node")
            .args([
                "--test",
                "--test-concurrency=1",
                "e2e.test.mjs",
                "webrtc.test.mjs",
                "interop.test.mjs",
                "embed.test.mjs",
            ])
            .current_dir(root().join("tests/browser"))
            .env("SWARMTRAIN_RELAY_BIN", relay)
            .env("SWARMTRAIN_ROOT", root()),
    )
}

fn bench(args: &[String]) -> Result {
    match args.first().map(String::as_str) {
        Some("robust") => bench_robust(),
        Some("load") => bench_load(),
        Some("diloco") => bench_diloco(args.get(1).is_some_and(|a| a == "--report-only")),
        Some("soak") => bench_soak(&args[1..]),
        Some("browser") => bench_browser::run(args.get(1).is_some_and(|a| a == "--report-only")),
        Some("flood") => bench_flood(),
        Some("joiners") => bench_joiners(),
        _ => Err("usage: cargo xtask bench robust|diloco|load|soak|browser|flood|joiners".into()),
    }
}

/// Python packages from PyPI for the tests (reading checkpoints) and the benchmarks (numpy).
const PYTHON_PACKAGES: &[&str] = &["numpy", "safetensors", "moto[server]==5.2.5"];

/// A Python with [`PYTHON_PACKAGES`], in a virtual environment under the target directory.
fn python_venv() -> Result<PathBuf> {
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

/// The median point estimate, in seconds, from a criterion `estimates.json`.
fn criterion_median(group: &str, name: &str) -> Result<f64> {
    let path = target_dir()
        .join("criterion")
        .join(group)
        .join(name)
        .join("new/estimates.json");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let median = text.find("\"median\"").ok_or("no median in estimates")?;
    let after = &text[median..];
    let at = after
        .find("\"point_estimate\":")
        .ok_or("no point estimate")?
        + "\"point_estimate\":".len();
    let number: String = after[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        .collect();
    number
        .parse::<f64>()
        .map(|ns| ns * 1e-9)
        .map_err(|e| format!("{number}: {e}"))
}

/// The string value of `key` in the flat JSON our benchmark scripts and `simulate` print, or
/// "?" when it is missing.
fn json_string(json: &str, key: &str) -> String {
    json.split(&format!("\"{key}\": \""))
        .nth(1)
        .and_then(|v| v.split('"').next())
        .unwrap_or("?")
        .to_owned()
}

fn json_number(json: &str, key: &str) -> Result<f64> {
    let at = json
        .find(&format!("\"{key}\":"))
        .ok_or_else(|| format!("numpy gave no {key}"))?
        + key.len()
        + 3;
    let number: String = json[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        .collect();
    number.parse().map_err(|e| format!("{key}: {e}"))
}

/// Aggregators on 16 × 1M f32, ours (criterion) and numpy's, in one run.
fn bench_robust() -> Result {
    let python = python_venv()?;
    status(cargo().args(["bench", "-p", "swarmtrain-shared", "--bench", "aggregate"]))?;
    let script = root().join("xtask/bench/numpy_aggregate.py");
    let out = Command::new(&python)
        .arg(&script)
        .output()
        .map_err(|e| format!("numpy benchmark: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "numpy benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let numpy = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = json_string(&numpy, "numpy");

    let group = "aggregate_16x1M";
    let ours = |name: &str| criterion_median(group, name);
    let mean = ours("mean")?;
    let copy = criterion_median("memory", "copy_256MB")?;
    let bandwidth = 2.0 * 256.0 * 1048576.0 / copy / 1e9;
    let read = criterion_median("memory", "read_16x1M")?;
    let read_bandwidth = 16.0 * 1048576.0 * 4.0 / read / 1e9;
    let mean_bandwidth = 16.0 * 1048576.0 * 4.0 / mean / 1e9;
    let mut table = String::from(
        "| aggregator | ours (median) | numpy (median) | numpy / ours | ours / our mean |\n| --- | --- | --- | --- | --- |\n",
    );
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
        table.push_str(&format!(
            "| {name} | {} | {np} | {ratio} | {:.2}× |\n",
            ms(t),
            t / mean
        ));
    }
    let partition = json_number(&numpy, "trimmed_mean_partition")?;
    let report = format!(
        "# Aggregator throughput: 16 updates × 1M f32\n\n\
         Produced by `cargo xtask bench robust` ({} cores). Ours: criterion medians from \
         `shared/benches/aggregate.rs`; numpy {version}: medians of 9 runs of \
         `xtask/bench/numpy_aggregate.py`, in the same run. Trimmed mean drops 3 of 16 on each \
         side (numpy: `np.sort` along peers; with `np.partition` it took {}).\n\n{table}\n\
         Our mean streams its 64 MB input at {mean_bandwidth:.1} GB/s: {:.0}% of a read-only pass \
         over the same rows on as many threads ({read_bandwidth:.1} GB/s, `memory/read_16x1M`), \
         the yardstick for a reduction that only reads. (A 256 MB copy, read + write, moves \
         {bandwidth:.1} GB/s.) The relay's CPU aggregation is this code: `aggregate::step_cpu` \
         runs `robust::aggregate` and the outer step for the relay, the simulator and the attack \
         grid.\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        ms(partition),
        100.0 * mean_bandwidth / read_bandwidth,
    );
    let dir = root().join("docs/benchmarks");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    fs::write(dir.join("robust.md"), &report).map_err(|e| e.to_string())?;
    println!("{report}");

    // The attack grid: every standard attack × every rule × attacker share, on the digits.
    status(cargo().args(["build", "--release", "-p", "swarmtrain-relay"]))?;
    let relay = target_dir().join("release/swarmtrain-relay");
    status(
        Command::new(&relay)
            .args(["attack-grid", "--out"])
            .arg(dir.join("attacks.md")),
    )
}

/// Debian's `fortunes` package ships the default corpus (read at run time, never committed).
fn setup_corpus() -> Result {
    apt_install(&["fortunes"])
}

/// One simulated run of `cargo xtask bench diloco`.
struct SimRun {
    name: &'static str,
    label: String,
    args: Vec<String>,
}

/// (tokens, bytes sent, validation loss) at one point of a run.
type CurvePoint = (f64, f64, f64);
/// A labelled loss curve.
type Curve<'a> = (&'a str, &'a [CurvePoint]);

/// What a `simulate --out` report says.
#[derive(Debug)]
struct SimResult {
    curve: Vec<CurvePoint>,
    bytes: f64,
    tokens: f64,
    final_loss: f64,
    syncs: f64,
    params_blake3: String,
    wall: f64,
}

fn parse_sim(json: &str) -> Result<SimResult> {
    let (before, after) = json.split_once("\"points\":").ok_or("no points")?;
    let (points, after) = after.split_once(']').ok_or("unterminated points")?;
    let curve = points
        .split('}')
        .filter(|p| p.contains("val_loss"))
        .map(|p| {
            Ok((
                json_number(p, "tokens")?,
                json_number(p, "bytes")?,
                json_number(p, "val_loss")?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    // Top-level numbers, with the curve cut out (its points have "bytes" and "tokens" too).
    let rest = format!("{before}{after}");
    let hash = json_string(json, "params_blake3");
    Ok(SimResult {
        curve,
        bytes: json_number(&rest, "bytes")?,
        tokens: json_number(&rest, "tokens")?,
        final_loss: json_number(&rest, "final_val_loss")?,
        syncs: json_number(&rest, "syncs")?,
        params_blake3: hash,
        wall: json_number(&rest, "wall_seconds")?,
    })
}

/// DiLoCo against the data-parallel baseline on the byte-level LM, every run through the relay's
/// `simulate` subcommand (the shared simulator), two at a time on this machine's cores.
fn bench_diloco(report_only: bool) -> Result {
    setup_corpus()?;
    if !report_only {
        status(cargo().args(["build", "--release", "-p", "swarmtrain-relay"]))?;
    }
    let relay = target_dir().join("release/swarmtrain-relay");
    let out_dir = target_dir().join("bench-diloco");
    fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;

    // Shared by every run: model, steps per peer, batch per peer, schedule, seed, start point.
    let common = "--context 32 --d-model 48 --heads 4 --layers 2 --steps 1500 --batch 8 --lr 3e-3 --warmup 50 \
                  --pretrain-steps 300 --pretrain-batch 64 --eval-every 100 --eval-windows 256 --seed 1";
    let run = |name: &'static str, label: &str, extra: &str| SimRun {
        name,
        label: label.to_owned(),
        args: format!("simulate {common} {extra}")
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    };
    let runs = vec![
        run(
            "dp",
            "data-parallel, 8 × batch",
            "--sync data-parallel --peers 8",
        ),
        run("h1", "DiLoCo H=1, 8 peers", "--inner-steps 1 --peers 8"),
        run("h10", "DiLoCo H=10, 8 peers", "--inner-steps 10 --peers 8"),
        run("h50", "DiLoCo H=50, 8 peers", "--inner-steps 50 --peers 8"),
        run(
            "h100",
            "DiLoCo H=100, 8 peers",
            "--inner-steps 100 --peers 8",
        ),
        run(
            "h500",
            "DiLoCo H=500, 8 peers",
            "--inner-steps 500 --peers 8",
        ),
        run(
            "fedavg100",
            "FedAvg H=100, 8 peers",
            "--sync fedavg --inner-steps 100 --peers 8",
        ),
        run("r1", "DiLoCo H=100, 1 peer", "--inner-steps 100 --peers 1"),
        run("r4", "DiLoCo H=100, 4 peers", "--inner-steps 100 --peers 4"),
        run(
            "int8",
            "DiLoCo H=100, 8 peers, int8",
            "--inner-steps 100 --peers 8 --codec int8",
        ),
        run(
            "topk",
            "DiLoCo H=100, 8 peers, top-2% + EF",
            "--inner-steps 100 --peers 8 --codec topk --topk-per-million 20000",
        ),
        run(
            "topk2",
            "DiLoCo H=100, 8 peers, top-2% 2-bit + EF",
            "--inner-steps 100 --peers 8 --codec topk2 --topk-per-million 20000",
        ),
        run(
            "btopk2",
            "DiLoCo H=100, 8 peers, block top-10% 2-bit + EF",
            "--inner-steps 100 --peers 8 --codec block-topk2 --topk-per-million 100000",
        ),
        run(
            "int4",
            "DiLoCo H=100, 8 peers, int4 + EF",
            "--inner-steps 100 --peers 8 --codec int4",
        ),
        run(
            "int2",
            "DiLoCo H=100, 8 peers, int2 + EF",
            "--inner-steps 100 --peers 8 --codec int2",
        ),
        run(
            "r1again",
            "DiLoCo H=100, 1 peer (repeat)",
            "--inner-steps 100 --peers 1",
        ),
    ];
    let started = std::time::Instant::now();
    let parallel = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    // `--report-only` rewrites the report from the last run's JSON files.
    let mut pending: Vec<&SimRun> = if report_only {
        Vec::new()
    } else {
        runs.iter().collect()
    };
    let mut running: Vec<(&SimRun, std::process::Child)> = Vec::new();
    while !pending.is_empty() || !running.is_empty() {
        while running.len() < parallel && !pending.is_empty() {
            let job = pending.remove(0);
            let json = out_dir.join(format!("{}.json", job.name));
            let log = fs::File::create(out_dir.join(format!("{}.log", job.name)))
                .map_err(|e| e.to_string())?;
            let child = Command::new(&relay)
                .args(&job.args)
                .arg("--out")
                .arg(&json)
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("{}: {e}", relay.display()))?;
            println!(
                "[{:>4.0} s] started {}",
                started.elapsed().as_secs_f64(),
                job.label
            );
            running.push((job, child));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut still = Vec::new();
        for (job, mut child) in running {
            match child.try_wait().map_err(|e| e.to_string())? {
                Some(code) if code.success() => println!(
                    "[{:>4.0} s] finished {}",
                    started.elapsed().as_secs_f64(),
                    job.label
                ),
                Some(code) => {
                    return Err(format!(
                        "{} failed ({code}); see {}/{}.log",
                        job.label,
                        out_dir.display(),
                        job.name
                    ));
                }
                None => still.push((job, child)),
            }
        }
        running = still;
    }
    let wall_file = out_dir.join("wall-seconds.txt");
    if !report_only {
        fs::write(
            &wall_file,
            format!("{:.0}", started.elapsed().as_secs_f64()),
        )
        .map_err(|e| e.to_string())?;
    }
    let wall: f64 = fs::read_to_string(&wall_file)
        .ok()
        .and_then(|w| w.trim().parse().ok())
        .unwrap_or(f64::NAN);
    let results = runs
        .iter()
        .map(|r| {
            let text = fs::read_to_string(out_dir.join(format!("{}.json", r.name)))
                .map_err(|e| e.to_string())?;
            Ok((r, parse_sim(&text)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let get = |name: &str| {
        results
            .iter()
            .find(|(r, _)| r.name == name)
            .map(|(_, s)| s)
            .ok_or(format!("no run {name}"))
    };
    let dp = get("dp")?;

    let mut table = String::from(
        "| run | syncs | tokens | bytes sent | fewer bytes than DP | final val loss | vs DP | wall |\n| --- | --: | --: | --: | --: | --: | --: | --: |\n",
    );
    for (run, r) in &results {
        table.push_str(&format!(
            "| {} | {} | {:.2} M | {} | {} | {:.4} | {:+.2}% | {:.0} s |\n",
            run.label,
            r.syncs,
            r.tokens / 1e6,
            human_bytes(r.bytes),
            if run.name == "dp" {
                "1×".into()
            } else {
                format!("{:.0}×", dp.bytes / r.bytes)
            },
            r.final_loss,
            100.0 * (r.final_loss / dp.final_loss - 1.0),
            r.wall,
        ));
    }
    let (h100, h500, r1, r8, again) = (
        get("h100")?,
        get("h500")?,
        get("r1")?,
        get("h100")?,
        get("r1again")?,
    );
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let within = |r: &SimResult, pct: f64| r.final_loss <= dp.final_loss * (1.0 + pct / 100.0);
    let acceptance = format!(
        "- H=100, 8 peers: {:+.2}% vs data-parallel, {:.0}× fewer bytes (target: within 2%, ≥ 100×): {}.\n\
         - H=500, 8 peers: {:+.2}% vs data-parallel (target: within 5%): {}.\n\
         - 8 peers vs 1 peer at equal steps per peer (H=100): {:.4} vs {:.4}: {}.\n\
         - Determinism: the 1-peer run repeated in a fresh process gives θ BLAKE3 {} and {}: {}.\n",
        100.0 * (h100.final_loss / dp.final_loss - 1.0),
        dp.bytes / h100.bytes,
        verdict(within(h100, 2.0) && dp.bytes / h100.bytes >= 100.0),
        100.0 * (h500.final_loss / dp.final_loss - 1.0),
        verdict(within(h500, 5.0)),
        r8.final_loss,
        r1.final_loss,
        verdict(r8.final_loss < r1.final_loss),
        &r1.params_blake3[..16],
        &again.params_blake3[..16],
        verdict(r1.params_blake3 == again.params_blake3),
    );
    // Compression on top of DiLoCo H=100: the best codec that sends ≥ 1000× fewer bytes than DP.
    let compressed = ["int8", "int4", "int2", "topk", "topk2", "btopk2"];
    let best = results
        .iter()
        .filter(|(r, s)| compressed.contains(&r.name) && dp.bytes / s.bytes >= 1000.0)
        .min_by(|a, b| a.1.final_loss.total_cmp(&b.1.final_loss));
    let acceptance = match best {
        Some((run, r)) => format!(
            "{acceptance}- Compression: the best codec with ≥ 1000× fewer bytes than data-parallel is {}: {:.0}× fewer, \
             {:+.2}% vs the uncompressed H=100 run (target: within 2%): {}; {:+.2}% vs data-parallel, which the \
             uncompressed H=100 run already misses by {:+.2}%.\n",
            run.label,
            dp.bytes / r.bytes,
            100.0 * (r.final_loss / h100.final_loss - 1.0),
            verdict(r.final_loss <= h100.final_loss * 1.02),
            100.0 * (r.final_loss / dp.final_loss - 1.0),
            100.0 * (h100.final_loss / dp.final_loss - 1.0),
        ),
        None => format!(
            "{acceptance}- Compression: no codec sent ≥ 1000× fewer bytes than data-parallel: NOT met.\n"
        ),
    };
    let dir = root().join("docs/benchmarks");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let curves: Vec<Curve> = results
        .iter()
        .filter(|(r, _)| r.name != "r1again")
        .map(|(r, s)| (r.label.as_str(), s.curve.as_slice()))
        .collect();
    fs::write(
        dir.join("diloco-loss-vs-tokens.svg"),
        svg_plot(
            "validation loss vs tokens",
            "tokens (M)",
            &curves,
            |p| p.0 / 1e6,
            false,
        ),
    )
    .map_err(|e| e.to_string())?;
    fs::write(
        dir.join("diloco-loss-vs-bytes.svg"),
        svg_plot(
            "validation loss vs bytes sent",
            "bytes (log10)",
            &curves,
            |p| p.1,
            true,
        ),
    )
    .map_err(|e| e.to_string())?;
    let report = format!(
        "# DiLoCo vs data-parallel on the byte-level language model\n\n\
         Produced by `cargo xtask bench diloco` in {wall:.0} s on {parallel} cores. Every run goes \
         through `swarmtrain-relay simulate`, which trains N peers in one process with the shared \
         code (`shared/src/sim.rs`) on the ndarray CPU backend and counts 2 × payload per sync per \
         peer. Corpus: Debian's `fortunes` package (`/usr/share/games/fortunes`, read at run time), \
         5% held out by 4 KiB blocks. All runs share θ₀, a 300-step single-replica warm start \
         (as DiLoCo starts from a pretrained model) and the data: at step s peer p reads the same \
         windows in every run, and the data-parallel baseline reads all 8 peers' windows at once \
         (equal tokens). Settings: `{common}`; inner AdamW (β 0.9/0.95, wd 0.1, global-norm clip \
         1.0) with warm-up and cosine to 10%; outer Nesterov lr 0.7, momentum 0.9.\n\n{table}\n\
         ## Acceptance\n\n{acceptance}\n\
         ![loss vs tokens](diloco-loss-vs-tokens.svg)\n\n![loss vs bytes](diloco-loss-vs-bytes.svg)\n"
    );
    fs::write(dir.join("diloco.md"), &report).map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(())
}

fn human_bytes(b: f64) -> String {
    match b {
        b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b => format!("{:.0} kB", b / 1e3),
    }
}

/// A small line plot as SVG: one polyline per run, y = validation loss.
fn svg_plot(
    title: &str,
    x_label: &str,
    curves: &[Curve],
    x_of: impl Fn(&CurvePoint) -> f64,
    log_x: bool,
) -> String {
    const COLORS: [&str; 16] = [
        "#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
        "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#e7ba52", "#ad494a", "#637939", "#7b4173",
    ];
    let (w, h, left, right, top, bottom) = (990.0, 460.0, 60.0, 360.0, 30.0, 45.0);
    let fx = |p: &CurvePoint| {
        let x = x_of(p);
        if log_x { x.max(1.0).log10() } else { x }
    };
    let points: Vec<&CurvePoint> = curves
        .iter()
        .flat_map(|(_, c)| c.iter())
        .filter(|p| !log_x || x_of(p) > 0.0)
        .collect();
    let (x0, x1) = points.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(fx(p)), b.max(fx(p)))
    });
    let (y0, y1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.2), b.max(p.2)));
    let sx = |x: f64| left + (x - x0) / (x1 - x0).max(1e-9) * (w - left - right);
    let sy = |y: f64| top + (y1 - y) / (y1 - y0).max(1e-9) * (h - top - bottom);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"18\" font-size=\"14\">{title}</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#444\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"#444\"/>\n",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for i in 0..=4 {
        let (x, y) = (
            x0 + (x1 - x0) * f64::from(i) / 4.0,
            y0 + (y1 - y0) * f64::from(i) / 4.0,
        );
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{x:.1}</text>\n",
            sx(x),
            h - bottom + 16.0
        ));
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{y:.2}</text>\n",
            left - 6.0,
            sy(y) + 4.0
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n",
        (left + w - right) / 2.0,
        h - 8.0
    ));
    for (i, (label, curve)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = curve
            .iter()
            .filter(|p| !log_x || x_of(p) > 0.0)
            .map(|p| format!("{:.1},{:.1}", sx(fx(p)), sy(p.2)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            path.join(" ")
        ));
        let ly = top + 16.0 * i as f64;
        svg.push_str(&format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{:.1}\">{label}</text>\n",
            w - right + 10.0,
            w - right + 30.0,
            w - right + 35.0,
            ly + 4.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

/// Resident and peak memory of process `pid`, in kB, from /proc.
fn memory_kb(pid: u32) -> Result<(f64, f64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// 1,000 simulated peers on one relay process over loopback TCP (noise, yamux, ML-DSA-signed
/// requests): memory per peer and the time from round close to announcement received.
/// `swarmtrain-peer soak` on a release build (extra arguments go to it, e.g. `--rounds 20000`).
/// The honest round time with and without a hostile flood (`tests/benches/flood.rs`), written
/// to docs/benchmarks/flood.md.
/// The relay's θ bytes out for browsers joining one round, without and with browser-to-browser
/// links (`tests/browser/joiners.mjs` writes docs/benchmarks/joiners.md).
fn bench_joiners() -> Result {
    setup_wasm()?;
    build_wasm()?;
    setup_browser()?;
    let relay = build_relay()?;
    status(
        Command::new("node")
            .arg("joiners.mjs")
            .current_dir(root().join("tests/browser"))
            .env("SWARMTRAIN_RELAY_BIN", relay)
            .env("SWARMTRAIN_ROOT", root()),
    )
}

fn bench_flood() -> Result {
    let report = root().join("docs/benchmarks/flood.md");
    status(
        cargo()
            .args(["bench", "-p", "swarmtrain-tests", "--bench", "flood"])
            .env("SWARMTRAIN_FLOOD_REPORT", &report)
            .env("RUST_LOG", "error"),
    )
}

/// The release relay and the release `swarmtrain-peer` (the load generators).
fn build_release_relay_and_peer() -> Result {
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

fn bench_soak(args: &[String]) -> Result {
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

fn bench_load() -> Result {
    use std::io::{BufRead, BufReader};
    let (peers, rounds, senders) = (1000, 5, 20);
    build_release_relay_and_peer()?;
    let relay_bin = target_dir().join("release/swarmtrain-relay");
    let data = target_dir().join("bench-load-data");
    let _ = fs::remove_dir_all(&data);
    let mut relay = Command::new(&relay_bin)
        .args([
            "serve",
            "--model",
            "digits",
            "--http",
            "127.0.0.1:0",
            "--tcp-port",
            "0",
            "--ws-port",
            "0",
            "--round-deadline-secs",
            "600",
        ])
        .args(["--quorum", &senders.to_string()])
        .arg("--data-dir")
        .arg(&data)
        .arg("--web-dir")
        .arg(root().join("web"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", relay_bin.display()))?;
    let stdout = relay.stdout.take().ok_or("no relay stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = lines
        .by_ref()
        .map_while(std::result::Result::ok)
        .find_map(|l| {
            l.strip_prefix("swarmtrain relay listening on ")
                .map(str::to_owned)
        })
        .ok_or("the relay did not start")?;
    // Keep reading, so that the relay never writes to a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let pid = relay.id();
    let (idle_kb, _) = memory_kb(pid)?;
    let out = Command::new(target_dir().join("release/swarmtrain-peer"))
        .args(["loadtest", "--relay", &url])
        .args([
            "--peers",
            &peers.to_string(),
            "--rounds",
            &rounds.to_string(),
            "--senders",
            &senders.to_string(),
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| e.to_string());
    let memory = memory_kb(pid);
    let _ = relay.kill();
    let _ = relay.wait();
    let out = out?;
    if !out.status.success() {
        return Err("the load test failed".into());
    }
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    let (loaded_kb, peak_kb) = memory?;
    let per_peer_kb = (loaded_kb - idle_kb) / f64::from(peers);
    let report = format!(
        "# Load: {peers} simulated peers on one relay\n\n\
         Produced by `cargo xtask bench load` on {} cores: a release relay process (persistence on: \
         every update is committed to redb, every round checkpointed) and one `swarmtrain-peer \
         loadtest` process holding {peers} libp2p connections over loopback TCP (noise, yamux; \
         request-response, gossipsub, identify, ping), each peer ML-DSA-signing its join, \
         subscribing to the run's gossipsub topic and verifying every announcement it gets there. \
         Each round {senders} peers send an update (the quorum, 19 KB signed, in three 7 KiB \
         parts); the clock starts when the closing update is sent and stops when a peer has \
         verified the next round's announcement.\n\n\
         | figure | value |\n| --- | --: |\n\
         | peers connected | {} |\n| rounds completed | {} |\n| connect + join, all peers | {:.1} s |\n\
         | close → announcement, p50 | {:.0} ms |\n| close → announcement, p99 | {:.0} ms |\n\
         | close → announcement, max | {:.0} ms |\n| relay memory, idle | {:.1} MB |\n\
         | relay memory, {peers} peers | {:.1} MB (peak {:.1} MB) |\n| relay memory per peer | {per_peer_kb:.0} KB |\n\n\
         Memory is the relay's resident set (VmRSS) when the load test has finished, minus its \
         resident set before the peers connected, over the peer count.\n\n\
         Goals: ≥ 1,000 peers, p99 < 1 s, < 100 KB per peer.\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        json_number(&json, "peers")?,
        json_number(&json, "rounds_completed")?,
        json_number(&json, "connect_seconds")?,
        json_number(&json, "latency_ms_p50")?,
        json_number(&json, "latency_ms_p99")?,
        json_number(&json, "latency_ms_max")?,
        idle_kb / 1024.0,
        loaded_kb / 1024.0,
        peak_kb / 1024.0,
    );
    let dir = root().join("docs/benchmarks");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    fs::write(dir.join("load.md"), &report).map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(())
}
