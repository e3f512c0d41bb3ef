//! `cargo xtask bench infer [--json] [--threads N] [--requests N] [--batch B,…,max]
//! [--precision f32,bf16] [--gen-len N] [--quick]`: the inference throughput benchmark of
//! spec §5 at CPU scale (the harness is `mor_bench::infer`): tokens/s of vanilla and of
//! expert-choice MoR with `N_r = 2, 3, 4` (continuous depth-wise batching, calibrated early
//! exits), their ratios, the measured KV bytes per token against spec §4's
//! `(N_r + 1)/(2 N_r)`, at fixed batches and at the largest batch a KV budget holds, with
//! the engine's weights in f32 and/or bf16.

use mor_bench::infer::{render_text, run, InferBenchConfig};
use mor_core::config::Precision;

/// Flags of `bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which benchmark (`infer`).
    #[arg(value_parser = ["infer"])]
    which: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Rayon / matmul threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
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
    fn zero_rounds_are_an_error() {
        let e = run_cmd(&parse(&["--quick", "--rounds", "0"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rounds 0"), "{e}");
    }
}
