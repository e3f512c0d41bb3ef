//! Stages 2 and 3 of resolution: plugin slots through the registry, then cross-field checks,
//! the recursion plan and the budget.

use super::raw::{self, render, RawConfig, RawSlot};
use super::{init_sources, InitConfig, InitMethod};
use super::{
    Budget, Config, DataConfig, DataSource, EvalConfig, InferConfig, KvShare, KvSharePattern,
    ModelDims, PluginSpec, Precision, RecursionConfig, Relaxation, ResolvedConfig, TokenizerSpec,
    TrainConfig, UpdatePath, Warmup, LORA_TARGETS, PRESETS,
};
use crate::accounting;
use crate::error::{ConfigProblem, Error, Result};
use crate::plan::{PlanRequest, RecursionPlan};
use crate::registry::{self, CheckCtx, Family};
use std::path::PathBuf;

/// Upper bounds that keep planning and accounting far from overflow and huge allocations.
const MAX_LAYERS: usize = 4096;
const MAX_RECURSIONS: usize = 1024;
const MAX_HIDDEN: usize = 1 << 17;
const MAX_HEADS: usize = 4096;
const MAX_INTER: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 24;
const MAX_SEQ: usize = 1 << 22;
/// Upper bound of `recursion.relaxation.prompt_len`.
const MAX_PROMPT_LEN: usize = 1 << 16;

/// Threads this machine can run in parallel (`std::thread::available_parallelism`, 1 when
/// unknown): the upper bound of `runtime.threads`.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `Err` naming `runtime.threads`, the value and the allowed range when `threads` exceeds
/// [`available_cores`]: a new run refuses to oversubscribe the machine (100000 threads once
/// hung, then aborted). Commands on an existing run clamp instead (`set_threads` of
/// `mor-models`).
///
/// # Errors
/// [`Error::Config`](crate::Error::Config) with the one problem.
pub fn check_threads(threads: usize) -> crate::Result<()> {
    let cores = available_cores();
    if threads <= cores {
        return Ok(());
    }
    Err(crate::Error::Config(vec![ConfigProblem {
        field: "runtime.threads".into(),
        value: threads.to_string(),
        allowed: format!(
            "an integer in 0..={cores}: 0 lets rayon choose, otherwise at most the {cores} threads this machine can run in parallel (more only oversubscribe the cores)"
        ),
    }]))
}

/// `[recursion] relaxation` (spec §6, relaxation table).
fn relaxation(
    raw: Option<&raw::RawRelaxation>,
    n_r: usize,
    p: &mut Problems,
) -> Option<Relaxation> {
    let raw = raw?;
    let kind = raw.kind.as_deref().unwrap_or("none");
    let allowed_kinds =
        "\"none\", \"lora\", \"dora\", \"adaption_prompt\" or \"recursion_encoding\"";
    let unused = |p: &mut Problems, field: &str, present: bool| {
        if present {
            p.push(
                &format!("recursion.relaxation.{field}"),
                "(set)",
                format!("absent: relaxation `{kind}` has no {field}"),
            );
        }
    };
    let out = match kind {
        "none" => {
            unused(p, "rank", raw.rank.is_some());
            unused(p, "alpha", raw.alpha.is_some());
            unused(p, "targets", raw.targets.is_some());
            unused(p, "prompt_len", raw.prompt_len.is_some());
            return None;
        }
        "recursion_encoding" => {
            unused(p, "rank", raw.rank.is_some());
            unused(p, "alpha", raw.alpha.is_some());
            unused(p, "targets", raw.targets.is_some());
            unused(p, "prompt_len", raw.prompt_len.is_some());
            Relaxation::RecursionEncoding
        }
        "lora" | "dora" => {
            unused(p, "prompt_len", raw.prompt_len.is_some());
            let rank = raw.rank.unwrap_or(64);
            p.range("recursion.relaxation.rank", rank, 1, 1 << 16);
            let alpha = raw.alpha.unwrap_or(rank.max(1) as f64);
            p.float(
                "recursion.relaxation.alpha",
                alpha,
                |a| a > 0.0,
                "a finite number > 0",
            );
            let targets = raw
                .targets
                .clone()
                .unwrap_or_else(|| vec!["q_proj".into(), "v_proj".into()]);
            if targets.is_empty() {
                p.push(
                    "recursion.relaxation.targets",
                    "[]",
                    format!("a non-empty subset of {LORA_TARGETS:?}"),
                );
            }
            for (i, t) in targets.iter().enumerate() {
                if !LORA_TARGETS.contains(&t.as_str()) {
                    p.push(
                        "recursion.relaxation.targets",
                        format!("\"{t}\""),
                        format!("one of {LORA_TARGETS:?} (the MLP projections are not supported)"),
                    );
                } else if targets[..i].contains(t) {
                    p.push(
                        "recursion.relaxation.targets",
                        format!("\"{t}\""),
                        "each projection at most once",
                    );
                }
            }
            if kind == "lora" {
                Relaxation::Lora {
                    rank,
                    alpha,
                    targets,
                }
            } else {
                Relaxation::Dora {
                    rank,
                    alpha,
                    targets,
                }
            }
        }
        "adaption_prompt" => {
            unused(p, "rank", raw.rank.is_some());
            unused(p, "alpha", raw.alpha.is_some());
            unused(p, "targets", raw.targets.is_some());
            let allowed = format!(
                "an integer in 1..={MAX_PROMPT_LEN}: the length P of the learned prefix per recursion depth"
            );
            match raw.prompt_len {
                None => p.push("recursion.relaxation.prompt_len", "(absent)", allowed),
                Some(n) if !(1..=MAX_PROMPT_LEN).contains(&n) => {
                    p.push("recursion.relaxation.prompt_len", n, allowed)
                }
                Some(_) => {}
            }
            Relaxation::AdaptionPrompt {
                prompt_len: raw.prompt_len.unwrap_or(0),
            }
        }
        other => {
            p.push(
                "recursion.relaxation.kind",
                format!("\"{other}\""),
                allowed_kinds,
            );
            return None;
        }
    };
    if n_r < 2 {
        p.push(
            "recursion.relaxation.kind",
            format!("\"{kind}\""),
            "\"none\" for a vanilla model (num_recursions = 1): relaxation adapts the weights \
             shared across recursion depths, and a vanilla model shares none",
        );
        return None;
    }
    Some(out)
}

