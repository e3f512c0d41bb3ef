//! `cargo xtask export --run DIR --out DIR [--format hf|official]`:
//!
//! - `hf`: a trained vanilla run as a Hugging Face Llama folder (`config.json`,
//!   `model.safetensors`, `tokenizer.json`, `generation_config.json`) that
//!   `LlamaForCausalLM.from_pretrained` loads;
//! - `official`: any model the reference MoR code can express (vanilla, recursive, MoR) in
//!   its `state_dict` layout, with its settings (`mor_config.json` / `.yaml`), `config.json`
//!   and `tokenizer.json` (docs/official-layout.md).
//!
//! The folder is written under a temporary name and renamed at the end; an existing
//! non-empty `--out` is refused. `--backend KIND` builds the model on another backend than
//! the run's own (the exported weights are the same f32 tensors).

use anyhow::Context;
use mor_models::run::RunConfig;
use mor_models::tokenizer::Tokenizer;
use std::path::PathBuf;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A Hugging Face `LlamaForCausalLM` folder (vanilla models only).
    Hf,
    /// The official MoR code's `state_dict` layout (every unrolled layer, tied aliases as
    /// copies, its router names), with mor_config.json/.yaml, config.json and
    /// tokenizer.json; docs/official-layout.md converts it to pytorch_model.bin.
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
    /// Run on this backend instead of the run's own `backend.kind` (e.g. `cpu` for a run
    /// trained on `cuda`; a one-line notice names both). The weights load on any backend.
    #[arg(long, value_name = "KIND")]
    backend: Option<String>,
}

/// Runs `export`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    export(args).map(|_| ())
}

/// `export`; returns the name of the backend the model was built on.
fn export(args: &Args) -> anyhow::Result<&'static str> {
    let dir = &args.run;
    let rc = mor_models::run::read_run_config(dir, args.backend.as_deref())?;
    if let Some(n) = rc.notice() {
        eprintln!("{n}");
    }
    let cfg = &rc.cfg;
    // What the format cannot express is refused before the weights are read.
    let model = rc.build_model()?;
    match args.format {
        Format::Hf => {
            if let Some(why) = mor_models::hf::hf_refusal(&model) {
                anyhow::bail!("cannot export {} as hf: {why}", dir.display());
            }
        }
        Format::Official => {
            mor_models::official::official_shape(cfg)
                .with_context(|| format!("cannot export {} as official", dir.display()))?;
        }
    }
    RunConfig::load_weights(dir, &model)?;
    let tok = Tokenizer::load(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let written = match args.format {
        Format::Hf => mor_models::hf::export_hf(&model, &tok, &args.out)
            .map(|_| "a Hugging Face Llama folder"),
        Format::Official => mor_models::official::export_official(&model, &tok, &args.out)
            .map(|_| "the official MoR checkpoint layout"),
    };
    let what = written
        .with_context(|| format!("cannot export {} to {}", dir.display(), args.out.display()))?;
    println!(
        "exported {} as {what}: {}",
        dir.display(),
        args.out.display()
    );
    Ok(model.backend().name())
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
        let hf_args = |out: &std::path::Path| crate::import::Args {
            hf: Some(fixture.clone()),
            official: None,
            config: None,
            official_yaml: None,
            tokenizer: None,
            out: out.to_path_buf(),
        };
        crate::import::run_cmd(&hf_args(&run)).unwrap();
        // An import into a run folder that holds something is refused.
        let e = crate::import::run_cmd(&hf_args(&run)).unwrap_err();
        assert!(format!("{e:#}").contains("not an empty folder"), "{e:#}");
        // The official layout, and back through `import --official`: the same weights.
        run_cmd(&Args {
            run: run.clone(),
            out: tmp.join("official"),
            format: Format::Official,
            backend: None,
        })
        .unwrap();
        let back = tmp.join("back");
        crate::import::run_cmd(&crate::import::Args {
            hf: None,
            official: Some(tmp.join("official")),
            config: None,
            official_yaml: None,
            tokenizer: None,
            out: back.clone(),
        })
        .unwrap();
        let a = mor_models::checkpoint::load_tensors(&run.join("model.safetensors")).unwrap();
        let b = mor_models::checkpoint::load_tensors(&back.join("model.safetensors")).unwrap();
        assert_eq!(
            a.keys().collect::<std::collections::BTreeSet<_>>(),
            b.keys().collect::<std::collections::BTreeSet<_>>()
        );
        for (n, t) in &a {
            let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = b[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(x, y, "{n}");
        }
        let out = tmp.join("hf");
        let built_on = export(&Args {
            run: run.clone(),
            out: out.clone(),
            format: Format::Hf,
            // Built on another backend than the run's (`cpu`): the same weights come out.
            backend: Some("reference".into()),
        })
        .unwrap();
        assert_eq!(built_on, "reference");
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
            backend: None,
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("recursive") && e.to_string().contains("`--format official`"),
            "{e}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
