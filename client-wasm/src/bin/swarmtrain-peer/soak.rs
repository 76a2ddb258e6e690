//! `swarmtrain-peer soak`: a relay process driven through many fast rounds by one peer, to show
//! that a run that lasts weeks keeps a flat cost per round, bounded memory, and disk bounded by
//! the retention policy.
//!
//! It starts `swarmtrain-relay serve` as a child process (the digits MLP with 4 hidden units,
//! quorum 1, a fresh data directory, the given retention), joins it over TCP and, round after
//! round, sends a constant update and long-polls the next announcement: every round is a real
//! close (aggregation, evaluation, checkpoint, run record, history row, announcement). Every
//! `--every` rounds it samples the round time seen by the peer, the relay's resident memory
//! (`/proc/PID/status`), the data directory's size and `/api/status`'s size.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser, Debug)]
pub(crate) struct Soak {
    /// Rounds to close.
    #[arg(long, default_value_t = 100_000)]
    rounds: u64,
    /// Sample every this many rounds.
    #[arg(long, default_value_t = 5_000)]
    every: u64,
    /// The relay's history retention (rounds).
    #[arg(long, default_value_t = 1_000)]
    history_retention_rounds: u64,
    /// The relay's ledger retention (rounds).
    #[arg(long, default_value_t = 100)]
    ledger_retention_rounds: u64,
    /// The contributor page's directory (the relay refuses to start without it).
    #[arg(long, default_value = "web")]
    web_dir: PathBuf,
    /// Write the Markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The relay binary to start (default: `swarmtrain-relay` beside this one).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
}

/// One sample of the run.
struct Sample {
    round: u64,
    /// Median round time over the last window, as the peer saw it (update sent → next round).
    median_ms: f64,
    p99_ms: f64,
    rss_kb: u64,
    disk_bytes: u64,
    status_bytes: usize,
}