/// Collects problems with short helpers.
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn push(&mut self, field: &str, value: impl ToString, allowed: impl Into<String>) {
        self.0.push(ConfigProblem {
            field: field.to_string(),
            value: value.to_string(),
            allowed: allowed.into(),
        });
    }

    /// `lo <= v <= hi` for integers.
    fn range(&mut self, field: &str, v: usize, lo: usize, hi: usize) {
        if v < lo || v > hi {
            self.push(field, v, format!("an integer in {lo}..={hi}"));
        }
    }

    /// A finite float with `ok(v)`, described by `allowed`.
    fn float(&mut self, field: &str, v: f64, ok: impl Fn(f64) -> bool, allowed: &str) {
        if !(v.is_finite() && ok(v)) {
            self.push(field, v, allowed);
        }
    }

    fn into_result(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(self.0))
        }
    }
}

/// Resolves a raw table.
pub(super) fn resolve(table: toml::Table) -> Result<ResolvedConfig> {
    // Stage 1: the file's shape, and every check that needs no plugin.
    let (raw, stage1) = raw::parse_sections(&table);
    let mut p = Problems(stage1);
    let n_r = raw.recursion.num_recursions.unwrap_or(1);
    p.range("recursion.num_recursions", n_r, 1, MAX_RECURSIONS);
    let model = model_dims(&raw, &mut p);
    let train = train_fields(&raw, &mut p);
    let data = data_config(&raw, &mut p);
    // `kv.share_pattern` and `kv.share_loops` (spec §9) are read here and removed before the
    // KV policy validates its own parameters.
    let mut kv_slot = raw
        .kv
        .clone()
        .unwrap_or_else(|| default_slot("kv", "recursion_wise"));
    let kv_share = kv_share_keys(&mut kv_slot.params, &mut p);
    // A vanilla model with KV sharing runs `loops` labelled steps, all of them always.
    let infer = match kv_share {
        Some(share) if n_r == 1 => infer_config(&raw, share.loops, true, &mut p),
        _ => infer_config(&raw, n_r, false, &mut p),
    };
    let eval = eval_config(&raw, &mut p);
    // Bounded by the machine only when a run starts ([`check_threads`]): a run trained with
    // 16 threads is still evaluated, resumed and decoded on a smaller machine.
    let threads = raw.runtime.threads.unwrap_or(0);
    let seed = raw.runtime.seed.unwrap_or(0);

    // Stage 2: plugin slots.
    let default_sharing = if n_r == 1 { "none" } else { "middle_cycle" };
    let sharing_slot = match &raw.recursion.sharing {
        Some(v) => raw::slot("recursion.sharing", v, &mut p.0),
        None => Some(default_slot("recursion.sharing", default_sharing)),
    };
    if let (Some(share), Some(slot)) = (&kv_share, &sharing_slot) {
        if slot.kind != "none" {
            p.push(
                "kv.share_pattern",
                format!("\"{}\"", share.pattern.strategy()),
                format!(
                    "a sharing pattern applies to vanilla models only (recursion.sharing = \"none\", \
                     num_recursions = 1); this model recurses with sharing `{}`, whose steps >= 2 \
                     already reuse the step-1 K/V under `kv.kind = \"recursive_sharing\"` (spec §4): \
                     remove kv.share_pattern and kv.share_loops",
                    slot.kind
                ),
            );
        }
    }
    let sharing = sharing_slot.and_then(|s| plugin(Family::SharingStrategy, &s, &mut p));
    let mut router_ok = true;
    let router = match &raw.router {
        Some(s) if s.kind == "none" => {
            if !s.params.is_empty() {
                p.push(
                    "router",
                    render(&toml::Value::Table(s.params.clone())),
                    "`kind = \"none\"` (no routing) takes no parameters",
                );
            }
            None
        }
        Some(s) => {
            let r = plugin(Family::Router, s, &mut p);
            router_ok = r.is_some();
            r
        }
        None => None,
    };
    let kv = plugin(Family::KvPolicy, &kv_slot, &mut p);
    let backend_slot = match &raw.runtime.backend {
        Some(v) => raw::slot("runtime.backend", v, &mut p.0),
        None => Some(default_slot("runtime.backend", "cpu")),
    };
    let backend = backend_slot.and_then(|s| plugin(Family::Backend, &s, &mut p));

    let (
        Some(model),
        Some(train),
        Some(data),
        Some(infer),
        Some(eval),
        Some(sharing),
        Some(kv),
        Some(backend),
        true,
    ) = (
        model, train, data, infer, eval, sharing, kv, backend, router_ok,
    )
    else {
        // Something above failed and said why.
        return Err(Error::Config(p.0));
    };
    p.into_result()?;

    // Stage 3: cross-field checks, the plan and the budget.
    let mut p = Problems(Vec::new());
    let recursion = RecursionConfig {
        num_recursions: n_r,
        sharing,
        ln_share: raw.recursion.ln_share.unwrap_or(true),
        depth_fix: raw.recursion.depth_fix.unwrap_or_default(),
        kv_share,
        relaxation: relaxation(raw.recursion.relaxation.as_ref(), n_r, &mut p),
    };
    let plan = match kv_share {
        Some(share) => vanilla_kv_share_plan(&model, share, &mut p),
        None => build_plan(&model, &recursion, &mut p),
    };
    let ctx = CheckCtx {
        num_recursions: n_r,
        seq_len: model.seq_len,
        hidden_size: model.hidden_size,
        router: router.as_ref().map(|r| r.kind.clone()),
        sharing: recursion.sharing.kind.clone(),
    };
    if let (Some(r), Some(plan)) = (&router, &plan) {
        if n_r < 2 {
            p.push(
                "recursion.num_recursions",
                n_r,
                format!("router `{}` needs num_recursions >= 2 (remove [router] for a vanilla or recursive model)", r.kind),
            );
        } else if !plan.is_cyclic() {
            p.push(
                "recursion.sharing",
                format!("\"{}\"", recursion.sharing.kind),
                "routing (MoR) needs a cyclic plan: `cycle` or `middle_cycle` (spec §2)",
            );
        }
    }
    plugin_checks(
        &recursion.sharing,
        "recursion.sharing",
        Family::SharingStrategy,
        &ctx,
        &mut p,
    );
    if let Some(r) = &router {
        plugin_checks(r, "router", Family::Router, &ctx, &mut p);
    }
    plugin_checks(&kv, "kv", Family::KvPolicy, &ctx, &mut p);
    if kv_share.is_some() {
        match accounting::hints(None, &kv, &ctx) {
            Ok(h) if h.kv_sharing => {}
            Ok(_) => p.push(
                "kv.kind",
                format!("\"{}\"", kv.kind),
                "a KV policy whose steps >= 2 reuse the step-1 K/V and project none: \
                 `recursive_sharing` (kv.share_pattern shares K/V between layers, spec §4); \
                 remove kv.share_pattern and kv.share_loops for a vanilla model without sharing",
            ),
            Err(msg) => p.push("kv.kind", format!("\"{}\"", kv.kind), msg),
        }
    }
    plugin_checks(&backend, "runtime.backend", Family::Backend, &ctx, &mut p);
    let Some(plan) = plan else {
        return Err(Error::Config(p.0));
    };
    p.into_result()?;

    let mut p = Problems(Vec::new());
    let init = raw
        .init
        .as_ref()
        .and_then(|i| init_config(i, &plan, seed, &mut p));
    let relax = recursion.relaxation.as_ref();
    let train = match finish_train(
        train,
        (&model, relax),
        &plan,
        router.as_ref(),
        &kv,
        &ctx,
        &mut p,
    ) {
        Some(t) if p.0.is_empty() => t,
        _ => return Err(Error::Config(p.0)),
    };
    Ok(ResolvedConfig {
        model,
        recursion,
        router,
        kv,
        backend,
        plan,
        seed,
        threads,
        train,
        data,
        infer,
        eval,
        init,
        source: table,
    })
}

