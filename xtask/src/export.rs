//! `cargo xtask export --run DIR --out DIR [--format hf]`: writes a trained vanilla run as a
//! Hugging Face Llama folder (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `generation_config.json`) that `LlamaForCausalLM.from_pretrained` loads. The folder is
//! written under a temporary name and renamed at the end; an existing non-empty `--out` is
//! refused.

use anyhow::Context;
use mor_models::tokenizer::Tokenizer;
use mor_models::MorModel;
use std::path::PathBuf;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A Hugging Face `LlamaForCausalLM` folder (vanilla models only).
    Hf,
    /// The official MoR code's checkpoint layout (not supported yet).
    Official,
}

/// Flags of `export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A run folder written by `train`, `ablate` or `import`.
    #[arg(long)]
    run: PathBuf,
    /// The folder to write (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "hf")]
    format: Format,
}

/// Runs `export`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    if args.format == Format::Official {
        anyhow::bail!(
            "--format official (the official MoR checkpoint layout) is not supported yet; use --format hf for a vanilla model"
        );
    }
    let dir = &args.run;
    let cfg = crate::generate::load_run_config(dir)?;
    let model = MorModel::new(&cfg)?;
    if let Some(why) = mor_models::hf::hf_refusal(&model) {
        anyhow::bail!("cannot export {} as hf: {why}", dir.display());
    }
    let cfg_file = if dir.join("config.toml").exists() {
        "config.toml"
    } else {
        "config.json"
    };
    mor_models::checkpoint::verify_files(dir, &[cfg_file, "tokenizer.json"], false)
        .with_context(|| format!("cannot trust the files of {}", dir.display()))?;
    mor_models::checkpoint::load_model(dir, &model.named_vars())
        .with_context(|| format!("loading the weights of {}", dir.display()))?;
    let tok = Tokenizer::load(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    mor_models::hf::export_hf(&model, &tok, &args.out)
        .with_context(|| format!("cannot export {} to {}", dir.display(), args.out.display()))?;
    println!(
        "exported {} as a Hugging Face Llama folder: {}",
        dir.display(),
        args.out.display()
    );
    Ok(())
}
