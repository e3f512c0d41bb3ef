//! `cargo xtask train --config FILE [--data PATH] [--out DIR] [--resume] [--set k=v ...]
//! [--backend KIND]`: trains one run and evaluates it (spec §1.3).

use anyhow::Context;
use mor_models::run::{run_with, with_backend, BackendSwitch, RunOptions};
use std::path::PathBuf;

/// Flags of `train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run config (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// Training data: a file or folder of .txt / .jsonl / .parquet / token files
    /// (overrides `data.source`), or `builtin` for the generated corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder (default: `runs/<config name>`). It must be new or empty, or hold a run of
    /// this config (then pass --resume); a finished run is never changed. Held exclusively
    /// (`run.lock`) while training: a second `train` on it is refused.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in `--out` from its latest valid checkpoint (its config must resolve
    /// to the same values, and its data, recorded in `data.json`, is used unless `--data`
    /// names the same contents). A finished run is only reported, never changed.
    #[arg(long)]
    resume: bool,
    /// Override a config key, e.g. `--set train.lr=1e-3` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Stop after this many optimiser steps (the run can be resumed).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
    /// Train on this backend (`runtime.backend = "KIND"`, overriding the config). With
    /// `--resume`, this is how a run started on another backend continues on this one (from
    /// its latest checkpoint; not bit-identical to an uninterrupted run; each segment's
    /// backend is recorded in the run's segments.jsonl). Without it such a resume is refused.
    #[arg(long, value_name = "KIND")]
    backend: Option<String>,
}

/// Runs `train`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    let mut cfg = crate::plan::load(&args.config, &args.overrides)?;
    let switch = match &args.backend {
        Some(kind) => {
            // Checked first: an unknown backend is refused without a notice that uses it.
            let moved = with_backend(&cfg, kind)?;
            if cfg.backend.kind != *kind {
                eprintln!(
                    "note: {} names backend `{}`; using backend `{kind}` (--backend)",
                    args.config.display(),
                    cfg.backend.kind
                );
            }
            cfg = moved;
            BackendSwitch::Allow
        }
        None => BackendSwitch::Refuse,
    };
    let name = args
        .config
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("run")
        .to_string();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&name));
    if let Some(d) = &args.data {
        // `builtin` names the generated corpus, as `data.source = "builtin"` does.
        if d.as_os_str() != "builtin" && !d.exists() {
            anyhow::bail!("--data {}: no such file or folder", d.display());
        }
    }
    let opts = RunOptions {
        out: out.clone(),
        data: args.data.clone(),
        resume: args.resume,
        quiet: args.quiet,
        label: name.clone(),
        stop_after: args.stop_after,
        skip_eval: false,
    };
    let outcome = run_with(&cfg, &name, &opts, switch)
        .with_context(|| format!("run `{name}` in {}", out.display()))?;
    let s = &outcome.summary;
    if outcome.already_finished {
        eprintln!(
            "{}: the run is already finished ({} steps); nothing was changed",
            out.display(),
            s.steps
        );
    }
    println!(
        "{name}: {} steps, {} tokens, val NLL {:.4}{}, {:.0} tokens/s, {:.0}s -> {}",
        s.steps,
        s.train_tokens,
        s.val_nll,
        s.val_nll_causal
            .map(|c| format!(" (causal {c:.4})"))
            .unwrap_or_default(),
        s.train_tokens_per_sec,
        s.wall_secs,
        out.display()
    );
    Ok(())
}