/// `[init]` (uptraining, spec §2): both keys are needed, and `average` needs at least two
/// tied slots per shared block. The pretrained depth is checked against the plan when the
/// model is initialised (`init_sources`).
fn init_config(
    raw: &raw::RawInit,
    plan: &RecursionPlan,
    seed: u64,
    p: &mut Problems,
) -> Option<InitConfig> {
    let methods = InitMethod::ALL
        .map(|m| format!("\"{}\"", m.as_str()))
        .join(", ");
    let from = match raw.from.as_deref() {
        Some(f) if !f.trim().is_empty() => Some(PathBuf::from(f)),
        other => {
            p.push(
                "init.from",
                other.map_or("(missing)".to_string(), |f| format!("\"{f}\"")),
                "a Hugging Face Llama folder or a vanilla mor run folder",
            );
            None
        }
    };
    let Some(method) = raw.method else {
        p.push("init.method", "(missing)", format!("one of {methods}"));
        return None;
    };
    if method == InitMethod::Average {
        // With one pretrained layer per recursion slot only the tying itself can fail.
        let layers = plan.slots.len();
        if let Err(why) = init_sources(plan, layers, method, seed) {
            p.push("init.method", "\"average\"", why);
            return None;
        }
    }
    Some(InitConfig {
        from: from?,
        method,
    })
}

