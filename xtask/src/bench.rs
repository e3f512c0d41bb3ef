//! `cargo xtask bench infer [--json] [--threads N] [--requests N] [--batch N] [--gen-len N]
//! [--quick]`: the inference throughput benchmark of spec §5 at CPU scale (the harness is
//! `mor_bench::infer`): tokens/s of vanilla and of expert-choice MoR with `N_r = 2, 3, 4`
//! (continuous depth-wise batching, calibrated early exits), their ratios, the measured KV
//! bytes per token against spec §4's `(N_r + 1)/(2 N_r)`, at a fixed batch and at the
//! largest batch a KV budget holds.

use mor_bench::infer::{render_text, run, InferBenchConfig};

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
    /// Fixed batch size.
    #[arg(long)]
    batch: Option<usize>,
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
    let mut cfg = if args.quick {
        InferBenchConfig::quick()
    } else {
        InferBenchConfig::default()
    };
    cfg.threads = args.threads.max(1);
    if let Some(n) = args.requests {
        cfg.requests = n;
    }
    if let Some(b) = args.batch {
        cfg.batch_size = b;
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
    cfg.relative_max = !args.fixed_only;
    if let Some(e) = args.exit_fraction {
        cfg.exit_fraction = e;
    }
    if !args.recursions.is_empty() {
        cfg.recursions = args.recursions.clone();
    }
    // Every flag is checked before the thread pool is set or a model is built.
    cfg.check()?;
    mor_models::run::set_threads(cfg.threads);
    let report = run(&cfg, &mut |line| eprintln!("bench: {line}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_text(&report));
    }
    Ok(())
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
    fn zero_rounds_are_an_error() {
        let e = run_cmd(&parse(&["--quick", "--rounds", "0"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rounds 0"), "{e}");
    }
}
