//! `swarmtrain-relay`: the operator's binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod attack_grid;
mod simulate;

use attack_grid::{AttackGrid, attack_grid};
use simulate::{Simulate, simulate};
use swarmtrain_relay::Relay;
use swarmtrain_relay::config::ServeOptions;

#[derive(Parser, Debug)]
#[command(
    name = "swarmtrain-relay",
    version,
    about = "Serves the swarmtrain page, coordinates training rounds and aggregates updates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the page and the runs (by default the language model; more with `[[run]]` tables
    /// in --config) until SIGINT or SIGTERM.
    Serve(ServeOptions),
    /// Create a new identity key file (refuses to overwrite one) and print its peer key.
    Keygen(Keygen),
    /// Print a running relay's status: run, round, held-out loss or accuracy, peers, rejections.
    Status(StatusArgs),
    /// Print a run's leaderboard: the peers with the most credited work, verified, unchecked
    /// and failed.
    Credits(CreditsArgs),
    /// Download a relay's current global parameters as a safetensors checkpoint.
    Export(Export),
    /// Check a federation's shared ledger (--ledger-url): every entry's signature is its
    /// peer's, every verdict's is good, every credit is what its entries and verdicts add up
    /// to. Exits with 1 when a row does not hold up.
    AuditLedger(AuditLedger),
    /// Simulate N peers training the language model in this process (DiLoCo or data-parallel),
    /// with the real shared code, counting every byte; prints the loss curve, writes JSON.
    Simulate(Simulate),
    /// Run the Byzantine attack grid on the digits: every standard attack × every aggregation
    /// rule × attacker fraction, with simulated peers and the shared code; writes a Markdown table.
    AttackGrid(AttackGrid),
}

/// The `--relay` option of the commands that talk to a running relay.
#[derive(clap::Args, Debug)]
struct RelayUrl {
    /// The relay's HTTP URL.
    #[arg(
        long,
        env = "SWARMTRAIN_RELAY",
        default_value = "http://127.0.0.1:8080/"
    )]
    relay: String,
}

#[derive(Parser, Debug)]
struct Keygen {
    /// Where to write the key (hex seed, mode 0600).
    #[arg(
        long,
        env = "SWARMTRAIN_KEY_FILE",
        default_value = "swarmtrain-data/worker.key"
    )]
    key_file: PathBuf,
}

#[derive(Parser, Debug)]
struct AuditLedger {
    /// The shared ledger's PostgreSQL connection string, as the relays were given it.
    #[arg(long, env = "SWARMTRAIN_LEDGER_URL", hide_env_values = true)]
    ledger_url: swarmtrain_relay::public::Secret,
    /// A PEM file of CA certificates for the database's TLS, besides the system's roots.
    #[arg(long, env = "SWARMTRAIN_LEDGER_CA")]
    ledger_ca: Option<PathBuf>,
    /// Only this run (default: every run in the ledger).
    #[arg(long, env = "SWARMTRAIN_RUN")]
    run: Option<String>,
}

async fn audit_ledger(args: AuditLedger) -> anyhow::Result<()> {
    use swarmtrain_relay::ledger;
    let tls = ledger::tls(args.ledger_ca.as_deref())?;
    let runs = ledger::audit(&args.ledger_url.0, tls, args.run.as_deref()).await?;
    let mut problems = 0;
    for (run, audit) in &runs {
        println!(
            "run {run}: {} entries, {} verdicts, {} peers with credit",
            audit.entries, audit.verdicts, audit.peers
        );
        for (relay, n) in &audit.recorded_by {
            println!("  entries written by relay {}: {n}", relay.to_hex());
        }
        for (signer, n) in &audit.verdict_signers {
            println!("  verdicts signed by {}: {n}", signer.to_hex());
        }
        for problem in &audit.problems {
            println!("  PROBLEM {problem}");
        }
        problems += audit.problems.len();
    }
    if problems > 0 {
        println!("{problems} rows do not hold up");
        std::process::exit(1);
    }
    println!("every row holds up");
    Ok(())
}