fn default_slot(path: &str, kind: &str) -> RawSlot {
    RawSlot {
        path: path.to_string(),
        kind: kind.to_string(),
        params: toml::Table::new(),
    }
}

/// Stage 2 for one slot: the registry lookup and the plugin's typed parameters. Serde's
/// message is reported at `<slot>.<field>` when one field is to blame.
fn plugin(family: Family, slot: &RawSlot, p: &mut Problems) -> Option<PluginSpec> {
    let info = match registry::find(family, &slot.kind) {
        Ok(info) => info,
        Err(e) => {
            p.push(
                &raw::join(&slot.path, "kind"),
                format!("\"{}\"", slot.kind),
                e.to_string(),
            );
            return None;
        }
    };
    match (info.validate)(&slot.params) {
        Ok(params) => Some(PluginSpec {
            kind: slot.kind.clone(),
            params,
        }),
        Err(full) => {
            let mut found = false;
            for (k, v) in &slot.params {
                let mut one = toml::Table::new();
                one.insert(k.clone(), v.clone());
                if let Err(msg) = (info.validate)(&one) {
                    if msg.starts_with("missing field") {
                        continue;
                    }
                    found = true;
                    p.push(
                        &raw::join(&slot.path, k),
                        render(v),
                        format!("{family} `{}`: {msg}", slot.kind),
                    );
                }
            }
            if !found {
                p.push(
                    &slot.path,
                    render(&toml::Value::Table(slot.params.clone())),
                    format!("{family} `{}`: {full}", slot.kind),
                );
            }
            None
        }
    }
}

/// Stage 3 for one slot: the plugin's own cross-field check.
fn plugin_checks(spec: &PluginSpec, path: &str, family: Family, ctx: &CheckCtx, p: &mut Problems) {
    let Ok(info) = registry::find(family, &spec.kind) else {
        return;
    };
    for q in (info.check)(&spec.params, ctx) {
        let field = if q.field.is_empty() {
            path.to_string()
        } else {
            raw::join(path, &q.field)
        };
        p.push(&field, q.value, q.allowed);
    }
}

fn build_plan(model: &ModelDims, rec: &RecursionConfig, p: &mut Problems) -> Option<RecursionPlan> {
    let req = PlanRequest {
        num_layers: model.num_layers,
        num_recursions: rec.num_recursions,
        depth_fix: rec.depth_fix,
    };
    let result = crate::sharing::build(&rec.sharing.kind, &rec.sharing.params)
        .map_err(|e| e.to_string())
        .and_then(|s| s.plan(&req))
        .and_then(|plan| plan.validate().map(|()| plan));
    match result {
        Ok(plan) => Some(plan),
        Err(msg) => {
            let middle_too_short = model.num_layers < 3 && rec.sharing.kind.starts_with("middle_");
            let (field, value) = if middle_too_short {
                ("model.num_layers", model.num_layers)
            } else {
                ("recursion.num_recursions", rec.num_recursions)
            };
            p.push(
                field,
                value,
                format!("sharing `{}`: {msg}", rec.sharing.kind),
            );
            None
        }
    }
}

/// The plan of a vanilla model with KV sharing ([`KvShare::vanilla_plan`]).
fn vanilla_kv_share_plan(
    model: &ModelDims,
    share: KvShare,
    p: &mut Problems,
) -> Option<RecursionPlan> {
    match share.vanilla_plan(model.num_layers) {
        Ok(plan) => Some(plan),
        Err(msg) => {
            let grouped = if share.pattern.is_middle() {
                format!("num_layers − 2 = {}", model.num_layers.saturating_sub(2))
            } else {
                format!("num_layers = {}", model.num_layers)
            };
            if share.pattern.is_middle() && model.num_layers < 3 {
                p.push("model.num_layers", model.num_layers, msg);
            } else {
                p.push(
                    "kv.share_loops",
                    share.loops,
                    format!(
                        "a divisor of {grouped}, at least 2 (the `{}` pattern groups the layers \
                         evenly and never adds any; the paper runs Seq2/Cyc2 on 32 layers and \
                         Seq3/Cyc3 on 30): {msg}",
                        share.pattern.strategy()
                    ),
                );
            }
            None
        }
    }
}

