//! `cargo xtask`: the commands of mor.
//!
//! Each subcommand lives in its own file with an `Args` type (its flags, whose doc comments
//! are the help text) and a run function. To add a command, add a variant to [`Command`]
//! and a module next to this file (`generate`, `bench` and `gpu-check` are planned this
//! way).

use clap::{Parser, Subcommand};
// Names the example strategy crate so its plugins are linked and registered.
#[cfg(feature = "example-plugins")]
use mor_example_entropy_router as _;

mod ablate;
mod bench;
mod eval;
mod export;
mod generate;
mod gpu_check;
mod import;
mod list;
mod plan;
mod train;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Developer and user commands of mor (Mixture-of-Recursions).
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands, one module each.
#[derive(Debug, Subcommand)]
enum Command {
    /// List every registered plugin (sharing strategies, routers, KV policies, backends).
    List(list::Args),
    /// Resolve a config and show its recursion plan, parameters, FLOPs and step budget.
    Plan(plan::Args),
    /// Train one run and evaluate it.
    Train(train::Args),
    /// Evaluate a trained run.
    Eval(eval::Args),
    /// Train, evaluate and compare every run of an ablation grid; writes results.md and plots.
    Ablate(ablate::Args),
    /// Check every CUDA kernel against the CPU reference and time it; `--full` also trains on
    /// the GPU against the CPU and measures throughput, MFU, host syncs and memory (needs
    /// `--features cuda` and a GPU).
    GpuCheck(gpu_check::Args),
    /// Generate text from a trained run, streaming tokens (optionally with their depths).
    Generate(generate::Args),
    /// Run a benchmark (`infer`: decode throughput and KV memory, spec §5; `train`: training
    /// step time, tokens/s and peak memory per model).
    Bench(bench::Args),
    /// Import a Hugging Face Llama-family folder (`--hf`) or a checkpoint in the official MoR
    /// layout (`--official`) as a mor run folder.
    Import(import::Args),
    /// Export a run as a Hugging Face Llama folder (`--format hf`, vanilla models) or in the
    /// official MoR checkpoint layout (`--format official`).
    Export(export::Args),
}

fn main() -> anyhow::Result<()> {
    // Training speed settings: freed memory stays mapped, element-wise ops on rayon's threads.
    mor_bench::tune_cpu_process();
    // Links every built-in plugin crate, so plugins resolve by name.
    let _ = mor_models::builtin::link();
    match Cli::parse().command {
        Command::List(args) => list::run(&args),
        Command::Plan(args) => plan::run(&args),
        Command::Train(args) => train::run_cmd(&args),
        Command::Eval(args) => eval::run_cmd(&args),
        Command::Ablate(args) => ablate::run_cmd(&args),
        Command::GpuCheck(args) => gpu_check::run_cmd(&args),
        Command::Generate(args) => generate::run_cmd(&args),
        Command::Bench(args) => bench::run_cmd(&args),
        Command::Import(args) => import::run_cmd(&args),
        Command::Export(args) => export::run_cmd(&args),
    }
}
