//! `cargo xtask bench diloco`: DiLoCo against data-parallel on the byte-level language model,
//! every run through `swarmtrain-relay simulate` (the shared simulator); writes the report and
//! its loss plots (SVG).

use std::fs;
use std::process::Command;

use crate::Result;
use crate::utils::*;

/// One simulated run of `cargo xtask bench diloco`.
pub(crate) struct SimRun {
    name: &'static str,
    label: String,
    args: Vec<String>,
}

/// (tokens, bytes sent, validation loss) at one point of a run.
pub(crate) type CurvePoint = (f64, f64, f64);

/// A labelled loss curve.
pub(crate) type Curve<'a> = (&'a str, &'a [CurvePoint]);

/// What a `simulate --out` report says.
#[derive(Debug)]
pub(crate) struct SimResult {
    curve: Vec<CurvePoint>,
    bytes: f64,
    tokens: f64,
    final_loss: f64,
    syncs: f64,
    params_blake3: String,
    wall: f64,
}

/// A `simulate --out` report (`SimReport` of the shared simulator, plus the run's wall time and
/// the final parameters' hash).
pub(crate) fn parse_sim(json: &str) -> Result<SimResult> {
    let report = parse(json, "a simulate report")?;
    let curve = report["points"]
        .as_array()
        .ok_or("no points")?
        .iter()
        .map(|p| {
            Ok((
                number(p, "tokens")?,
                number(p, "bytes")?,
                number(p, "val_loss")?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SimResult {
        curve,
        bytes: number(&report, "bytes")?,
        tokens: number(&report, "tokens")?,
        final_loss: number(&report, "final_val_loss")?,
        syncs: number(&report, "syncs")?,
        params_blake3: string(&report, "params_blake3"),
        wall: number(&report, "wall_seconds")?,
    })
}

/// DiLoCo against the data-parallel baseline on the byte-level LM, every run through the relay's
/// `simulate` subcommand (the shared simulator), two at a time on this machine's cores.
pub(crate) fn bench_diloco(report_only: bool) -> Result {
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
        )?,
    )
    .map_err(|e| e.to_string())?;
    fs::write(
        dir.join("diloco-loss-vs-bytes.svg"),
        svg_plot(
            "validation loss vs bytes sent",
            "bytes sent",
            &curves,
            |p| p.1,
            true,
        )?,
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

pub(crate) fn human_bytes(b: f64) -> String {
    match b {
        b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b => format!("{:.0} kB", b / 1e3),
    }
}

/// The curves' held-out loss against `x_of` (bytes on a log scale when `log_x`) as an SVG
/// chart, drawn with plotters (SVG backend only: five small crates, about 2 s to build).
pub(crate) fn svg_plot(
    title: &str,
    x_label: &str,
    curves: &[Curve],
    x_of: impl Fn(&CurvePoint) -> f64,
    log_x: bool,
) -> Result<String> {
    use plotters::prelude::*;
    let error = |e: &dyn std::fmt::Display| format!("plotting {title}: {e}");
    let points: Vec<(f64, f64)> = curves
        .iter()
        .flat_map(|(_, c)| c.iter())
        .map(|p| (x_of(p), p.2))
        .filter(|(x, _)| !log_x || *x > 0.0)
        .collect();
    let (x0, x1, y0, y1) = points.iter().fold(
        (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
        |(x0, x1, y0, y1), (x, y)| (x0.min(*x), x1.max(*x), y0.min(*y), y1.max(*y)),
    );
    if points.is_empty() {
        return Err(format!("plotting {title}: no points"));
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (990, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| error(&e))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50);
        let series = |i: usize| Palette99::pick(i).stroke_width(2);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .x_label_formatter(&|x| {
                        if log_x {
                            human_bytes(*x)
                        } else {
                            format!("{x:.1}")
                        }
                    })
                    .y_desc("held-out loss (nats)")
                    .draw()
                    .map_err(|e| error(&e))?;
                for (i, (label, curve)) in curves.iter().enumerate() {
                    chart
                        .draw_series(LineSeries::new(
                            curve
                                .iter()
                                .map(|p| (x_of(p), p.2))
                                .filter(|(x, _)| !log_x || *x > 0.0),
                            series(i),
                        ))
                        .map_err(|e| error(&e))?
                        .label(*label)
                        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], series(i)));
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE)
                    .border_style(BLACK)
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(|e| error(&e))?;
            }};
        }
        let y = y0..y1.max(y0 + 1e-6);
        if log_x {
            draw!(
                builder
                    .build_cartesian_2d((x0..x1.max(x0 * 1.01)).log_scale(), y)
                    .map_err(|e| error(&e))?
            );
        } else {
            draw!(
                builder
                    .build_cartesian_2d(x0..x1.max(x0 + 1e-6), y)
                    .map_err(|e| error(&e))?
            );
        }
        root.present().map_err(|e| error(&e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_loss_plot_is_an_svg_with_every_curve_labelled() {
        let a = [(1e5, 1e3, 5.0), (2e5, 2e6, 4.0), (3e5, 3e9, 3.5)];
        let b = [(1e5, 1e3, 5.2), (2e5, 2e6, 4.5), (3e5, 3e9, 4.0)];
        let curves = [("data-parallel", &a[..]), ("DiLoCo H=100", &b[..])];
        for log_x in [false, true] {
            let svg = super::svg_plot(
                "loss",
                "x",
                &curves,
                |p| if log_x { p.1 } else { p.0 },
                log_x,
            )
            .expect("drawn");
            assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
            // To look at: target/xtask-plot-{linear,log}.svg.
            let name = if log_x { "log" } else { "linear" };
            std::fs::write(
                crate::utils::target_dir().join(format!("xtask-plot-{name}.svg")),
                &svg,
            )
            .expect("write");
            for label in ["data-parallel", "DiLoCo H=100", "held-out loss"] {
                assert!(svg.contains(label), "{label}");
            }
        }
    }
}