/// Reads and removes `share_pattern` and `share_loops` from the `[kv]` parameters (spec §9):
/// both set gives the vanilla KV sharing; neither (or `"auto"`) none.
fn kv_share_keys(params: &mut toml::Table, p: &mut Problems) -> Option<KvShare> {
    let pattern = params.remove("share_pattern");
    let loops = params.remove("share_loops");
    let pattern = match pattern {
        None => None,
        Some(toml::Value::String(s)) if s == "auto" => None,
        Some(toml::Value::String(s)) => match KvSharePattern::parse(&s) {
            Some(x) => Some(x),
            None => {
                p.push(
                    "kv.share_pattern",
                    format!("\"{s}\""),
                    format!("one of {}", KvSharePattern::ALLOWED),
                );
                return None;
            }
        },
        Some(other) => {
            p.push(
                "kv.share_pattern",
                render(&other),
                format!("one of {}", KvSharePattern::ALLOWED),
            );
            return None;
        }
    };
    const LOOPS: &str = "an integer in 2..=num_layers: how many layers share one K/V (the paper's \
                         Seq2/Cyc2 and Seq3/Cyc3 rows use 2 and 3), or \"auto\" (unset)";
    let loops = match loops {
        None => None,
        Some(toml::Value::String(s)) if s == "auto" => None,
        Some(toml::Value::Integer(n)) if (2..=MAX_LAYERS as i64).contains(&n) => Some(n as usize),
        Some(other) => {
            p.push("kv.share_loops", render(&other), LOOPS);
            return None;
        }
    };
    match (pattern, loops) {
        (Some(pattern), Some(loops)) => Some(KvShare { pattern, loops }),
        (Some(_), None) => {
            p.push(
                "kv.share_loops",
                "(missing)",
                format!("{LOOPS}; required with kv.share_pattern"),
            );
            None
        }
        (None, Some(loops)) => {
            p.push(
                "kv.share_loops",
                loops,
                format!(
                    "set only together with kv.share_pattern ({})",
                    KvSharePattern::ALLOWED
                ),
            );
            None
        }
        (None, None) => None,
    }
}

fn model_dims(raw: &RawConfig, p: &mut Problems) -> Option<ModelDims> {
    let m = &raw.model;
    let base = match &m.preset {
        Some(name) => match ModelDims::preset(name) {
            Some(d) => Some(d),
            None => {
                p.push(
                    "model.preset",
                    format!("\"{name}\""),
                    format!("one of {}", PRESETS.map(|s| format!("`{s}`")).join(", ")),
                );
                return None;
            }
        },
        None => None,
    };
    let required = [
        (
            "vocab_size",
            m.vocab_size,
            base.as_ref().map(|b| b.vocab_size),
        ),
        (
            "hidden_size",
            m.hidden_size,
            base.as_ref().map(|b| b.hidden_size),
        ),
        (
            "num_layers",
            m.num_layers,
            base.as_ref().map(|b| b.num_layers),
        ),
        ("num_heads", m.num_heads, base.as_ref().map(|b| b.num_heads)),
        (
            "num_kv_heads",
            m.num_kv_heads,
            base.as_ref().map(|b| b.num_kv_heads),
        ),
        ("head_dim", m.head_dim, base.as_ref().map(|b| b.head_dim)),
        (
            "intermediate_size",
            m.intermediate_size,
            base.as_ref().map(|b| b.intermediate_size),
        ),
        ("seq_len", m.seq_len, base.as_ref().map(|b| b.seq_len)),
    ];
    let mut v = [0usize; 8];
    let mut missing = Vec::new();
    for (i, (name, set, preset)) in required.iter().enumerate() {
        match set.or(*preset) {
            Some(x) => v[i] = x,
            None => missing.push(*name),
        }
    }
    if !missing.is_empty() {
        for name in missing {
            p.push(
                &format!("model.{name}"),
                "(missing)",
                format!(
                    "set `model.{name}`, or choose `model.preset` (one of {})",
                    PRESETS.join(", ")
                ),
            );
        }
        return None;
    }
    let dims = ModelDims {
        vocab_size: v[0],
        hidden_size: v[1],
        num_layers: v[2],
        num_heads: v[3],
        num_kv_heads: v[4],
        head_dim: v[5],
        intermediate_size: v[6],
        seq_len: v[7],
        rope_theta: m.rope_theta.unwrap_or(10_000.0),
        rms_eps: m.rms_eps.unwrap_or(1e-5),
        init_std: m.init_std.unwrap_or(0.02),
        tie_embeddings: m.tie_embeddings.unwrap_or(true),
    };
    let before = p.0.len();
    p.range("model.vocab_size", dims.vocab_size, 2, MAX_VOCAB);
    p.range("model.hidden_size", dims.hidden_size, 1, MAX_HIDDEN);
    p.range("model.num_layers", dims.num_layers, 1, MAX_LAYERS);
    p.range("model.num_heads", dims.num_heads, 1, MAX_HEADS);
    p.range("model.num_kv_heads", dims.num_kv_heads, 1, MAX_HEADS);
    p.range("model.head_dim", dims.head_dim, 2, MAX_HEADS);
    p.range(
        "model.intermediate_size",
        dims.intermediate_size,
        1,
        MAX_INTER,
    );
    p.range("model.seq_len", dims.seq_len, 1, MAX_SEQ);
    if !dims.head_dim.is_multiple_of(2) {
        p.push(
            "model.head_dim",
            dims.head_dim,
            "an even number (RoPE rotates pairs of dimensions)",
        );
    }
    if dims.num_kv_heads > 0 && !dims.num_heads.is_multiple_of(dims.num_kv_heads) {
        p.push(
            "model.num_kv_heads",
            dims.num_kv_heads,
            format!(
                "a divisor of num_heads = {} (grouped-query attention)",
                dims.num_heads
            ),
        );
    }
    p.float(
        "model.rope_theta",
        dims.rope_theta,
        |x| x > 0.0,
        "a positive number (spec: 10000)",
    );
    p.float(
        "model.rms_eps",
        dims.rms_eps,
        |x| x > 0.0,
        "a positive number (spec: 1e-5)",
    );
    p.float(
        "model.init_std",
        dims.init_std,
        |x| x > 0.0,
        "a positive number (spec: 0.02)",
    );
    (p.0.len() == before).then_some(dims)
}

