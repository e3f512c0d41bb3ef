//! `cargo xtask generate --run DIR --prompt TEXT [--max-tokens N] [--temperature T] [--top-k K]
//! [--top-p P] [--seed S] [--show-depth] [--color] [--threads N] [--backend KIND]`: loads a
//! trained run (on another backend than it was trained on with `--backend`) and
//! streams generated text to stdout (spec §5), optionally annotating every token with the
//! recursion depth that produced it (`token[2]`, or ANSI colours by depth).

use mor_models::engine::{
    encode_prompt, Engine, EngineConfig, Event, FinishReason, Request, SamplingParams,
};
use mor_models::tokenizer::Tokenizer;
use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

/// Flags of `generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A run folder written by `train` (holds config.toml or config.json, model.safetensors
    /// and tokenizer.json).
    #[arg(long)]
    run: PathBuf,
    /// The prompt text (UTF-8).
    #[arg(long, value_parser = clap::value_parser!(OsString))]
    prompt: OsString,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy; default: the run's `infer.temperature`).
    #[arg(long)]
    temperature: Option<f64>,
    /// Keep the K most likely tokens (0 = all; default: the run's `infer.top_k`).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling probability (1 = off; default: the run's `infer.top_p`).
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Annotate every generated token with its depth, as `token[d]`.
    #[arg(long)]
    show_depth: bool,
    /// Colour every generated token by its depth (ANSI).
    #[arg(long)]
    color: bool,
    /// Stop at the tokenizer's end-of-text token.
    #[arg(long)]
    stop_at_eos: bool,
    /// Rayon / matmul threads (decoding is fastest with 1 on small machines).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Test-time depth: at most this many recursion steps per token (1..=N_r; default
    /// `infer.max_depth` of the run's config).
    #[arg(long)]
    max_depth: Option<usize>,
    /// Run on this backend instead of the run's own `backend.kind` (e.g. `cpu` for a run
    /// trained on `cuda`; a one-line notice names both). The weights load on any backend.
    #[arg(long, value_name = "KIND")]
    backend: Option<String>,
}

const COLOURS: [&str; 6] = [
    "\x1b[34m", "\x1b[32m", "\x1b[33m", "\x1b[35m", "\x1b[31m", "\x1b[36m",
];