/// A fresh directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "swarmtrain-soak-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The relay child, killed when dropped.
struct RelayChild(Child);

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn disk_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) async fn soak(args: Soak) -> anyhow::Result<()> {
    use swarmtrain_client::platform::http_get;
    use swarmtrain_client::rpc::RelayClient;
    use swarmtrain_shared::Identity;
    use swarmtrain_shared::protocol::{
        Capabilities, ClientToRelay, Join, PROTOCOL_VERSION, PayloadRef, RelayToClient, Update,
        params_to_bytes,
    };

    anyhow::ensure!(
        args.every >= 1 && args.rounds >= args.every,
        "--rounds ≥ --every ≥ 1"
    );
    let data = TempDir::new()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let relay_bin = match args.relay_bin.clone() {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("swarmtrain-relay"),
    };
    let mut child = Command::new(&relay_bin);
    child
        .args([
            "serve", "--model", "digits", "--hidden", "4", "--quorum", "1",
        ])
        .args([
            "--round-deadline-secs",
            "600",
            "--tcp-port",
            "0",
            "--ws-port",
            "0",
        ])
        .arg(format!("--http=127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data.path())
        .arg("--web-dir")
        .arg(&args.web_dir)
        .arg(format!(
            "--history-retention-rounds={}",
            args.history_retention_rounds
        ))
        .arg(format!(
            "--ledger-retention-rounds={}",
            args.ledger_retention_rounds
        ))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let relay = RelayChild(
        child
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", relay_bin.display()))?,
    );
    let pid = relay.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let boot = loop {
        match http_get(&format!("{base}/api/bootstrap")).await {
            Ok(bytes) => {
                break serde_json::from_slice::<swarmtrain_net::Bootstrap>(&bytes)?;
            }
            Err(_) if started.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => anyhow::bail!("the relay did not start: {e}"),
        }
    };
    let address = boot
        .addresses
        .get("tcp")
        .and_then(|a| a.first())
        .ok_or_else(|| anyhow::anyhow!("the relay has no TCP address"))?
        .parse()?;
    let identity = Identity::from_seed([42; 32]);
    let client = RelayClient::connect(address, &identity)?;
    let join = ClientToRelay::Join(Join {
        version: PROTOCOL_VERSION,
        run_id: boot.run_id.clone(),
        capabilities: Capabilities {
            backend: "none".into(),
            platform: "soak".into(),
        },
        role: swarmtrain_shared::protocol::Role::Train,
        proof_of_work: None,
    });
    let welcome = match client.send(join, Vec::new()).await? {
        RelayToClient::Welcome(w) => *w,
        other => anyhow::bail!("expected a welcome, got {other:?}"),
    };
    let relay_key = welcome.relay_key().to_vec();
    let mut round = welcome.round.verify_with_key(&relay_key)?;
    let payload = params_to_bytes(&vec![1e-4f32; round.n_params as usize]);

    let sample = |round: u64, window: &mut Vec<f64>| {
        let status = futures::executor::block_on(http_get(&format!("{base}/api/status")));
        window.sort_by(f64::total_cmp);
        let s = Sample {
            round,
            median_ms: percentile(window, 0.5),
            p99_ms: percentile(window, 0.99),
            rss_kb: rss_kb(pid),
            disk_bytes: disk_bytes(data.path()),
            status_bytes: status.map_or(0, |b| b.len()),
        };
        window.clear();
        eprintln!(
            "round {:>7}: {:.2} ms median, {:.2} ms p99, relay RSS {} KB, data {} KB, /api/status {} B",
            s.round,
            s.median_ms,
            s.p99_ms,
            s.rss_kb,
            s.disk_bytes / 1024,
            s.status_bytes
        );
        s
    };
    let mut window = Vec::new();
    let mut samples = vec![sample(round.round, &mut window)];
    let first = round.round;
    let run_started = Instant::now();
    while round.round < first + args.rounds {
        let t = Instant::now();
        let update = ClientToRelay::Update(Update {
            run_id: round.run_id.clone(),
            round: round.round,
            base: round.params,
            n_samples: 1,
            inner_steps: 1,
            loss: 1.0,
            codec: welcome.spec.codec,
            payload: PayloadRef::of(&payload),
            state: PayloadRef::of(&[]),
        });
        match client.send(update, payload.clone()).await? {
            RelayToClient::Accepted { .. } => {}
            other => anyhow::bail!("round {}: update answered {other:?}", round.round),
        }
        let ask = ClientToRelay::AwaitRound {
            run_id: round.run_id.clone(),
            after: Some(round.round),
        };
        loop {
            match client.send(ask.clone(), Vec::new()).await? {
                RelayToClient::Round(signed) => {
                    let next = signed.verify_with_key(&relay_key)?;
                    if next.round > round.round {
                        round = next;
                        break;
                    }
                }
                other => anyhow::bail!("await round answered {other:?}"),
            }
        }
        window.push(t.elapsed().as_secs_f64() * 1e3);
        if (round.round - first).is_multiple_of(args.every) {
            samples.push(sample(round.round, &mut window));
        }
    }
    let elapsed = run_started.elapsed().as_secs_f64();
    let report = report(&args, &samples, elapsed);
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report)?;
    }
    drop(relay);
    Ok(())
}

fn report(args: &Soak, samples: &[Sample], elapsed: f64) -> String {
    let mut out = format!(
        "# Soak: {} rounds on one relay\n\n\
         `cargo xtask bench soak` (`swarmtrain-peer soak --rounds {} --every {}`): a release relay \
         process (digits MLP with 4 hidden units, quorum 1, a fresh data directory, history \
         retention {} rounds, ledger retention {} rounds, 10 checkpoints) and one peer over TCP \
         that sends a constant update and long-polls the next round, {:.0} s in all ({:.0} rounds/s). \
         Every round is a whole close: aggregation, evaluation, checkpoint, run record and history \
         row, announcement.\n\n\
         | round | round time, median (ms) | p99 (ms) | relay RSS (MB) | data directory (MB) | `/api/status` (KB) |\n\
         | --: | --: | --: | --: | --: | --: |\n",
        args.rounds,
        args.rounds,
        args.every,
        args.history_retention_rounds,
        args.ledger_retention_rounds,
        elapsed,
        args.rounds as f64 / elapsed.max(1e-9),
    );
    for s in samples {
        let time = |v: f64| {
            if v.is_nan() {
                "—".to_owned()
            } else {
                format!("{v:.2}")
            }
        };
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.1} |\n",
            s.round,
            time(s.median_ms),
            time(s.p99_ms),
            s.rss_kb as f64 / 1024.0,
            s.disk_bytes as f64 / 1048576.0,
            s.status_bytes as f64 / 1024.0,
        ));
    }
    out
}