#[derive(Parser, Debug)]
struct CreditsArgs {
    #[command(flatten)]
    relay: RelayUrl,
    /// The run (default: the relay's default run).
    #[arg(long, env = "SWARMTRAIN_RUN")]
    run: Option<String>,
    /// Peers to list (the relay gives at most 100).
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

async fn credits(args: CreditsArgs) -> anyhow::Result<()> {
    let (run, board) =
        swarmtrain_relay::ops::leaderboard(&args.relay.relay, args.run.as_deref(), args.limit)
            .await?;
    println!(
        "run {run}: {} peers with credit",
        board.get("peers").cloned().unwrap_or_default()
    );
    println!(
        "{:<66} {:>12} {:>8} {:>12} {:>14} {:>14} {:>14}",
        "peer", "samples", "updates", "rounds", "verified", "unchecked", "failed"
    );
    for row in board
        .get("top")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten()
    {
        let field = |k: &str| row.get(k).cloned().unwrap_or_default();
        println!(
            "{:<66} {:>12} {:>8} {:>12} {:>14} {:>14} {:>14}",
            field("peer").as_str().unwrap_or("?"),
            field("samples"),
            field("accepted_updates"),
            format!("{}–{}", field("first_round"), field("last_round")),
            field("verified_units"),
            field("unchecked_units"),
            field("failed_units"),
        );
    }
    if let Some(unit) = board
        .get("top")
        .and_then(|t| t.get(0))
        .and_then(|r| r.get("unit"))
    {
        println!("(verified, unchecked and failed work in {unit}: credit is verified + unchecked)");
    }
    Ok(())
}

#[derive(Parser, Debug)]
struct StatusArgs {
    #[command(flatten)]
    relay: RelayUrl,
    /// Print the whole /api/status JSON instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Parser, Debug)]
struct Export {
    #[command(flatten)]
    relay: RelayUrl,
    /// The safetensors file to write (replaced atomically).
    #[arg(long, default_value = "swarmtrain.safetensors")]
    out: PathBuf,
}

fn keygen(args: Keygen) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.key_file.exists(),
        "{} exists; refusing to overwrite an identity",
        args.key_file.display()
    );
    let seed = swarmtrain_net::keyfile::load_or_create(&args.key_file)?;
    let identity = swarmtrain_shared::Identity::from_seed(*seed);
    println!("wrote {}", args.key_file.display());
    println!("peer key {}", identity.peer());
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let status = swarmtrain_relay::ops::status(&args.relay.relay).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let get = |k: &str| status.get(k).cloned().unwrap_or_default();
    let last = get("history")
        .as_array()
        .and_then(|h| h.last().cloned())
        .unwrap_or_default();
    println!("run        {}", get("run_id").as_str().unwrap_or("?"));
    println!("round      {}", get("round"));
    println!(
        "params     {} values, BLAKE3 {}",
        get("n_params"),
        get("params_hash").as_str().unwrap_or("?")
    );
    match last.get("val_loss").and_then(|l| l.as_f64()) {
        Some(loss) => println!(
            "held-out   {loss:.4} nats/byte ({:.3} bits/byte)",
            loss / std::f64::consts::LN_2
        ),
        None => println!(
            "accuracy   {}",
            last.get("accuracy")
                .and_then(|a| a.as_f64())
                .map_or("—".into(), |a| format!("{:.1}%", a * 100.0))
        ),
    }
    println!(
        "peers      {} active, {} joined",
        get("active_peers"),
        get("joined_peers")
    );
    println!(
        "updates    {} accepted, this round {}",
        get("accepted_updates"),
        get("updates_this_round")
    );
    println!("rejected   {}", get("rejected"));
    if let Some(eps) = get("privacy_epsilon").as_f64() {
        println!("privacy    ε = {eps:.3}");
    }
    Ok(())
}

