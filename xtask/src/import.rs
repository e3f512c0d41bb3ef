//! `cargo xtask import (--hf DIR | --official DIR [--config FILE | --official-yaml FILE]
//! [--tokenizer FILE]) --out RUN_DIR`: writes a mor run folder (`config.toml`,
//! `config.json`, `model.safetensors`, `tokenizer.json`, `manifest.json`) that
//! `generate --run`, `eval --run --data ...` and `export` read.
//!
//! - `--hf`: a Hugging Face Llama-family folder (Llama, SmolLM, Mistral without a sliding
//!   window), imported as a vanilla model;
//! - `--official`: a checkpoint in the official MoR code's layout (`model.safetensors` or
//!   `pytorch_model.bin`; docs/official-layout.md), for the mor config given with
//!   `--config`, or inferred from `--official-yaml` (the official training YAML) or from the
//!   folder's `mor_config.json` / `mor_config.yaml`.
//!
//! Every check runs before anything is written; the run folder appears whole or not at all.

use anyhow::Context;
use std::path::PathBuf;

/// Flags of `import`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["hf", "official"])))]
pub struct Args {
    /// A Hugging Face model folder: config.json, model.safetensors (or
    /// model.safetensors.index.json with its shards) and tokenizer.json.
    #[arg(long)]
    pub(crate) hf: Option<PathBuf>,
    /// A checkpoint in the official MoR layout: a folder with model.safetensors or
    /// pytorch_model.bin (and config.json), or the weights file itself.
    #[arg(long)]
    pub(crate) official: Option<PathBuf>,
    /// With --official: the mor config (TOML) of the checkpoint's model.
    #[arg(long, requires = "official", conflicts_with = "official_yaml")]
    pub(crate) config: Option<PathBuf>,
    /// With --official: the official training YAML (conf/pretrain/NAME.yaml) the
    /// checkpoint was trained with; the mor config is inferred from it.
    #[arg(long, requires = "official")]
    pub(crate) official_yaml: Option<PathBuf>,
    /// With --official: the tokenizer.json, when the checkpoint folder has none.
    #[arg(long, requires = "official")]
    pub(crate) tokenizer: Option<PathBuf>,
    /// The run folder to write (must not exist, or be empty).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// Runs `import`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    match (&args.hf, &args.official) {
        (Some(hf), None) => import_hf(hf, args),
        (None, Some(dir)) => import_official(dir, args),
        _ => anyhow::bail!("give one of --hf DIR or --official DIR"),
    }
}

fn import_hf(hf: &std::path::Path, args: &Args) -> anyhow::Result<()> {
    let imp =
        mor_models::hf::read_hf(hf).with_context(|| format!("cannot import {}", hf.display()))?;
    imp.write_run(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let m = &imp.config.model;
    println!(
        "imported {} ({}: {} layers, d = {}, {} heads / {} KV heads of {}, vocab {}) into {}",
        hf.display(),
        imp.hf.model_type,
        imp.config.plan.num_blocks,
        m.hidden_size,
        m.num_heads,
        m.num_kv_heads,
        m.head_dim,
        m.vocab_size,
        args.out.display()
    );
    Ok(())
}

fn import_official(dir: &std::path::Path, args: &Args) -> anyhow::Result<()> {
    use mor_models::checkpoint::{record_files, save_run_model};
    use mor_models::tokenizer::{Tokenizer, TOKENIZER_FILE};
    let cfg = match (&args.config, &args.official_yaml) {
        (Some(p), _) => Some(crate::plan::load(p, &[])?),
        (None, Some(y)) => Some(
            mor_models::official::infer_config(dir, Some(y))
                .with_context(|| format!("cannot infer the config from {}", y.display()))?,
        ),
        (None, None) => None,
    };
    let folder = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        dir.parent().map(PathBuf::from).unwrap_or_default()
    };
    let tok_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| folder.join(TOKENIZER_FILE));
    if !tok_path.is_file() {
        anyhow::bail!(
            "{} has no {TOKENIZER_FILE}; pass --tokenizer FILE (the tokenizer the checkpoint was trained with)",
            folder.display()
        );
    }
    let tok = Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let imp = mor_models::official::read_official(dir, cfg)
        .with_context(|| format!("cannot import {}", dir.display()))?;
    let cfg = &imp.config;
    if tok.vocab_size() > cfg.model.vocab_size {
        anyhow::bail!(
            "{}: the tokenizer has {} tokens, the model's vocabulary {}",
            tok_path.display(),
            tok.vocab_size(),
            cfg.model.vocab_size
        );
    }
    let model = imp.model()?;
    mor_models::hf::import::write_dir_atomically(&args.out, |tmp| {
        std::fs::write(tmp.join("config.toml"), cfg.to_toml_string())
            .map_err(|e| mor_models::Error::io(tmp.join("config.toml"), e))?;
        save_run_model(tmp, &model, &serde_json::to_value(cfg).unwrap_or_default())?;
        tok.save(tmp)?;
        record_files(tmp, &["config.toml", TOKENIZER_FILE])
    })
    .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "imported {} ({}: {} unique blocks, N_r = {}, sharing {}) into {}",
        imp.path.display(),
        cfg.router
            .as_ref()
            .map(|r| r.kind.as_str())
            .unwrap_or(if cfg.plan.num_recursions > 1 {
                "recursive"
            } else {
                "vanilla"
            }),
        cfg.plan.num_blocks,
        cfg.plan.num_recursions,
        cfg.recursion.sharing.kind,
        args.out.display()
    );
    Ok(())
}