/// Train fields that need no plan; the budget is converted in [`finish_train`].
fn train_fields(raw: &RawConfig, p: &mut Problems) -> Option<TrainConfig> {
    let t = &raw.train;
    let before = p.0.len();
    let budget = match &t.budget {
        None => Budget::Steps(1000),
        Some(v) => parse_budget(v, p).unwrap_or(Budget::Steps(1)),
    };
    let batch_seqs = t.batch_seqs.unwrap_or(8);
    let micro_batch_seqs = t.micro_batch_seqs.unwrap_or(batch_seqs);
    p.range("train.batch_seqs", batch_seqs, 1, 1 << 24);
    p.range("train.micro_batch_seqs", micro_batch_seqs, 1, 1 << 24);
    if micro_batch_seqs > 0 && !batch_seqs.is_multiple_of(micro_batch_seqs) {
        p.push(
            "train.micro_batch_seqs",
            micro_batch_seqs,
            format!("a divisor of batch_seqs = {batch_seqs} (gradient accumulation = batch_seqs / micro_batch_seqs)"),
        );
    }
    let lr = t.lr.unwrap_or(3e-3);
    p.float(
        "train.lr",
        lr,
        |x| x > 0.0,
        "a positive number (paper: 3e-3)",
    );
    let betas = t.betas.unwrap_or([0.9, 0.95]);
    if !betas
        .iter()
        .all(|b| b.is_finite() && (0.0..1.0).contains(b))
    {
        p.push(
            "train.betas",
            format!("{betas:?}"),
            "two numbers in [0, 1) (paper: [0.9, 0.95])",
        );
    }
    let eps = t.eps.unwrap_or(1e-8);
    p.float(
        "train.eps",
        eps,
        |x| x > 0.0,
        "a positive number (paper: 1e-8)",
    );
    let weight_decay = t.weight_decay.unwrap_or(0.1);
    p.float(
        "train.weight_decay",
        weight_decay,
        |x| x >= 0.0,
        "a number >= 0 (paper: 0.1)",
    );
    let grad_clip = t.grad_clip.unwrap_or(1.0);
    p.float(
        "train.grad_clip",
        grad_clip,
        |x| x >= 0.0,
        "a number >= 0 (0 = off; paper: 1.0)",
    );
    let warmup = match &t.warmup_steps {
        None => Warmup::Auto,
        Some(toml::Value::String(s)) if s == "auto" => Warmup::Auto,
        Some(toml::Value::Integer(n)) if *n >= 0 => Warmup::Steps(*n as u64),
        Some(other) => {
            p.push(
                "train.warmup_steps",
                render(other),
                "\"auto\" or an integer >= 0",
            );
            Warmup::Auto
        }
    };
    if let Some(f) = t.warmup_ref_flops {
        p.float(
            "train.warmup_ref_flops",
            f,
            |x| x > 0.0,
            "a positive FLOPs budget (paper: 2e18)",
        );
    }
    let decay_frac = t.decay_frac.unwrap_or(0.2);
    p.float(
        "train.decay_frac",
        decay_frac,
        |x| (0.0..=1.0).contains(&x),
        "a fraction in [0, 1] (paper: 0.2)",
    );
    let min_lr_ratio = t.min_lr_ratio.unwrap_or(0.1);
    p.float(
        "train.min_lr_ratio",
        min_lr_ratio,
        |x| (0.0..=1.0).contains(&x),
        "a fraction in [0, 1] (paper: 0.1)",
    );
    let precision = match t.precision.as_deref() {
        None | Some("f32") => Precision::F32,
        Some("bf16") => Precision::Bf16,
        Some(other) => {
            p.push(
                "train.precision",
                format!("\"{other}\""),
                "allowed: `f32`, `bf16` (bf16 products with f32 accumulation and f32 master weights)",
            );
            Precision::F32
        }
    };
    let update_path = match t.update_path.as_deref() {
        None | Some("auto") => UpdatePath::Auto,
        Some("host") => UpdatePath::Host,
        Some("device") => UpdatePath::Device,
        Some(other) => {
            p.push(
                "train.update_path",
                format!("\"{other}\""),
                "allowed: `auto` (the host update for f32 parameters on the CPU, the device \
                 update otherwise), `host` (the fused host update; f32 CPU parameters only), \
                 `device` (tensor ops on the parameters' device)",
            );
            UpdatePath::Auto
        }
    };
    let log_every = t.log_every.unwrap_or(10);
    if log_every == 0 {
        p.push("train.log_every", 0, "an integer >= 1");
    }
    let spike_zscore = t.spike_zscore.unwrap_or(6.0);
    p.float(
        "train.spike_zscore",
        spike_zscore,
        |x| x > 0.0,
        "a positive z-score (default 6.0)",
    );
    let spike_window = t.spike_window.unwrap_or(50);
    p.range("train.spike_window", spike_window, 2, 1 << 20);
    (p.0.len() == before).then_some(TrainConfig {
        budget,
        steps: 0,
        batch_seqs,
        micro_batch_seqs,
        lr,
        betas,
        eps,
        weight_decay,
        grad_clip,
        schedule: t.schedule.unwrap_or_default(),
        warmup,
        warmup_ref_flops: t.warmup_ref_flops,
        warmup_steps: 0,
        decay_frac,
        min_lr_ratio,
        precision,
        log_every,
        eval_every: t.eval_every.unwrap_or(0),
        checkpoint_every: t.checkpoint_every.unwrap_or(50),
        spike_zscore,
        spike_window,
        spike_action: t.spike_action.unwrap_or_default(),
        update_path,
    })
}

