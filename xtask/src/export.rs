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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_then_export_through_the_commands() {
        let _ = mor_models::builtin::link();
        let tmp = std::env::temp_dir().join(format!("mor-xtask-hf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../mor-models/tests/fixtures/hf_tiny");
        let run = tmp.join("run");
        crate::import::run_cmd(&crate::import::Args {
            hf: fixture.clone(),
            out: run.clone(),
        })
        .unwrap();
        // An import into a run folder that holds something is refused.
        let e = crate::import::run_cmd(&crate::import::Args {
            hf: fixture.clone(),
            out: run.clone(),
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("not an empty folder"), "{e:#}");
        let e = run_cmd(&Args {
            run: run.clone(),
            out: tmp.join("official"),
            format: Format::Official,
        })
        .unwrap_err();
        assert!(e.to_string().contains("not supported yet"), "{e}");
        assert!(!tmp.join("official").exists());
        let out = tmp.join("hf");
        run_cmd(&Args {
            run: run.clone(),
            out: out.clone(),
            format: Format::Hf,
        })
        .unwrap();
        // The export holds the fixture's weights bit for bit.
        let a = mor_models::hf::read_hf(&fixture).unwrap();
        let b = mor_models::hf::read_hf(&out).unwrap();
        for (n, t) in &a.tensors {
            let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = b.tensors[n]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(x, y, "{n}");
        }
        // A recursive run is refused, naming the reason.
        let rec = tmp.join("rec");
        std::fs::create_dir_all(&rec).unwrap();
        std::fs::write(
            rec.join("config.toml"),
            "[model]\npreset = \"micro\"\n[recursion]\nnum_recursions = 2\nsharing = \"cycle\"\n",
        )
        .unwrap();
        let e = run_cmd(&Args {
            run: rec,
            out: tmp.join("rec-hf"),
            format: Format::Hf,
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("recursive") && e.to_string().contains("`official`"),
            "{e}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
