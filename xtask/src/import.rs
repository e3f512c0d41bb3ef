//! `cargo xtask import --hf DIR --out RUN_DIR`: reads a Hugging Face Llama-family folder
//! (Llama, SmolLM, Mistral without a sliding window) and writes a vanilla mor run folder
//! (`config.toml`, `config.json`, `model.safetensors`, `tokenizer.json`, `manifest.json`)
//! that `generate --run`, `eval --run` and `bench infer` read. Every check runs before
//! anything is written; the run folder appears whole or not at all.

use anyhow::Context;
use std::path::PathBuf;

/// Flags of `import`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A Hugging Face model folder: config.json, model.safetensors (or
    /// model.safetensors.index.json with its shards) and tokenizer.json.
    #[arg(long)]
    pub(crate) hf: PathBuf,
    /// The run folder to write (must not exist, or be empty).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// Runs `import`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    let imp = mor_models::hf::read_hf(&args.hf)
        .with_context(|| format!("cannot import {}", args.hf.display()))?;
    imp.write_run(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let m = &imp.config.model;
    println!(
        "imported {} ({}: {} layers, d = {}, {} heads / {} KV heads of {}, vocab {}) into {}",
        args.hf.display(),
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
