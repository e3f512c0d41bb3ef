//! `cargo xtask eval --run DIR [--data PATH] [--tasks FILE ...]`: evaluates a trained run
//! (validation NLL and bits per byte with full-sequence and causal routing, few-shot
//! multiple choice, router metrics) and prints the results as JSON.

use anyhow::Context;
use mor_core::config::Config;
use mor_models::provenance::{with_source, DataRecord, DATA_FILE};
use mor_models::run::{data_config, evaluate, prepare_existing, set_threads};
use mor_models::MorModel;
use std::path::PathBuf;

/// Flags of `eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A run folder written by `train` or `ablate` (holds config.toml, model.safetensors,
    /// tokenizer.json).
    #[arg(long)]
    run: PathBuf,
    /// Evaluate on this data instead of the run's own validation split. Without it, the
    /// data the run was trained on (recorded in its `data.json`) is used, and refused when it
    /// is missing or its contents changed.
    #[arg(long)]
    data: Option<PathBuf>,
    /// lm-eval-style JSONL task files (`{"context", "choices", "gold"}` per line).
    #[arg(long)]
    tasks: Vec<PathBuf>,
    /// Test-time depth (spec Fig. 5c): score with at most this many recursion steps per
    /// token (1..=N_r; a token-choice token assigned deeper finishes at this step).
    #[arg(long)]
    max_depth: Option<usize>,
}

/// Runs `eval`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    let dir = &args.run;
    let cfg_path = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("{} is not a run folder (no config.toml)", dir.display()))?;
    mor_models::checkpoint::verify_files(dir, &["config.toml", "tokenizer.json"], false)
        .with_context(|| format!("cannot trust the files of {}", dir.display()))?;
    let cfg = Config::from_toml_str(&text).with_context(|| cfg_path.display().to_string())?;
    set_threads(cfg.threads);
    if let Some(d) = &args.data {
        // `builtin` names the generated corpus, as `data.source = "builtin"` does.
        if d.as_os_str() != "builtin" && !d.exists() {
            anyhow::bail!("--data {}: no such file or folder", d.display());
        }
    }
    for t in &args.tasks {
        if !t.exists() {
            anyhow::bail!("--tasks {}: no such file", t.display());
        }
    }
    let model = MorModel::new(&cfg)?;
    mor_models::checkpoint::load_run_model(dir, &model)
        .with_context(|| format!("loading the weights of {}", dir.display()))?;
    if let Some(d) = args.max_depth {
        model
            .set_max_depth(Some(d))
            .map_err(|e| anyhow::anyhow!("--max-depth: {e}"))?;
        eprintln!(
            "scoring with at most {d} of {} recursion steps",
            cfg.plan.num_recursions
        );
    }
    let dcfg = match &args.data {
        Some(d) => {
            let mut dcfg = data_config(&cfg, Some(d));
            let recorded = DataRecord::read(dir)?;
            let now = DataRecord::of(&dcfg)?;
            if recorded.is_some_and(|r| r.same_data(&now)) {
                // The run's own data (moved or copied): its own validation split, as
                // `eval --run` alone would score it.
                eprintln!("--data {} holds the data this run was trained on: scoring its validation split", d.display());
            } else {
                // Other data: score a larger share of it.
                dcfg.val_fraction = dcfg.val_fraction.max(0.5);
            }
            dcfg
        }
        None => recorded_data(dir, &cfg)?,
    };
    let ds = prepare_existing(dir, &dcfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    let name = dir.file_name().and_then(|s| s.to_str()).unwrap_or("run");
    let (ev, _) = evaluate(&model, &ds, &cfg, name, &args.tasks)?;
    eprintln!("{name}: {}", ev.coverage());
    println!("{}", serde_json::to_string_pretty(&ev)?);
    Ok(())
}

/// The data settings of the data `dir`'s run was trained on, checked against its record.
fn recorded_data(
    dir: &std::path::Path,
    cfg: &mor_core::config::ResolvedConfig,
) -> anyhow::Result<mor_models::data::DataConfig> {
    mor_models::checkpoint::verify_files(dir, &[DATA_FILE], false).with_context(|| {
        format!(
            "{} does not record the data it was trained on; pass --data PATH to evaluate on given data",
            dir.display()
        )
    })?;
    let rec =
        DataRecord::read(dir)?.with_context(|| format!("{}: no {DATA_FILE}", dir.display()))?;
    let dcfg = with_source(&data_config(cfg, None), &rec.source);
    let now = DataRecord::of(&dcfg).map_err(|e| {
        anyhow::anyhow!(
            "the data {} was trained on, {}, cannot be read: {e}; restore it, or pass --data PATH",
            dir.display(),
            rec.source
        )
    })?;
    if !rec.same_data(&now) {
        anyhow::bail!(
            "the data {} was trained on has changed:\n  recorded: {}\n  now:      {}\npass --data PATH to evaluate on other data",
            dir.display(),
            rec.describe(),
            now.describe()
        );
    }
    Ok(dcfg)
}
