//! `cargo xtask bench load`: 1,000 simulated peers on one relay process.

use std::fs;
use std::process::Command;

use crate::Result;
use crate::commands::build::build_release_relay_and_peer;
use crate::utils::*;

/// 1,000 simulated peers on one relay process over loopback TCP (noise, yamux, ML-DSA-signed
/// requests): memory per peer and the time from round close to announcement received.
pub(crate) fn bench_load() -> Result {
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
    let json = parse(
        &String::from_utf8_lossy(&out.stdout),
        "the load test's output",
    )?;
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
    let dir = root().join("docs/benchmarks");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    fs::write(dir.join("load.md"), &report).map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(())
}