/// Runs `generate`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    let dir = &args.run;
    // The config (`config.toml`, else the resolved `config.json`), checked against the
    // folder's manifest with `tokenizer.json`, on the backend asked for.
    let rc = mor_models::run::read_run_config(dir, args.backend.as_deref())?;
    if let Some(n) = rc.notice() {
        eprintln!("{n}");
    }
    let cfg = &rc.cfg;
    mor_models::run::set_threads(args.threads);
    let tok = Tokenizer::load(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let model = rc.load_model(dir)?;
    let prompt = encode_prompt(&tok, args.prompt.as_encoded_bytes())?;
    let sampling = SamplingParams {
        temperature: args.temperature.unwrap_or(cfg.infer.temperature),
        top_k: args.top_k.unwrap_or(cfg.infer.top_k),
        top_p: args.top_p.unwrap_or(cfg.infer.top_p),
        seed: args.seed,
    };
    let ecfg = EngineConfig {
        batch_size: 1,
        max_depth: Some(match args.max_depth {
            Some(d) if (1..=cfg.plan.num_recursions).contains(&d) => d,
            Some(d) => anyhow::bail!(
                "--max-depth {d}: use 1..={} (the model's N_r)",
                cfg.plan.num_recursions
            ),
            None => cfg.infer.max_depth.clamp(1, cfg.plan.num_recursions),
        }),
        ..Default::default()
    };
    let mut engine = Engine::new(&model, ecfg)?;
    let stop_token = args.stop_at_eos.then(|| tok.eos_id());
    engine.submit(Request {
        prompt,
        max_new_tokens: args.max_tokens,
        sampling,
        stop_token,
    })?;
    let mut out = std::io::stdout().lock();
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    while !engine.is_idle() {
        for ev in engine.step()? {
            match ev {
                Event::Token { token, depth, .. } => {
                    generated.push(token);
                    // Decode the whole generation and print what is new, so multi-byte
                    // characters split across tokens come out whole.
                    let text = tok.decode(&generated).map_err(|e| anyhow::anyhow!("{e}"))?;
                    let new = text
                        .strip_prefix(printed.as_str())
                        .unwrap_or(&text)
                        .to_string();
                    if args.color {
                        let c = COLOURS[(depth as usize).saturating_sub(1) % COLOURS.len()];
                        write!(out, "{c}{new}\x1b[0m")?;
                    } else {
                        write!(out, "{new}")?;
                    }
                    if args.show_depth {
                        write!(out, "[{depth}]")?;
                    }
                    out.flush()?;
                    printed = text;
                }
                Event::Finished(c) => {
                    writeln!(out)?;
                    if let FinishReason::Error(e) = &c.finish {
                        anyhow::bail!("generation failed: {e}");
                    }
                    if c.finish == FinishReason::Context {
                        eprintln!(
                            "stopped at the context limit (model.seq_len = {} tokens, prompt included) after {} of {} tokens",
                            cfg.model.seq_len,
                            c.tokens.len(),
                            args.max_tokens
                        );
                    }
                    if args.show_depth || args.color {
                        let n = c.depths.len().max(1) as f64;
                        let mean = c.depths.iter().map(|&d| d as f64).sum::<f64>() / n;
                        eprintln!(
                            "{} tokens, finish: {:?}, mean depth {mean:.2} of {}",
                            c.tokens.len(),
                            c.finish,
                            cfg.plan.num_recursions
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mor_core::config::Config;
    use mor_models::MorModel;
    use std::path::Path;

    /// A run folder like `train` writes: config.toml, model.safetensors, tokenizer.json.
    fn tiny_run(name: &str, with_toml: bool) -> PathBuf {
        let _ = mor_models::builtin::link();
        let dir = std::env::temp_dir().join(format!("mor-generate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = "[model]\npreset = \"micro\"\n[recursion]\nnum_recursions = 2\nsharing = { kind = \"middle_cycle\" }\n\
                    [router]\nkind = \"expert_choice\"\n[train]\nbudget = { steps = 1 }\n";
        let cfg = Config::from_toml_str(text).unwrap();
        let model = MorModel::new(&cfg).unwrap();
        let json = serde_json::to_value(&cfg).unwrap();
        mor_models::checkpoint::save_model(&dir, &model.named_vars(), &json).unwrap();
        if with_toml {
            std::fs::write(dir.join("config.toml"), cfg.to_toml_string()).unwrap();
        }
        Tokenizer::byte_level().save(&dir).unwrap();
        let names: &[&str] = if with_toml {
            &["config.toml", "tokenizer.json"]
        } else {
            &["tokenizer.json"]
        };
        mor_models::checkpoint::record_files(&dir, names).unwrap();
        dir
    }

    fn args(run: &Path, prompt: &[u8]) -> Args {
        use std::os::unix::ffi::OsStrExt;
        Args {
            run: run.to_path_buf(),
            prompt: std::ffi::OsStr::from_bytes(prompt).to_os_string(),
            max_tokens: 4,
            temperature: None,
            top_k: None,
            top_p: None,
            seed: 0,
            show_depth: true,
            color: true,
            stop_at_eos: false,
            threads: 1,
            max_depth: None,
            backend: None,
        }
    }

    #[test]
    fn generates_from_a_run_folder_and_refuses_bad_prompts() {
        for (name, with_toml) in [("toml", true), ("json", false)] {
            let dir = tiny_run(name, with_toml);
            let cfg = mor_models::run::read_run_config(&dir, None).unwrap().cfg;
            assert_eq!(cfg.plan.num_recursions, 2);
            run_cmd(&args(&dir, b"hello")).unwrap();
            let err = run_cmd(&args(&dir, b"he\xffllo")).unwrap_err().to_string();
            assert!(err.contains("UTF-8"), "{err}");
            assert!(run_cmd(&args(&dir, b"")).is_err());
            let mut bad = args(&dir, b"hi");
            bad.temperature = Some(-1.0);
            assert!(run_cmd(&bad).is_err());
            let _ = std::fs::remove_dir_all(&dir);
        }
        let missing = std::env::temp_dir().join("mor-generate-no-such-run");
        let err = run_cmd(&args(&missing, b"x")).unwrap_err().to_string();
        assert!(err.contains("not a run folder"), "{err}");
    }
}
