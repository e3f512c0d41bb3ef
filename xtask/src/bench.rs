//! `cargo xtask bench infer [--json] [--threads N] [--requests N] [--batch B,…,max]
//! [--precision f32,bf16] [--gen-len N] [--backend cpu|cuda] [--quick]`: the inference
//! throughput benchmark of spec §5 (the harness is `mor_bench::infer`): tokens/s of vanilla
//! and of expert-choice MoR with `N_r = 2, 3, 4` (continuous depth-wise batching, calibrated
//! early exits), their ratios, the measured KV bytes per token against spec §4's
//! `(N_r + 1)/(2 N_r)`, at fixed batches and at the largest batch a KV budget holds, with
//! the engine's weights in f32 and/or bf16. `--backend cpu` (default) decodes on the
//! engine's host path; `--backend cuda` builds the models on CUDA device 0 and decodes on
//! the engine's device path (weights and paged KV pool on the GPU; needs the `cuda`
//! feature: `cargo run --release -p xtask --features cuda -- bench infer --backend cuda`).
//!
//! `cargo xtask bench train [--json] [--steps N] [--threads N] [--precision f32,bf16]`: the
//! training cost of every model of the quick preset (`configs/grids/quick.toml`) at its
//! own batch (equal tokens per step for all): median step time, tokens/s and peak resident
//! memory, each model in a process of its own; and MoR-2 (expert-choice, Middle-Cycle)
//! against the vanilla model of the same depth (the paper reports 0.81x time and 0.75x
//! peak memory). A precision the backend refuses is reported as not available.

use anyhow::Context;
use mor_bench::infer::{render_text, run, InferBenchConfig};
use mor_bench::train::{time_training, TrainModelReport};
use mor_core::config::{Config, Precision};

/// Flags of `bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which benchmark (`infer`: decode throughput; `train`: training cost).
    #[arg(value_parser = ["infer", "train"])]
    which: String,
    /// `train`: timed steps per model (after one untimed step; default 5).
    #[arg(long)]
    steps: Option<usize>,
    /// `train`: run only this grid run, in this process, and print its report as JSON
    /// (what `bench train` starts once per model).
    #[arg(long, hide = true)]
    child_run: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Rayon / matmul threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// `infer`: where the models decode: `cpu` (the engine's host path) or `cuda` (CUDA
    /// device 0, the engine's device path; needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Timed requests per run.
    #[arg(long)]
    requests: Option<usize>,
    /// Batch sizes, comma-separated: fixed batches and `max`, the relative-max batch
    /// (scaled from the largest fixed batch by the KV budget), e.g. `1,4,32,max`. Without
    /// `max` only the fixed batches run; without the flag, 32 and `max`.
    #[arg(long, value_delimiter = ',')]
    batch: Vec<String>,
    /// Precisions of the engine's packed weights, comma-separated: `f32`, `bf16` (bf16
    /// inputs, f32 accumulation). Each is timed, interleaved with the others (default f32).
    #[arg(long, value_delimiter = ',')]
    precision: Vec<String>,
    /// How every engine's KV cache stores K and V: `f32` (default) or `bf16` (rounded on
    /// write, half the bytes decode attention streams).
    #[arg(long)]
    kv_precision: Option<String>,
    /// Mean generation length.
    #[arg(long)]
    gen_len: Option<f64>,
    /// Layers of the base model before the Middle-Cycle depth fix (default 32, the paper's
    /// 360M depth: 32 layers for MoR-2 and MoR-3, 34 for MoR-4).
    #[arg(long)]
    base_layers: Option<usize>,
    /// Context length of the models (default 256).
    #[arg(long)]
    context: Option<usize>,
    /// Interleaved timed rounds per model (the best is kept; default 2).
    #[arg(long)]
    rounds: Option<usize>,
    /// Requests decoded to calibrate the exit thresholds (default 64).
    #[arg(long)]
    calib_requests: Option<usize>,
    /// Calibration passes (default 3).
    #[arg(long)]
    calib_passes: Option<usize>,
    /// A short run (smoke test).
    #[arg(long)]
    quick: bool,
    /// Skip the relative-max batch setting.
    #[arg(long)]
    fixed_only: bool,
    /// Share of the batch that gathers after exiting before the coda/head run (default 0.125).
    #[arg(long)]
    exit_fraction: Option<f64>,
    /// Recursion counts of the MoR models (default 2, 3 and 4).
    #[arg(long, value_delimiter = ',')]
    recursions: Vec<usize>,
}

/// Runs `bench`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    if args.which == "train" {
        return train_cmd(args);
    }
    let cfg = config(args)?;
    mor_models::run::set_threads(cfg.threads);
    let report = run(&cfg, &mut |line| eprintln!("bench: {line}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_text(&report));
    }
    Ok(())
}

