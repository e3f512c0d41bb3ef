//! `cargo xtask eval --run DIR [--data PATH] [--tasks FILE ...] [--backend KIND]`: evaluates
//! a trained run (validation NLL and bits per byte with full-sequence and causal routing,
//! few-shot multiple choice, router metrics) and prints the results as JSON. `--backend`
//! evaluates on another backend than the run was trained on (docs/runs-across-devices.md).

use anyhow::Context;
use mor_models::provenance::{with_source, DataRecord, DATA_FILE};
use mor_models::run::{data_config, evaluate, prepare_existing, read_run_config, set_threads};
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
    /// Run on this backend instead of the run's own `backend.kind` (e.g. `cpu` for a run
    /// trained on `cuda`; a one-line notice names both). The weights load on any backend.
    #[arg(long, value_name = "KIND")]
    backend: Option<String>,
}

/// Runs `eval`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    let dir = &args.run;
    let rc = read_run_config(dir, args.backend.as_deref())?;
    if let Some(n) = rc.notice() {
        eprintln!("{n}");
    }
    let cfg = &rc.cfg;
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
    let model = rc.load_model(dir)?;
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
            let mut dcfg = data_config(cfg, Some(d));
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
        None => recorded_data(dir, cfg)?,
    };
    let ds = prepare_existing(dir, &dcfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    let name = dir.file_name().and_then(|s| s.to_str()).unwrap_or("run");
    let (ev, _) = evaluate(&model, &ds, cfg, name, &args.tasks)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished 1-step run trained on `reference`, whose folder then names `backend`
    /// (config.toml and config.json rewritten and re-hashed, as a run started on it writes
    /// them).
    fn run_named(tag: &str, backend: &str) -> PathBuf {
        let _ = mor_models::builtin::link();
        let dir = std::env::temp_dir().join(format!("mor-xtask-eval-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = "[model]\npreset = \"micro\"\n[runtime]\nbackend = \"reference\"\n\
                    [recursion]\nnum_recursions = 2\nsharing = { kind = \"middle_cycle\" }\n\
                    [router]\nkind = \"expert_choice\"\n[train]\nbudget = { steps = 1 }\n\
                    batch_seqs = 2\nmicro_batch_seqs = 2\n[data]\nsource = \"builtin\"\n\
                    builtin_docs = 20\ntokenizer = \"byte\"\n[eval]\nmax_batches = 1\n";
        let cfg = mor_core::config::Config::from_toml_str(text).unwrap();
        let opts = mor_models::run::RunOptions {
            out: dir.clone(),
            quiet: true,
            skip_eval: true,
            ..Default::default()
        };
        mor_models::run::run(&cfg, "t", &opts).unwrap();
        let named = mor_models::run::with_backend(&cfg, backend).unwrap();
        use mor_models::checkpoint::{record_files, write_atomic};
        write_atomic(&dir.join("config.toml"), named.to_toml_string().as_bytes()).unwrap();
        write_atomic(
            &dir.join("config.json"),
            named.to_json().unwrap().as_bytes(),
        )
        .unwrap();
        record_files(&dir, &["config.toml", "config.json"]).unwrap();
        dir
    }

    fn args(run: &std::path::Path, backend: Option<&str>) -> Args {
        Args {
            run: run.to_path_buf(),
            data: None,
            tasks: Vec::new(),
            max_depth: None,
            backend: backend.map(str::to_string),
        }
    }

    #[test]
    fn a_run_of_an_unavailable_backend_evaluates_with_backend_cpu() {
        let dir = run_named("cuda", "cuda");
        let Err(err) = run_cmd(&args(&dir, None)) else {
            // The run's own backend builds here (a build with the feature, on a GPU).
            let _ = std::fs::remove_dir_all(&dir);
            return;
        };
        let err = format!("{err:#}");
        assert!(
            err.contains("`cuda` cannot be built here") && err.contains("--backend cpu"),
            "{err}"
        );
        run_cmd(&args(&dir, Some("cpu"))).unwrap();
        let err = format!("{:#}", run_cmd(&args(&dir, Some("tpu"))).unwrap_err());
        assert!(err.contains("cpu, cuda, reference"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
