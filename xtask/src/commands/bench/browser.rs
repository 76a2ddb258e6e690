//! `cargo xtask bench browser`: training speed of the models in `bench/browser/plan.json` with
//! the code a peer runs (Burn WebGPU and Burn CPU in headless Chromium, ndarray and wgpu
//! natively) beside TF.js 4.22 (webgpu and wasm) on the same models in the same browser; the
//! time from page load to the first training step; the npm package's size. Writes
//! `docs/benchmarks/browser.md`.

use std::fs;
use std::process::Command;

use serde_json::Value;

use crate::Result;
use crate::commands::build::build_wasm;
use crate::utils::{
    cargo, criterion_median, npm_ci, root, setup_browser, setup_wasm, status, target_dir,
};

/// The browser cells, in the page's order: (engine, backend, column heading).
const CELLS: &[(&str, &str, &str)] = &[
    ("burn", "webgpu", "Burn WebGPU"),
    ("tfjs", "webgpu", "TF.js webgpu"),
    ("burn", "cpu", "Burn CPU (wasm)"),
    ("tfjs", "wasm", "TF.js wasm"),
];

/// `report_only`: rewrite the report from the last run's results without measuring again.
pub fn run(report_only: bool) -> Result {
    if !report_only {
        measure()?;
    }
    let bench_dir = root().join("bench/browser");
    let read = |path: &std::path::Path| -> Result<Value> {
        let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    };
    let plan = read(&bench_dir.join("plan.json"))?;
    let results = read(&target_dir().join("bench-browser/results.json"))?;
    let report = report(&plan, &results)?;
    let docs = root().join("docs/benchmarks");
    fs::create_dir_all(&docs).map_err(|e| e.to_string())?;
    fs::write(docs.join("browser.md"), &report).map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(())
}

fn measure() -> Result {
    setup_wasm()?;
    setup_browser()?;
    build_wasm()?;
    let bench_dir = root().join("bench/browser");
    npm_ci(&bench_dir, "@tensorflow/tfjs")?;
    // Native first, with the machine to itself.
    status(cargo().args([
        "bench",
        "-p",
        "swarmtrain-client",
        "--features",
        "wgpu",
        "--bench",
        "train",
    ]))?;
    let out_dir = target_dir().join("bench-browser");
    fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let results_file = out_dir.join("results.json");
    status(
        Command::new("node")
            .arg(bench_dir.join("run.mjs"))
            .arg(&results_file)
            .current_dir(&bench_dir),
    )?;
    Ok(())
}

/// The page's result for one cell.
fn cell<'a>(results: &'a Value, engine: &str, backend: &str) -> Option<&'a Value> {
    results["results"]
        .as_array()?
        .iter()
        .find(|r| r["engine"] == engine && r["backend"] == backend)
}

/// Steps per second of `model` in a browser cell (None where the cell failed).
fn browser_rate(results: &Value, engine: &str, backend: &str, model: &str) -> Option<f64> {
    cell(results, engine, backend)?["models"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == model)?["stepsPerSecond"]
        .as_f64()
}

/// Steps per second of `model` natively: criterion's median round, `steps` steps a round.
fn native_rate(model: &str, backend: &str, steps: f64) -> Option<f64> {
    criterion_median(&format!("train_{model}"), backend)
        .ok()
        .map(|round| steps / round)
}

fn rate(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 100.0 => format!("{r:.0}"),
        Some(r) if r >= 10.0 => format!("{r:.1}"),
        Some(r) => format!("{r:.2}"),
        None => "failed".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?)
}

fn goal(name: &str, value: Option<f64>, target: f64, higher_is_better: bool) -> String {
    match value {
        Some(v) => {
            let met = if higher_is_better {
                v >= target
            } else {
                v <= target
            };
            format!(
                "- {name}: {v:.3}× (goal {} {target}×): {}\n",
                if higher_is_better { "≥" } else { "≤" },
                if met { "met" } else { "NOT met" }
            )
        }
        None => format!("- {name}: not measured (a cell failed)\n"),
    }
}

