//! `cargo xtask fuzz [--seconds N] [TARGET…]`: runs the `cargo fuzz` targets in `fuzz/` (every
//! wire decoder, the signed-envelope verifier, reassembly, the codec decoders, the checkpoint
//! reader and the run-spec parser) for a bounded time each, on the nightly toolchain, and writes
//! their executions and coverage to `docs/benchmarks/fuzz.md`. Installs the nightly toolchain
//! and `cargo-fuzz` when missing. A crash stops with the target's name; libFuzzer leaves the
//! input under `fuzz/artifacts/<target>/`, to be turned into a regression test.

use std::fs;
use std::process::Command;

use crate::Result;
use crate::utils::{cargo, describe, output, root, status, target_dir};

/// The targets, as `fuzz/Cargo.toml` names them.
const TARGETS: &[(&str, &str)] = &[
    (
        "wire",
        "request, answer and gossip frame decoders (and the signature check of a decoded submission)",
    ),
    (
        "envelope",
        "the signed-envelope verifier on a valid message with bits flipped",
    ),
    (
        "reassembly",
        "long messages from parts of 16 senders in any order",
    ),
    ("codec", "every codec's decoder with any parameters"),
    ("checkpoint", "the safetensors checkpoint reader"),
    (
        "run_spec",
        "a run's spec, postcard and JSON, and its validation",
    ),
];

struct Outcome {
    target: &'static str,
    runs: u64,
    cov: u64,
    features: u64,
    exec_per_s: u64,
    corpus: usize,
}

pub fn run(args: &[String]) -> Result {
    let mut seconds = 60u64;
    let mut chosen = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--seconds needs a number")?;
            }
            name => match TARGETS.iter().find(|(t, _)| *t == name) {
                Some((t, _)) => chosen.push(*t),
                None => return Err(format!("no fuzz target {name:?}")),
            },
        }
    }
    if chosen.is_empty() {
        chosen = TARGETS.iter().map(|(t, _)| *t).collect();
    }
    setup()?;
    let mut outcomes = Vec::new();
    for target in chosen {
        let corpus = root().join("fuzz/corpus").join(target);
        fs::create_dir_all(&corpus).map_err(|e| format!("creating {}: {e}", corpus.display()))?;
        // Through rustup: `$CARGO` is the stable toolchain's own cargo, which ignores `+nightly`.
        let mut cmd = Command::new("rustup");
        cmd.current_dir(root())
            .args([
                "run",
                "nightly",
                "cargo",
                "fuzz",
                "run",
                "--fuzz-dir",
                "fuzz",
                "-s",
                "none",
            ])
            .arg(target)
            .arg(&corpus)
            .args(["--", "-print_final_stats=1"])
            .arg(format!("-max_total_time={seconds}"))
            .env("CARGO_TARGET_DIR", target_dir().join("fuzz"));
        eprintln!("xtask: $ {}", describe(&cmd));
        let out = cmd
            .output()
            .map_err(|e| format!("could not start cargo fuzz: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "fuzz target {target} failed ({}); the input is under fuzz/artifacts/{target}/:\n{}",
                out.status,
                tail.join("\n")
            ));
        }
        let outcome = parse(target, &log, &corpus)?;
        eprintln!(
            "xtask: {target}: {} runs in {seconds} s ({} exec/s), coverage {} edges, {} features",
            outcome.runs, outcome.exec_per_s, outcome.cov, outcome.features
        );
        outcomes.push(outcome);
    }
    write_report(&outcomes, seconds)
}

/// Installs the nightly toolchain and cargo-fuzz if they are missing.
fn setup() -> Result {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if output(cargo().args(["fuzz", "--version"])).is_none() {
        status(cargo().args(["install", "--locked", "cargo-fuzz"]))?;
    }
    Ok(())
}

/// Reads libFuzzer's final statistics and its last status line.
fn parse(target: &'static str, log: &str, corpus: &std::path::Path) -> Result<Outcome> {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains(" cov: ") && l.contains(" ft: "))
        .unwrap_or_default();
    let field = |name: &str| {
        last.split_whitespace()
            .skip_while(|w| *w != name)
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Outcome {
        target,
        runs: stat("number_of_executed_units")
            .ok_or_else(|| format!("{target}: libFuzzer printed no statistics"))?,
        exec_per_s: stat("average_exec_per_sec").unwrap_or(0),
        cov: field("cov:"),
        features: field("ft:"),
        corpus: fs::read_dir(corpus).map_or(0, |d| d.count()),
    })
}

fn write_report(outcomes: &[Outcome], seconds: u64) -> Result {
    let mut md = String::from(
        "# Fuzzing\n\n`cargo xtask fuzz --seconds N [TARGET…]`: each `cargo fuzz` target of `fuzz/` ran \
         for the seconds in its row on one core (a target not named in a later run keeps its row \
         from the run that measured it) (libFuzzer, no sanitizer: the code under test is safe Rust, \
         so a crash is a panic, an overflow or a failed assertion), from the corpus kept in \
         `fuzz/corpus/` (not in git). Coverage is libFuzzer's count of covered edges (`cov`) and \
         features (`ft`) in the whole binary, the Burn and postcard code linked in included.\n\n\
         | target | what it feeds | seconds | executions | exec/s | cov | ft | corpus |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    // Targets not run this time keep their row from the last report (marked with its time).
    let path = root().join("docs/benchmarks/fuzz.md");
    let previous = fs::read_to_string(&path).unwrap_or_default();
    for (target, what) in TARGETS {
        match outcomes.iter().find(|o| o.target == *target) {
            Some(o) => md.push_str(&format!(
                "| `{}` | {what} | {seconds} | {} | {} | {} | {} | {} |\n",
                o.target, o.runs, o.exec_per_s, o.cov, o.features, o.corpus
            )),
            None => {
                if let Some(row) = previous
                    .lines()
                    .find(|l| l.starts_with(&format!("| `{target}` |")))
                {
                    md.push_str(row);
                    md.push('\n');
                }
            }
        }
    }
    md.push_str("\nNo target crashed.\n");
    fs::write(&path, md).map_err(|e| format!("writing {}: {e}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}