fn parse_budget(v: &toml::Value, p: &mut Problems) -> Option<Budget> {
    const ALLOWED: &str =
        "exactly one of `{ steps = <int> }`, `{ tokens = <number> }`, `{ flops = <number> }`";
    let toml::Value::Table(t) = v else {
        p.push("train.budget", render(v), ALLOWED);
        return None;
    };
    if t.len() != 1 {
        p.push("train.budget", render(v), ALLOWED);
        return None;
    }
    let (key, value) = t.iter().next()?;
    let number = match value {
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::Float(f) => Some(*f),
        _ => None,
    };
    let field = format!("train.budget.{key}");
    match (key.as_str(), value, number) {
        ("steps", toml::Value::Integer(n), _) if *n >= 1 => Some(Budget::Steps(*n as u64)),
        ("steps", _, _) => {
            p.push(&field, render(value), "an integer >= 1");
            None
        }
        ("tokens" | "flops", _, Some(x)) if x.is_finite() && x > 0.0 => Some(if key == "tokens" {
            Budget::Tokens(x)
        } else {
            Budget::Flops(x)
        }),
        ("tokens" | "flops", _, _) => {
            p.push(&field, render(value), "a positive number");
            None
        }
        _ => {
            p.push(
                &field,
                render(value),
                format!("unknown budget `{key}`; {ALLOWED}"),
            );
            None
        }
    }
}

/// Converts the budget into steps and resolves the warmup (spec §1.3, §1.4).
fn finish_train(
    mut train: TrainConfig,
    (model, relax): (&ModelDims, Option<&Relaxation>),
    plan: &RecursionPlan,
    router: Option<&PluginSpec>,
    kv: &PluginSpec,
    ctx: &CheckCtx,
    p: &mut Problems,
) -> Option<TrainConfig> {
    let hints = match accounting::hints(router, kv, ctx) {
        Ok(h) => h,
        Err(msg) => {
            p.push("router", "(accounting)", msg);
            return None;
        }
    };
    // The model's products plus the relaxation's low-rank terms (spec §1.4, §6).
    let fpt = match accounting::flops_per_token(model, plan, &hints)
        .and_then(|f| Ok(f + accounting::relaxation_flops_per_token(model, plan, &hints, relax)?))
    {
        Ok(f) => f,
        Err(msg) => {
            p.push(
                "router",
                "(accounting)",
                format!("{msg}; the router's capacities must have one entry per step in (0, 1]"),
            );
            return None;
        }
    };
    let tps = train.batch_seqs as u64 * model.seq_len as u64;
    train.steps = match accounting::budget_steps(train.budget, fpt, tps) {
        Ok(s) => s,
        Err(msg) => {
            p.push("train.budget", format!("{:?}", train.budget), msg);
            return None;
        }
    };
    train.warmup_steps = match train.warmup {
        Warmup::Auto => {
            accounting::auto_warmup(train.steps, train.warmup_ref_flops, fpt, tps).min(train.steps)
        }
        Warmup::Steps(n) => n,
    };
    if train.warmup_steps > train.steps {
        p.push(
            "train.warmup_steps",
            train.warmup_steps,
            format!("at most the {} steps of the budget", train.steps),
        );
        return None;
    }
    Some(train)
}

fn data_config(raw: &RawConfig, p: &mut Problems) -> Option<DataConfig> {
    let d = &raw.data;
    let before = p.0.len();
    let source = match d.source.as_deref() {
        None | Some("builtin") => DataSource::Builtin,
        Some("") => {
            p.push(
                "data.source",
                "\"\"",
                "\"builtin\" or a path to a file or folder",
            );
            DataSource::Builtin
        }
        Some(path) => DataSource::Path(path.into()),
    };
    let tokenizer = match d.tokenizer.as_deref() {
        None | Some("auto") => TokenizerSpec::Auto,
        Some("byte") => TokenizerSpec::Byte,
        Some("bpe") => TokenizerSpec::Bpe,
        Some(path) if path.ends_with(".json") || path.contains('/') || path.contains('\\') => {
            TokenizerSpec::Path(path.into())
        }
        Some(other) => {
            p.push(
                "data.tokenizer",
                format!("\"{other}\""),
                "one of `auto`, `byte`, `bpe`, or a path to a tokenizer.json (ending in .json or containing /)",
            );
            TokenizerSpec::Auto
        }
    };
    let text_column = d.text_column.clone().unwrap_or_else(|| "text".to_string());
    if text_column.is_empty() {
        p.push(
            "data.text_column",
            "\"\"",
            "a column name (default \"text\")",
        );
    }
    let val_fraction = d.val_fraction.unwrap_or(0.05);
    p.float(
        "data.val_fraction",
        val_fraction,
        |x| (0.0..1.0).contains(&x),
        "a fraction in [0, 1)",
    );
    let builtin_docs = d.builtin_docs.unwrap_or(2000);
    p.range("data.builtin_docs", builtin_docs, 1, 1 << 26);
    (p.0.len() == before).then_some(DataConfig {
        source,
        tokenizer,
        text_column,
        doc_masking: d.doc_masking.unwrap_or(false),
        shuffle: d.shuffle.unwrap_or(true),
        val_fraction,
        builtin_docs,
    })
}