fn report(plan: &Value, results: &Value) -> Result<String> {
    let models = plan["models"].as_array().ok_or("plan.json has no models")?;
    let mut table = String::from("| model | ");
    for (_, _, heading) in CELLS {
        table.push_str(heading);
        table.push_str(" | ");
    }
    table.push_str(
        "native ndarray | native wgpu (lavapipe) | Burn / TF.js, GPU | Burn / TF.js, CPU | native / browser, ndarray | native / browser, wgpu |\n",
    );
    table.push_str(&"| --- ".repeat(1 + CELLS.len()));
    table.push_str(&"| --: ".repeat(6));
    table.push_str("|\n");
    let mut goals = String::new();
    for m in models {
        let name = m["name"].as_str().ok_or("a model without a name")?;
        let label = m["label"].as_str().unwrap_or(name);
        let steps = m["steps"].as_f64().ok_or("a model without steps")?;
        let b = |engine, backend| browser_rate(results, engine, backend, name);
        let (burn_gpu, tf_gpu, burn_cpu, tf_cpu) = (
            b("burn", "webgpu"),
            b("tfjs", "webgpu"),
            b("burn", "cpu"),
            b("tfjs", "wasm"),
        );
        let (nd, wgpu) = (
            native_rate(name, "ndarray", steps),
            native_rate(name, "wgpu", steps),
        );
        let x = |r: Option<f64>| r.map_or("—".into(), |r| format!("{r:.2}×"));
        table.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            rate(burn_gpu),
            rate(tf_gpu),
            rate(burn_cpu),
            rate(tf_cpu),
            rate(nd),
            rate(wgpu),
            x(ratio(burn_gpu, tf_gpu)),
            x(ratio(burn_cpu, tf_cpu)),
            x(ratio(nd, burn_cpu)),
            x(ratio(wgpu, burn_gpu)),
        ));
        if name.starts_with("lm") {
            goals.push_str(&goal(
                &format!("{label}: Burn WebGPU / TF.js webgpu"),
                ratio(burn_gpu, tf_gpu),
                1.5,
                true,
            ));
            goals.push_str(&goal(
                &format!("{label}: Burn CPU / TF.js wasm"),
                ratio(burn_cpu, tf_cpu),
                1.5,
                true,
            ));
        }
        goals.push_str(&goal(
            &format!("{label}: native ndarray / Burn CPU in the browser"),
            ratio(nd, burn_cpu),
            1.5,
            false,
        ));
        goals.push_str(&goal(
            &format!("{label}: native wgpu / Burn WebGPU in the browser"),
            ratio(wgpu, burn_gpu),
            1.5,
            false,
        ));
    }

    let mut first = String::from(
        "| engine | backend | first step after page load | detail |\n| --- | --- | --: | --- |\n",
    );
    let mut errors = String::new();
    for (engine, backend, heading) in CELLS {
        let Some(c) = cell(results, engine, backend) else {
            continue;
        };
        if let Some(e) = c["error"].as_str() {
            errors.push_str(&format!("- {heading}: {}\n", e.lines().next().unwrap_or(e)));
        }
        first.push_str(&format!(
            "| {heading} | {backend} | {} | {} |\n",
            c["firstStepMs"]
                .as_f64()
                .map_or("—".into(), |ms| format!("{:.2} s", ms / 1e3)),
            c["detail"].as_str().unwrap_or("—"),
        ));
    }
    let wasm = root().join("web/pkg/swarmtrain_bg.wasm");
    let raw = fs::metadata(&wasm).map_err(|e| e.to_string())?.len();
    let (gz, br) = crate::utils::compressed_sizes(&wasm)?;
    let js = fs::metadata(root().join("web/pkg/swarmtrain.js"))
        .map_err(|e| e.to_string())?
        .len();
    let (js_gz, js_br) = crate::utils::compressed_sizes(&root().join("web/pkg/swarmtrain.js"))?;
    // What a browser downloads from the relay: the brotli files `build-wasm` writes.
    let wire = br + js_br;
    goals.push_str(&format!(
        "- The npm package ≤ 2.5 MB on the wire (brotli, as the relay serves it): {:.2} MB \
         ({:.2} MB gzip): {}\n",
        wire as f64 / 1e6,
        (gz + js_gz) as f64 / 1e6,
        if wire <= 2_500_000 { "met" } else { "NOT met" }
    ));
    let chromium = results["chromium"].as_str().unwrap_or("?");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(format!(
        "# Training speed in the browser: Burn against TF.js\n\n\
         Produced by `cargo xtask bench browser` in one run on {cores} cores, no GPU: WebGPU is \
         Chromium's SwiftShader (Vulkan on the CPU), native wgpu is Mesa's lavapipe. Headless \
         Chromium {chromium}. Every figure is training steps per second: the median over rounds \
         of a round of H steps, then the summed loss and the parameters read back, as a peer \
         trains a round (`client-wasm/src/replica.rs`). Burn is the swarmtrain npm package's \
         `TrainingBench` (the same replica the contributor's tab runs) and \
         `client-wasm/benches/train.rs` natively; TF.js 4.22 runs the same architectures with \
         the same batch, AdamW and clipping (`bench/browser/tfjs-models.js`, written for this \
         benchmark). Models, batches and H: `bench/browser/plan.json`.\n\n\
         ## Steps per second\n\n{table}\n\
         ## From page load to the first training step\n\n\
         A fresh browser context per row, so nothing is cached: load the engine, start the \
         backend, build the first model (the digits MLP), one step, read back.\n\n{first}\n\
         ## Size\n\n\
         The npm package's wasm: {:.2} MB raw, {:.2} MB gzip (`gzip -9`), {:.2} MB brotli \
         (quality 11, what the relay serves); its JavaScript glue {:.0} kB raw.\n\n\
         ## Goals\n\n{goals}{}",
        raw as f64 / 1e6,
        gz as f64 / 1e6,
        br as f64 / 1e6,
        js as f64 / 1e3,
        if errors.is_empty() {
            String::new()
        } else {
            format!("\n## Cells that failed\n\n{errors}")
        }
    ))
}
