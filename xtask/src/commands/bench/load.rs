//! `cargo xtask bench load [--relays N] [--peers M]`: simulated peers on one relay process, or on
//! the N edge relays of a federation's root.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::Result;
use crate::commands::build::build_release_relay_and_peer;
use crate::utils::*;

/// Rounds closed and updates per round (the relays' quorum) in every configuration.
const ROUNDS: u32 = 5;
const SENDERS: u32 = 20;

/// `--relays N` (default 1) and `--peers M` (default 1,000): one relay (N = 1, the report
/// `docs/benchmarks/load.md`) or a root and N edges (`docs/benchmarks/federation.md`, one row
/// per configuration measured).
pub(crate) fn bench_load(args: &[String]) -> Result {
    let mut relays = 1u32;
    let mut peers = 1000u32;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| format!("{arg} takes a number"))?;
        match arg.as_str() {
            "--relays" => relays = value.max(1),
            "--peers" => peers = value.max(SENDERS),
            _ => return Err(format!("unknown option {arg} (--relays N, --peers M)")),
        }
    }
    build_release_relay_and_peer()?;
    if relays == 1 {
        bench_one(peers)
    } else {
        bench_federation(relays, peers)
    }
}

/// A release relay process on `data` with `extra` options, and its URL; with `following`, once
/// it follows its root (an edge logs it).
fn start_relay(data: &Path, extra: &[&str], following: bool) -> Result<(Child, String)> {
    let relay_bin = target_dir().join("release/swarmtrain-relay");
    let _ = fs::remove_dir_all(data);
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
        .args(["--quorum", &SENDERS.to_string()])
        // Every simulated peer comes from one address (the load generator on loopback).
        .args(["--connections-per-ip", "100000"])
        .arg("--data-dir")
        .arg(data)
        .arg("--web-dir")
        .arg(root().join("web"))
        .args(extra)
        .env("RUST_LOG", "warn,swarmtrain_relay::federation=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
    let stderr = relay.stderr.take().ok_or("no relay stderr")?;
    let mut errors = BufReader::new(stderr).lines();
    if following {
        errors
            .by_ref()
            .map_while(std::result::Result::ok)
            .find(|l| l.contains("edge relay following its root"))
            .ok_or("the edge never followed its root")?;
    }
    std::thread::spawn(move || errors.for_each(drop));
    Ok((relay, url))
}

/// `swarmtrain-peer loadtest` against `relays`, its JSON report.
fn loadtest(relays: &[String], peers: u32, metrics_of: Option<&str>) -> Result<serde_json::Value> {
    let mut command = Command::new(target_dir().join("release/swarmtrain-peer"));
    command.arg("loadtest");
    for url in relays {
        command.args(["--relay", url]);
    }
    if let Some(url) = metrics_of {
        command.args(["--metrics-of", url]);
    }
    let out = command
        .args([
            "--peers",
            &peers.to_string(),
            "--rounds",
            &ROUNDS.to_string(),
            "--senders",
            &SENDERS.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err("the load test failed".into());
    }
    parse(
        &String::from_utf8_lossy(&out.stdout),
        "the load test's output",
    )
}

fn stop(mut relay: Child) {
    let _ = relay.kill();
    let _ = relay.wait();
}

/// Simulated peers on one relay process over loopback TCP (noise, yamux, ML-DSA-signed
/// requests): memory per peer and the time from round close to announcement received.
fn bench_one(peers: u32) -> Result {
    let (relay, url) = start_relay(&target_dir().join("bench-load-data"), &[], false)?;
    let pid = relay.id();
    let (idle_kb, _) = memory_kb(pid)?;
    let out = loadtest(&[url], peers, None);
    let memory = memory_kb(pid);
    stop(relay);
    let json = out?;
    let (loaded_kb, peak_kb) = memory?;
    let per_peer_kb = (loaded_kb - idle_kb) / f64::from(peers);
    let report = format!(
        "# Load: {peers} simulated peers on one relay\n\n\
         Produced by `cargo xtask bench load` on {} cores: a release relay process (persistence on: \
         every update is committed to redb, every round checkpointed) and one `swarmtrain-peer \
         loadtest` process holding {peers} libp2p connections over loopback TCP (noise, yamux; \
         request-response, gossipsub, identify, ping), each peer ML-DSA-signing its join, \
         subscribing to the run's gossipsub topic and verifying every announcement it gets there. \
         Each round {SENDERS} peers send an update (the quorum, 19 KB signed, in three 7 KiB \
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
        cores(),
        number(&json, "peers")?,
        number(&json, "rounds_completed")?,
        number(&json, "connect_seconds")?,
        number(&json, "latency_ms_p50")?,
        number(&json, "latency_ms_p99")?,
        number(&json, "latency_ms_max")?,
        idle_kb / 1024.0,
        loaded_kb / 1024.0,
        peak_kb / 1024.0,
    );
    write_report("load.md", &report)
}

/// A root relay and `edges` edge relays (`--upstream`), each its own release process, and
/// `peers` simulated peers spread over the edges: the announcement latency at the peers, the
/// root's request-response bytes per round and every relay's memory per peer. Each run
/// replaces its configuration's row in `docs/benchmarks/federation.md`.
fn bench_federation(edges: u32, peers: u32) -> Result {
    let data = target_dir().join("bench-federation-data");
    let (root_relay, root_url) = start_relay(&data.join("root"), &[], false)?;
    let mut relays = Vec::new();
    for i in 0..edges {
        match start_relay(
            &data.join(format!("edge-{i}")),
            &["--upstream", &root_url],
            true,
        ) {
            Ok(edge) => relays.push(edge),
            Err(e) => {
                relays.into_iter().for_each(|(edge, _)| stop(edge));
                stop(root_relay);
                return Err(e);
            }
        }
    }
    let pids: Vec<u32> = std::iter::once(root_relay.id())
        .chain(relays.iter().map(|(edge, _)| edge.id()))
        .collect();
    let idle: Vec<f64> = pids
        .iter()
        .map(|&pid| memory_kb(pid).map_or(0.0, |m| m.0))
        .collect();
    let urls: Vec<String> = relays.iter().map(|(_, url)| url.clone()).collect();
    let out = loadtest(&urls, peers, Some(&root_url));
    let loaded: Vec<f64> = pids
        .iter()
        .map(|&pid| memory_kb(pid).map_or(0.0, |m| m.0))
        .collect();
    relays.into_iter().for_each(|(edge, _)| stop(edge));
    stop(root_relay);
    let json = out?;
    let per_edge = f64::from(peers) / f64::from(edges);
    let edge_kb_per_peer = (1..pids.len())
        .map(|i| (loaded[i] - idle[i]) / per_edge)
        .fold(0.0f64, f64::max);
    let row = format!(
        "| {edges} | {peers} | {:.1} s | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} KB | {:.1} MB | {:.1} KB | {edge_kb_per_peer:.0} KB |",
        number(&json, "connect_seconds")?,
        number(&json, "latency_ms_p50")?,
        number(&json, "latency_ms_p99")?,
        number(&json, "latency_ms_max")?,
        number(&json, "metrics_rpc_bytes_per_round")? / 1e3,
        loaded[0] / 1024.0,
        (loaded[0] - idle[0]) / f64::from(peers),
    );
    let path = root().join("docs/benchmarks/federation.md");
    let mut rows: Vec<String> = fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("| ") && l.chars().nth(2).is_some_and(|c| c.is_ascii_digit()))
        .filter(|l| !l.starts_with(&format!("| {edges} | {peers} |")))
        .map(str::to_owned)
        .collect();
    rows.push(row);
    rows.sort_by_key(|r| {
        let cells: Vec<u64> = r
            .split('|')
            .filter_map(|c| c.trim().parse().ok())
            .take(2)
            .collect();
        (cells.get(1).copied(), cells.first().copied())
    });
    let report = format!(
        "# Load: a federation of relays\n\n\
         Produced by `cargo xtask bench load --relays N --peers M` on {} cores, one row per \
         configuration measured (each run replaces its own row). One root relay and N edge \
         relays (`serve --upstream`), each a release process with a data directory, the digits \
         run with quorum {SENDERS}; one `swarmtrain-peer loadtest` process holds the M simulated \
         peers, peer i joined to edge i mod N over loopback TCP (noise, yamux), each verifying \
         the root's signed announcements that its edge gossips. Each of {ROUNDS} rounds, \
         {SENDERS} peers (spread over the edges) send an update (19 KB of f32, signed, in parts) \
         that their edge checks and forwards to the root; the clock starts when the closing \
         update is sent and stops when a peer has verified the next round's announcement (the \
         root closes and checkpoints the round, the edges' long polls hear of it, each fetches \
         θ once and gossips the announcement).\n\n\
         Root bytes per round: the request-response frames the root received and sent over the \
         rounds (its `/metrics`), per round: the forwarded updates, the edges' long polls and θ \
         fetches. Root memory per peer: its resident set's growth over M (the root keeps a \
         joined record per peer, not its connection). Edge memory per peer: the largest edge's \
         growth over its M/N peers.\n\n\
         | edges | peers | connect + join | p50 | p99 | max | root bytes / round | root memory | root memory per peer | edge memory per peer |\n\
         | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: |\n\
         {}\n\n\
         Goals: 10,000 peers over 4 relays, p99 < 1 s, ≤ 50 KB per peer; root bytes per round \
         independent of M.\n",
        cores(),
        rows.join("\n")
    );
    write_report("federation.md", &report)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn write_report(name: &str, report: &str) -> Result {
    let dir = root().join("docs/benchmarks");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    fs::write(dir.join(name), report).map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(())
}
