//! `cargo xtask eval --run DIR [--data PATH] [--tasks FILE ...]`: evaluates a trained run
//! (validation NLL and bits per byte with full-sequence and causal routing, few-shot
//! multiple choice, router metrics) and prints the results as JSON.

use anyhow::Context;
use mor_core::config::Config;
use mor_models::data::Dataset;
use mor_models::run::{data_config, evaluate, set_threads};
use mor_models::MorModel;
use std::path::PathBuf;

/// Flags of `eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A run folder written by `train` or `ablate` (holds config.toml, model.safetensors,
    /// tokenizer.json).
    #[arg(long)]
    run: PathBuf,
    /// Evaluate on this data instead of the run's own validation split.
    #[arg(long)]
    data: Option<PathBuf>,
    /// lm-eval-style JSONL task files (`{"context", "choices", "gold"}` per line).
    #[arg(long)]
    tasks: Vec<PathBuf>,
}

/// Runs `eval`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    let dir = &args.run;
    let cfg_path = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("{} is not a run folder (no config.toml)", dir.display()))?;
    let cfg = Config::from_toml_str(&text).with_context(|| cfg_path.display().to_string())?;
    set_threads(cfg.threads);
    if let Some(d) = &args.data {
        if !d.exists() {
            anyhow::bail!("--data {}: no such file or folder", d.display());
        }
    }
    for t in &args.tasks {
        if !t.exists() {
            anyhow::bail!("--tasks {}: no such file", t.display());
        }
    }
    let model = MorModel::new(&cfg)?;
    mor_models::checkpoint::load_model(dir, &model.named_vars())?;
    let mut dcfg = data_config(&cfg, args.data.as_deref());
    if args.data.is_some() {
        // Evaluate the whole given corpus.
        dcfg.val_fraction = dcfg.val_fraction.max(0.5);
    }
    let ds = Dataset::prepare(&dcfg, Some(dir)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let name = dir.file_name().and_then(|s| s.to_str()).unwrap_or("run");
    let (ev, _) = evaluate(&model, &ds, &cfg, name, &args.tasks)?;
    println!("{}", serde_json::to_string_pretty(&ev)?);
    Ok(())
}
