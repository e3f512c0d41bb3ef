//! `cargo xtask gpu-check [--out FILE]`: on a machine with an NVIDIA GPU, checks every CUDA
//! kernel against the CPU reference (f32 and bf16 tolerances) and times each fused kernel
//! against the same computation in plain candle CUDA ops; writes the results as JSON.
//! Needs a build with `--features cuda` (`cargo run --release -p xtask --features cuda --
//! gpu-check`); see `docs/cuda.md`.

use std::path::PathBuf;

/// Flags of `gpu-check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the JSON report.
    #[arg(long, default_value = "runs/gpu-check.json")]
    out: PathBuf,
}

/// Runs `gpu-check`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let report = mor_kernels::cuda::gpu_check(&args.out)?;
    println!("{}", report.to_json());
    if !report.passed() {
        anyhow::bail!(
            "some kernels disagree with the CPU reference; see {}",
            args.out.display()
        );
    }
    println!(
        "all kernels match the CPU reference; report: {}",
        args.out.display()
    );
    Ok(())
}