async fn export(args: Export) -> anyhow::Result<()> {
    let (file, status) = swarmtrain_relay::ops::export(&args.relay.relay).await?;
    let tmp = args.out.with_extension("safetensors.tmp");
    std::fs::write(&tmp, &file)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &args.out)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", args.out.display()))?;
    println!(
        "wrote {} ({} bytes): run {}, round {}",
        args.out.display(),
        file.len(),
        status["run_id"],
        status["round"]
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr; stdout carries what the commands print (the listening banner, JSON).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // webrtc-rs's DTLS warns about every TLS extension a browser offers that it does not know.
                .unwrap_or_else(|_| "swarmtrain_relay=info,warn,dtls=error".into()),
        )
        .init();
    let args = match Cli::parse().command {
        Command::Serve(args) => args,
        Command::Keygen(args) => return keygen(args),
        Command::Status(args) => return status(args).await,
        Command::Credits(args) => return credits(args).await,
        Command::Export(args) => return export(args).await,
        Command::AuditLedger(args) => return audit_ledger(args).await,
        Command::AttackGrid(args) => {
            return tokio::task::spawn_blocking(move || attack_grid(args)).await?;
        }
        Command::Simulate(args) => {
            return tokio::task::spawn_blocking(move || simulate(args)).await?;
        }
    };
    let (options, runs) = args.with_file()?;
    let config = options.relay_config(&runs)?;
    if !config.web_dir.join("index.html").is_file() {
        anyhow::bail!(
            "{} has no index.html (run from the repository root, or pass --web-dir)",
            config.web_dir.display()
        );
    }
    if !config.web_dir.join("pkg/swarmtrain.js").is_file() {
        tracing::warn!(
            "{} has no pkg/swarmtrain.js: build it with `cargo xtask build-wasm`",
            config.web_dir.display()
        );
    }
    let relay = Relay::start(config).await?;
    println!("swarmtrain relay listening on {}", relay.url());
    println!("open it in a browser and press Contribute");
    swarmtrain_net::signal::shutdown().await;
    tracing::info!("shutting down");
    relay.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarmtrain_relay::config::{RunOptions, run_spec};
    use swarmtrain_shared::protocol::Codec;
    use swarmtrain_shared::robust::Rule;

    /// `serve`'s options from `args` (after `relay serve`), merged with the file they name.
    fn serve_with(args: &[&str]) -> anyhow::Result<(ServeOptions, Vec<RunOptions>)> {
        let argv = ["relay", "serve"].iter().chain(args);
        let Command::Serve(options) = Cli::try_parse_from(argv)?.command else {
            panic!("serve")
        };
        options.with_file()
    }

    /// One run's options, parsed as a `[[run]]` table's would be.
    fn run(args: &[&str]) -> RunOptions {
        #[derive(Parser)]
        struct Run {
            #[command(flatten)]
            run: RunOptions,
        }
        Run::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .expect("parses")
            .run
    }

    #[test]
    fn config_file_fills_in_what_the_command_line_does_not_say() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            "inner_steps = 7\nquorum = 2\naggregator = \"median\"\n",
        )
        .expect("write");
        let path = path.to_str().expect("utf-8 path");
        let (serve, runs) = serve_with(&["--config", path, "--quorum", "5"]).expect("config");
        assert!(runs.is_empty());
        assert_eq!(
            (serve.run.inner_steps, serve.run.quorum),
            (Some(7), Some(5)),
            "the command line wins over the file"
        );
        assert!(matches!(
            serve.run.aggregator,
            Some(swarmtrain_relay::config::AggregatorChoice::Median)
        ));

        std::fs::write(dir.path().join("bad.toml"), "inner_stepz = 7\n").expect("write");
        let bad = dir.path().join("bad.toml");
        let err = serve_with(&["--config", bad.to_str().expect("utf-8")])
            .map(|_| ())
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown key \"inner_stepz\""),
            "{err}"
        );
        std::fs::write(dir.path().join("broken.toml"), "inner_steps = \n").expect("write");
        let broken = dir.path().join("broken.toml");
        assert!(serve_with(&["--config", broken.to_str().expect("utf-8")]).is_err());
        assert!(serve_with(&["--config", "/nonexistent.toml"]).is_err());
    }

    #[test]
    fn run_tables_add_runs_with_their_own_options() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        let text = "quorum = 2\n\n[[run]]\nrun_id = \"robust\"\nmodel = \"digits\"\naggregator = \"median\"\ncodec = \"int8\"\nhidden = 32\n\n[[run]]\nrun_id = \"small\"\ninner_steps = 5\n";
        std::fs::write(&path, text).expect("write");
        let (serve, runs) =
            serve_with(&["--config", path.to_str().expect("utf-8")]).expect("config");
        let specs: Vec<_> = std::iter::once(&serve.run)
            .chain(&runs)
            .map(|r| run_spec(r).expect("valid"))
            .collect();
        let ids: Vec<&str> = specs.iter().map(|s| s.run_id.as_str()).collect();
        assert_eq!(ids, ["lm", "robust", "small"]);
        assert_eq!(specs[0].quorum, 2);
        assert_eq!(specs[1].aggregator, Rule::Median);
        assert_eq!(specs[1].codec, Codec::Int8Block { block: 64 });
        assert_eq!(
            specs[1].model,
            swarmtrain_shared::protocol::ModelSpec::DigitsMlp { hidden: 32 }
        );
        assert_eq!(specs[2].inner.steps, 5);

        std::fs::write(&path, "[[run]]\nrun_id = \"x\"\nhttp = \"0.0.0.0:1\"\n").expect("write");
        let err = serve_with(&["--config", path.to_str().expect("utf-8")])
            .map(|_| ())
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown key \"http\""),
            "a relay option in a run table: {err}"
        );
        assert!(
            run_spec(&run(&["--run-id=a/b"])).is_err(),
            "a run id with a slash"
        );
        assert!(
            run_spec(&run(&["--hidden=8"])).is_err(),
            "a digits option on the language model"
        );
    }

    #[test]
    fn a_rule_the_quorum_cannot_feed_is_refused_with_the_reason() {
        let krum = run(&[
            "--model=digits",
            "--aggregator=krum",
            "--byzantine=1",
            "--quorum=3",
        ]);
        let err = run_spec(&krum).unwrap_err().to_string();
        assert!(
            err.contains("needs at least 5 updates") && err.contains("quorum is 3"),
            "{err}"
        );
        let fed = run(&[
            "--model=digits",
            "--aggregator=krum",
            "--byzantine=1",
            "--krum-select=3",
            "--quorum=5",
        ]);
        assert_eq!(
            run_spec(&fed).expect("works").aggregator,
            Rule::MultiKrum {
                byzantine: 1,
                select: 3
            }
        );
        let trimmed = run(&["--aggregator=trimmed-mean", "--trim=2", "--quorum=4"]);
        assert!(run_spec(&trimmed).is_err(), "trim 2 needs 5 updates");
        // Bucketing wraps the rule; the quorum must give the rule enough buckets.
        let bucketed = run(&["--aggregator=median", "--bucket=2", "--quorum=4"]);
        assert_eq!(
            run_spec(&bucketed).expect("works").aggregator,
            Rule::with_buckets(Rule::Median, 2)
        );
        let unbucketed = run(&["--aggregator=median", "--bucket=1"]);
        assert_eq!(
            run_spec(&unbucketed).expect("works").aggregator,
            Rule::Median
        );
        let starved = run(&[
            "--model=digits",
            "--aggregator=krum",
            "--byzantine=1",
            "--bucket=2",
            "--quorum=5",
        ]);
        let err = run_spec(&starved).unwrap_err().to_string();
        assert!(err.contains("needs at least 9 updates"), "{err}");
    }

    /// deploy/swarmtrain-relay.service is a valid unit (`systemd-analyze verify`, where systemd
    /// is installed) and its ExecStart is a command line this relay accepts.
    #[test]
    fn the_systemd_unit_verifies() {
        let unit_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/swarmtrain-relay.service");
        let unit = std::fs::read_to_string(&unit_path).expect("the unit file");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("an ExecStart line");
        let argv: Vec<&str> = exec.split_whitespace().collect();
        assert_eq!(argv[0], "/usr/local/bin/swarmtrain-relay");
        let Command::Serve(options) = Cli::try_parse_from(
            std::iter::once("swarmtrain-relay").chain(argv[1..].iter().copied()),
        )
        .expect("ExecStart parses")
        .command
        else {
            panic!("ExecStart runs serve")
        };
        assert_eq!(
            options.data_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/swarmtrain"))
        );
        for line in ["StateDirectoryMode=0700", "UMask=0077", "DynamicUser=yes"] {
            assert!(unit.lines().any(|l| l == line), "{line}");
        }
        let Ok(analyze) = which("systemd-analyze") else {
            eprintln!("systemd-analyze is not installed: only the command line was checked");
            return;
        };
        // The unit with this test's own executable in place of the installed binary (verify
        // checks that it exists), in a directory of its own.
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = std::env::current_exe().expect("this test's path");
        let copy = dir.path().join("swarmtrain-relay.service");
        std::fs::write(
            &copy,
            unit.replace("/usr/local/bin/swarmtrain-relay", &exe.to_string_lossy()),
        )
        .expect("write the unit");
        let out = std::process::Command::new(analyze)
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Lines about the machine's own units (none running in a container) are not ours.
        let ours: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("swarmtrain-relay.service"))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify:\n{stderr}"
        );
    }

    fn which(program: &str) -> Result<std::path::PathBuf, ()> {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
            .ok_or(())
    }
}