/// The benchmark's settings from the flags, every one checked.
fn config(args: &Args) -> anyhow::Result<InferBenchConfig> {
    let mut cfg = if args.quick {
        InferBenchConfig::quick()
    } else {
        InferBenchConfig::default()
    };
    cfg.threads = args.threads.max(1);
    cfg.backend = match args.backend.trim() {
        "cpu" => "cpu".to_string(),
        "cuda" if !mor_kernels::cuda::COMPILED => anyhow::bail!(
            "--backend cuda needs a build with the `cuda` feature: \
             cargo run --release -p xtask --features cuda -- bench infer --backend cuda"
        ),
        "cuda" => "cuda".to_string(),
        b => anyhow::bail!("--backend {b:?} is not a backend: use cpu or cuda"),
    };
    if let Some(n) = args.requests {
        cfg.requests = n;
    }
    cfg.relative_max = !args.fixed_only;
    if !args.batch.is_empty() {
        let mut fixed = Vec::new();
        let mut max = false;
        for b in &args.batch {
            match b.trim() {
                "max" => max = true,
                v => match v.parse::<usize>() {
                    Ok(n) if n >= 1 => fixed.push(n),
                    _ => anyhow::bail!(
                        "--batch {b:?} is not a batch size: give numbers >= 1 or `max`, \
                         e.g. --batch 1,4,32,max"
                    ),
                },
            }
        }
        if max && args.fixed_only {
            anyhow::bail!("--batch max asks for the relative-max batch, which --fixed-only skips");
        }
        if let Some(&largest) = fixed.iter().max() {
            cfg.batch_size = largest;
        }
        cfg.extra_batches = fixed.into_iter().filter(|&b| b != cfg.batch_size).collect();
        cfg.relative_max = max;
    }
    if !args.precision.is_empty() {
        cfg.precisions = Vec::new();
        for p in &args.precision {
            let p = match p.trim() {
                "f32" => Precision::F32,
                "bf16" => Precision::Bf16,
                _ => anyhow::bail!("--precision {p:?} is not a precision: use f32 or bf16"),
            };
            if !cfg.precisions.contains(&p) {
                cfg.precisions.push(p);
            }
        }
    }
    if let Some(k) = &args.kv_precision {
        cfg.kv_precision = match k.trim() {
            "f32" => mor_models::engine::KvPrecision::F32,
            "bf16" => mor_models::engine::KvPrecision::Bf16,
            _ => anyhow::bail!("--kv-precision {k:?} is not a precision: use f32 or bf16"),
        };
    }
    if let Some(g) = args.gen_len {
        cfg.gen_len_std = cfg.gen_len_std * g / cfg.gen_len_mean;
        cfg.gen_len_mean = g;
    }
    if let Some(l) = args.base_layers {
        cfg.base_layers = l;
    }
    if let Some(c) = args.context {
        cfg.context = c;
    }
    if let Some(r) = args.rounds {
        cfg.rounds = r;
    }
    if let Some(n) = args.calib_requests {
        cfg.calib_requests = n;
    }
    if let Some(n) = args.calib_passes {
        cfg.calib_passes = n;
    }
    if let Some(e) = args.exit_fraction {
        cfg.exit_fraction = e;
    }
    if !args.recursions.is_empty() {
        cfg.recursions = args.recursions.clone();
    }
    // Every flag is checked before the thread pool is set or a model is built.
    cfg.check()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(flags: &[&str]) -> Args {
        let mut argv = vec!["bench", "infer"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).expect("flags parse").args
    }

    #[test]
    fn batch_and_precision_lists_are_parsed_and_checked() {
        let err = |flags: &[&str]| run_cmd(&parse(flags)).unwrap_err().to_string();
        let e = err(&["--quick", "--batch", "4,x"]);
        assert!(e.contains("\"x\"") && e.contains("max"), "{e}");
        let e = err(&["--quick", "--batch", "0"]);
        assert!(e.contains("\"0\""), "{e}");
        let e = err(&["--quick", "--batch", "max", "--fixed-only"]);
        assert!(e.contains("--fixed-only"), "{e}");
        let e = err(&["--quick", "--precision", "f16"]);
        assert!(e.contains("\"f16\"") && e.contains("f32 or bf16"), "{e}");
        let c = config(&parse(&[
            "--batch",
            "1,4,32,max",
            "--precision",
            "f32,bf16",
        ]))
        .unwrap();
        assert_eq!((c.batch_size, c.extra_batches.clone()), (32, vec![1, 4]));
        assert!(c.relative_max);
        assert_eq!(c.fixed_batches(), [32, 1, 4]);
        assert_eq!(c.precisions, [Precision::F32, Precision::Bf16]);
        let c = config(&parse(&["--batch", "8", "--precision", "bf16"])).unwrap();
        assert_eq!((c.batch_size, c.relative_max), (8, false));
        assert_eq!(c.precisions, [Precision::Bf16]);
        let c = config(&parse(&[])).unwrap();
        assert_eq!((c.batch_size, c.relative_max), (32, true));
        assert_eq!(c.precisions, [Precision::F32]);
    }

    #[test]
    fn train_flags_are_checked_and_runs_resolve_in_both_precisions() {
        let mut argv = vec!["bench", "train"];
        argv.extend_from_slice(&["--steps", "0"]);
        let a = Cli::try_parse_from(argv).unwrap().args;
        assert!(run_cmd(&a).unwrap_err().to_string().contains("--steps 0"));
        let a = Cli::try_parse_from([
            "bench",
            "train",
            "--child-run",
            "nope",
            "--precision",
            "f32",
        ])
        .unwrap()
        .args;
        let e = run_cmd(&a).unwrap_err().to_string();
        assert!(e.contains("\"nope\"") && e.contains("quick"), "{e}");
        for p in [Precision::F32, Precision::Bf16] {
            let runs = quick_runs(p).unwrap();
            assert!(runs.iter().any(|(n, _)| n == "vanilla"));
            assert!(runs.iter().any(|(n, _)| n == "mor_expert_mcyc_nr2"));
            assert!(runs.iter().all(|(_, c)| c.train.precision == p));
        }
    }

    #[test]
    fn the_backend_flag_is_checked() {
        let c = config(&parse(&["--quick"])).unwrap();
        assert_eq!(c.backend, "cpu");
        let e = config(&parse(&["--quick", "--backend", "tpu"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"tpu\"") && e.contains("cpu or cuda"), "{e}");
        let cuda = config(&parse(&["--quick", "--backend", "cuda"]));
        if mor_kernels::cuda::COMPILED {
            assert_eq!(cuda.unwrap().backend, "cuda");
        } else {
            let e = cuda.unwrap_err().to_string();
            assert!(
                e.contains("`cuda` feature") && e.contains("--features cuda"),
                "{e}"
            );
        }
    }

    #[test]
    fn zero_rounds_are_an_error() {
        let e = run_cmd(&parse(&["--quick", "--rounds", "0"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rounds 0"), "{e}");
    }
}

/// The quick preset's grid.
const QUICK: &str = include_str!("../../configs/grids/quick.toml");

/// The quick preset's runs, resolved in `precision`.
fn quick_runs(
    precision: Precision,
) -> anyhow::Result<Vec<(String, mor_core::config::ResolvedConfig)>> {
    let _ = mor_models::builtin::link();
    let name = match precision {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16",
    };
    crate::ablate::expand(QUICK, "quick")?
        .into_iter()
        .map(|mut r| {
            let train = r
                .table
                .entry("train")
                .or_insert_with(|| toml::Value::Table(Default::default()));
            if let toml::Value::Table(t) = train {
                t.insert("precision".into(), toml::Value::String(name.into()));
            }
            let cfg =
                Config::from_table(r.table).with_context(|| format!("quick run {}", r.name))?;
            Ok((r.name, cfg))
        })
        .collect()
}

/// A model that could not be timed in a precision, and why.
#[derive(Debug, serde::Serialize)]
struct Unavailable {
    name: String,
    precision: Precision,
    reason: String,
}

/// MoR-2 against the vanilla model of the same depth, at equal tokens per step.
#[derive(Debug, serde::Serialize)]
struct Mor2VsVanilla {
    precision: Precision,
    mor: String,
    vanilla: String,
    step_time_ratio: f64,
    peak_rss_ratio: Option<f64>,
    peak_rss_above_start_ratio: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
struct TrainBenchReport {
    threads: usize,
    steps: usize,
    models: Vec<TrainModelReport>,
    not_available: Vec<Unavailable>,
    mor2_vs_vanilla: Vec<Mor2VsVanilla>,
}

/// `bench train`: each model in a child process (`--child-run`), or, in the child, one.
fn train_cmd(args: &Args) -> anyhow::Result<()> {
    let steps = args.steps.unwrap_or(5);
    if steps == 0 {
        anyhow::bail!("--steps 0: at least 1 timed step is needed");
    }
    let mut precisions = Vec::new();
    for p in &args.precision {
        precisions.push(match p.trim() {
            "f32" => Precision::F32,
            "bf16" => Precision::Bf16,
            _ => anyhow::bail!("--precision {p:?} is not a precision: use f32 or bf16"),
        });
    }
    if precisions.is_empty() {
        precisions = vec![Precision::F32, Precision::Bf16];
    }
    let threads = args.threads.max(1);
    if let Some(name) = &args.child_run {
        let p = precisions[0];
        let (_, cfg) = quick_runs(p)?
            .into_iter()
            .find(|(n, _)| n == name)
            .with_context(|| format!("--child-run {name:?} is not a run of the quick preset"))?;
        mor_models::run::set_threads(threads);
        let r = time_training(&cfg, name, steps)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("the path of this program")?;
    let mut models = Vec::new();
    let mut not_available = Vec::new();
    for &p in &precisions {
        let pname = if p == Precision::F32 { "f32" } else { "bf16" };
        for (name, _) in quick_runs(p)? {
            eprintln!("bench: training {name} ({pname}), {steps} timed steps");
            let out = std::process::Command::new(&exe)
                .args(["bench", "train", "--child-run", &name, "--precision", pname])
                .args([
                    "--steps",
                    &steps.to_string(),
                    "--threads",
                    &threads.to_string(),
                ])
                .output()
                .context("starting a benchmark process")?;
            if out.status.success() {
                let line = String::from_utf8_lossy(&out.stdout);
                let r: TrainModelReport = serde_json::from_str(line.trim())
                    .with_context(|| format!("the report of {name}: {line}"))?;
                models.push(r);
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                let reason = err
                    .lines()
                    .rfind(|l| !l.trim().is_empty())
                    .unwrap_or("failed without a message")
                    .to_string();
                if p == Precision::F32 {
                    anyhow::bail!("training {name} in f32 failed: {reason}");
                }
                eprintln!("bench: {name} ({pname}) not available: {reason}");
                not_available.push(Unavailable {
                    name,
                    precision: p,
                    reason,
                });
            }
        }
    }
    let mut mor2_vs_vanilla = Vec::new();
    for &p in &precisions {
        let find = |n: &str| models.iter().find(|m| m.name == n && m.precision == p);
        if let (Some(m), Some(v)) = (find("mor_expert_mcyc_nr2"), find("vanilla")) {
            let ratio =
                |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| a as f64 / b.max(1) as f64);
            mor2_vs_vanilla.push(Mor2VsVanilla {
                precision: p,
                mor: m.name.clone(),
                vanilla: v.name.clone(),
                step_time_ratio: m.step_seconds / v.step_seconds.max(1e-12),
                peak_rss_ratio: ratio(m.peak_rss_bytes, v.peak_rss_bytes),
                peak_rss_above_start_ratio: ratio(
                    m.peak_rss_above_start_bytes,
                    v.peak_rss_above_start_bytes,
                ),
            });
        }
    }
    let report = TrainBenchReport {
        threads,
        steps,
        models,
        not_available,
        mor2_vs_vanilla,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_train(&report));
    }
    Ok(())
}

fn render_train(r: &TrainBenchReport) -> String {
    let mib = |b: Option<u64>| {
        b.map(|b| format!("{:.1}", b as f64 / (1 << 20) as f64))
            .unwrap_or_else(|| "-".into())
    };
    let mut s = format!(
        "training cost, quick preset ({} threads, median of {} steps after one untimed)\n\n{:<26} {:<5} {:>9} {:>7} {:>9} {:>10} {:>10} {:>12}\n",
        r.threads, r.steps, "model", "prec", "params", "tokens", "step s", "tokens/s", "peak MiB", "above start"
    );
    for m in &r.models {
        s.push_str(&format!(
            "{:<26} {:<5} {:>9} {:>7} {:>9.4} {:>10.0} {:>10} {:>12}\n",
            m.name,
            if m.precision == Precision::F32 {
                "f32"
            } else {
                "bf16"
            },
            m.params,
            m.tokens_per_step,
            m.step_seconds,
            m.tokens_per_s,
            mib(m.peak_rss_bytes),
            mib(m.peak_rss_above_start_bytes)
        ));
    }
    for u in &r.not_available {
        s.push_str(&format!(
            "{} ({}): not available: {}\n",
            u.name,
            mor_bench::infer::precision_name(u.precision),
            u.reason
        ));
    }
    for c in &r.mor2_vs_vanilla {
        s.push_str(&format!(
            "\n{} against {} ({}, equal tokens per step): step time x{:.3} (paper: 0.81), peak memory x{} (above start x{}; paper: 0.75)\n",
            c.mor,
            c.vanilla,
            mor_bench::infer::precision_name(c.precision),
            c.step_time_ratio,
            c.peak_rss_ratio.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into()),
            c.peak_rss_above_start_ratio.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into()),
        ));
    }
    s
}
