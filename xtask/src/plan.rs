//! `cargo xtask plan --config FILE [--json] [--set key=value ...]`: resolves a config and
//! shows its slot → block table, unique, non-embedding and embedding parameters, forward
//! FLOPs per token (spec §1.4), the steps and tokens of its budget (spec §1.3) and the
//! estimated training memory (`mor_core::accounting::memory_estimate`).

use anyhow::Context;
use mor_core::accounting::{self, Report};
use mor_core::config::{apply_override, parse_override, Budget, Config, ResolvedConfig};
use mor_core::plan::Segment;
use std::path::PathBuf;

/// Flags of `plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run config (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Override a config key before resolution, e.g. `--set router.kind=token_choice`
    /// (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

/// Reads `path`, applies `overrides` and resolves the config.
pub fn load(path: &std::path::Path, overrides: &[String]) -> anyhow::Result<ResolvedConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut table = Config::parse_table(&text).with_context(|| format!("{}", path.display()))?;
    for o in overrides {
        let (key, value) = parse_override(o)?;
        apply_override(&mut table, &key, value)?;
    }
    Config::from_table(table).with_context(|| format!("{}", path.display()))
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `117987840` → `118.0M`.
fn short(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2}B", n / 1e9),
        n if n >= 1e6 => format!("{:.1}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}K", n / 1e3),
        n => format!("{n}"),
    }
}

fn segment(s: &Segment) -> String {
    match s {
        Segment::Prelude => "prelude".to_string(),
        Segment::Coda => "coda".to_string(),
        Segment::Recursion { step, layer } => format!("step {step} layer {layer}"),
    }
}

/// `[init]`: which pretrained layers fill which unique block (spec §2), e.g.
/// `block 1 <- layers 1+3 (mean)`; `None` without `[init]`.
///
/// # Errors
/// When the pretrained model cannot be read or the method does not fit the plan.
fn init_lines(cfg: &ResolvedConfig) -> anyhow::Result<Option<String>> {
    let Some(init) = &cfg.init else {
        return Ok(None);
    };
    let layers = mor_models::hf::pretrained_layers(&init.from)?;
    let sources = mor_models::hf::init_mapping(cfg, init, layers)?;
    let mut out = format!(
        "init     {} from {} ({layers} pretrained layers; routers start fresh)",
        init.method.as_str(),
        init.from.display()
    );
    for (b, src) in sources.iter().enumerate() {
        let what = match src.as_slice() {
            [one] => format!("layer {one}"),
            many => format!(
                "layers {} (mean)",
                many.iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join("+")
            ),
        };
        out.push_str(&format!("\n  block {b:>3} <- {what}"));
    }
    Ok(Some(out))
}

fn print_text(path: &std::path::Path, cfg: &ResolvedConfig, r: &Report, init: Option<&str>) {
    let m = &cfg.model;
    println!("config   {}", path.display());
    println!(
        "model    d={} layers={} heads={}/{} kv, head_dim={} d_inter={} vocab={} seq_len={}{}",
        m.hidden_size,
        m.num_layers,
        m.num_heads,
        m.num_kv_heads,
        m.head_dim,
        m.intermediate_size,
        m.vocab_size,
        m.seq_len,
        if m.tie_embeddings {
            " (tied head)"
        } else {
            " (untied head)"
        }
    );
    println!(
        "plan     {}: N_r = {}, B_d = {}, {} slots, {} unique blocks{}",
        r.strategy,
        r.num_recursions,
        r.base_depth,
        r.num_slots,
        r.num_blocks,
        if cfg.recursion.ln_share {
            ""
        } else {
            " (norms per slot)"
        }
    );
    println!();
    println!("  slot  block  segment");
    for (i, s) in r.slots.iter().enumerate() {
        println!("  {i:>4}  {:>5}  {}", s.block, segment(&s.segment));
    }
    println!();
    match &cfg.router {
        Some(router) => {
            let caps: Vec<String> = r
                .capacities
                .iter()
                .flatten()
                .map(|c| format!("{c:.3}"))
                .collect();
            println!(
                "router   {}: capacities [{}], active tokens per step {:?}",
                router.kind,
                caps.join(", "),
                r.active_tokens
            );
        }
        None => println!("router   none (every token runs every step)"),
    }
    println!(
        "kv       {}{}",
        cfg.kv.kind,
        if r.kv_sharing {
            " (steps >= 2 reuse the step-1 K/V)"
        } else {
            ""
        }
    );
    if let Some(init) = init {
        println!("{init}");
    }
    println!(
        "params   non-embedding {} ({}), embedding {} ({}), router {}, total {} ({})",
        thousands(r.non_embedding_params),
        short(r.non_embedding_params as f64),
        thousands(r.embedding_params),
        short(r.embedding_params as f64),
        thousands(r.router_params),
        thousands(r.total_params),
        short(r.total_params as f64),
    );
    if let Some(relax) = &cfg.recursion.relaxation {
        use mor_core::config::Relaxation;
        let what = match relax {
            Relaxation::RecursionEncoding => {
                "recursion_encoding (a vector per depth, no product)".to_string()
            }
            Relaxation::Lora {
                rank,
                alpha,
                targets,
            } => format!(
                "lora rank {rank}, alpha {alpha}, on {} (per depth; its FLOPs are in the flops line)",
                targets.join(", ")
            ),
            Relaxation::Dora {
                rank,
                alpha,
                targets,
            } => format!(
                "dora rank {rank}, alpha {alpha}, on {} (per depth, with a magnitude per output; its FLOPs are in the flops line)",
                targets.join(", ")
            ),
            Relaxation::AdaptionPrompt { prompt_len } => format!(
                "adaption_prompt of {prompt_len} per depth and layer, tanh-gated per head (its FLOPs are in the flops line)"
            ),
        };
        println!(
            "relax    {what}: {} parameters (in the total)",
            thousands(r.relaxation_params)
        );
    }
    println!(
        "flops    {:.1} forward FLOPs per token (spec §1.4)",
        r.flops_per_token
    );
    let available = accounting::available_memory()
        .map(|b| format!("{} available", accounting::human_bytes(b)))
        .unwrap_or_else(|| "available memory unknown".to_string());
    println!(
        "memory   training needs about {}; {available}",
        r.memory.summary()
    );
    let budget = match r.budget {
        Budget::Steps(s) => format!("{s} steps"),
        Budget::Tokens(t) => format!("{t:e} tokens"),
        Budget::Flops(f) => format!("{f:e} FLOPs"),
    };
    println!(
        "budget   {budget} -> {} steps x {} tokens = {} tokens ({:.3e} FLOPs)",
        r.steps,
        thousands(r.tokens_per_step),
        short(r.tokens as f64),
        r.flops
    );
    println!(
        "schedule {:?}, lr {}, warmup {} steps, cooldown {} steps, batch {} seqs ({} per micro-batch)",
        cfg.train.schedule, cfg.train.lr, r.warmup_steps, r.decay_steps, cfg.train.batch_seqs, cfg.train.micro_batch_seqs
    );
}

/// Runs `plan`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let cfg = load(&args.config, &args.overrides)?;
    let report = accounting::report(&cfg)?;
    let init = init_lines(&cfg)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&args.config, &cfg, &report, init.as_deref());
    }
    Ok(())
}