/// `n_r`: the plan's recursion steps; `all_steps`: every token must run all of them (a
/// vanilla model with KV sharing, whose "steps" are its own layers).
fn infer_config(
    raw: &RawConfig,
    n_r: usize,
    all_steps: bool,
    p: &mut Problems,
) -> Option<InferConfig> {
    let i = &raw.infer;
    let before = p.0.len();
    let batch_size = i.batch_size.unwrap_or(32);
    p.range("infer.batch_size", batch_size, 1, 1 << 20);
    let num_requests = i.num_requests.unwrap_or(64);
    p.range("infer.num_requests", num_requests, 1, 1 << 24);
    let gen_len_mean = i.gen_len_mean.unwrap_or(64);
    p.range("infer.gen_len_mean", gen_len_mean, 1, 1 << 24);
    let gen_len_std = i.gen_len_std.unwrap_or(16.0);
    p.float(
        "infer.gen_len_std",
        gen_len_std,
        |x| x >= 0.0,
        "a number >= 0",
    );
    let max_depth = match &i.max_depth {
        None => n_r,
        Some(toml::Value::String(s)) if s == "n_r" || s == "N_r" => n_r,
        Some(toml::Value::Integer(d)) if all_steps && *d as u64 == n_r as u64 => n_r,
        Some(toml::Value::Integer(d)) if !all_steps && *d >= 1 && (*d as u64) <= n_r as u64 => {
            *d as usize
        }
        Some(other) if all_steps => {
            p.push(
                "infer.max_depth",
                render(other),
                format!(
                    "\"n_r\" or {n_r}: a vanilla model with KV sharing runs all of its layers \
                     (kv.share_loops = {n_r} labelled steps); a smaller depth would skip layers"
                ),
            );
            n_r
        }
        Some(other) => {
            p.push(
                "infer.max_depth",
                render(other),
                format!("\"n_r\" or an integer in 1..={n_r} (num_recursions)"),
            );
            n_r
        }
    };
    let threshold = i.threshold.unwrap_or(0.5);
    p.float(
        "infer.threshold",
        threshold,
        |x| (0.0..=1.0).contains(&x),
        "a probability in [0, 1] (default 0.5)",
    );
    let temperature = i.temperature.unwrap_or(0.0);
    p.float(
        "infer.temperature",
        temperature,
        |x| x >= 0.0,
        "a number >= 0 (0 = greedy)",
    );
    let top_p = i.top_p.unwrap_or(1.0);
    p.float(
        "infer.top_p",
        top_p,
        |x| x > 0.0 && x <= 1.0,
        "a probability in (0, 1] (1 = off)",
    );
    (p.0.len() == before).then_some(InferConfig {
        batch_size,
        batching: i.batching.unwrap_or_default(),
        num_requests,
        gen_len_mean,
        gen_len_std,
        continuous_depthwise: i.continuous_depthwise.unwrap_or(true),
        max_depth,
        threshold,
        temperature,
        top_k: i.top_k.unwrap_or(0),
        top_p,
    })
}

fn eval_config(raw: &RawConfig, p: &mut Problems) -> Option<EvalConfig> {
    let e = &raw.eval;
    let before = p.0.len();
    let max_batches = e.max_batches;
    if let Some(b) = max_batches {
        p.range("eval.max_batches", b, 1, 1 << 24);
    }
    let max_tokens = e.max_tokens.unwrap_or(1 << 20);
    p.range("eval.max_tokens", max_tokens, 1, 1 << 34);
    let tasks: Vec<std::path::PathBuf> = e
        .tasks
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(Into::into)
        .collect();
    if tasks.iter().any(|t| t.as_os_str().is_empty()) {
        p.push("eval.tasks", "\"\"", "paths to lm-eval-style JSONL files");
    }
    let router_metrics = e.router_metrics.clone().unwrap_or_else(|| {
        use super::RouterMetric::*;
        vec![DeadTokenRatio, SamplingAcc, MaxVio, Entropy]
    });
    (p.0.len() == before).then_some(EvalConfig {
        tasks,
        max_batches,
        max_tokens,
        causal: e.causal.unwrap_or(true),
        full_sequence: e.full_sequence.unwrap_or(true),
        router_metrics,
    })
}

impl Config {
    /// Stage 1 only: reads the sections of `table` without resolving plugins, e.g. for
    /// tools that inspect a config.
    ///
    /// # Errors
    /// [`Error::Config`] listing every problem of the file's shape.
    pub fn parse_raw(table: &toml::Table) -> Result<RawConfig> {
        let (raw, problems) = raw::parse_sections(table);
        Problems(problems).into_result().map(|()| raw)
    }
}
