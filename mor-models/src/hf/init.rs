//! Uptraining initialisation (spec §2): fill a recursive or MoR model's unique blocks from
//! a pretrained vanilla model, a Hugging Face Llama folder or a mor run folder, with the
//! `[init]` method's mapping ([`init_sources`]). The embedding, the final norm and the LM
//! head are copied; routers keep their fresh initialisation.

use super::config::HfConfig;
use super::export::hf_tensors;
use super::import::read_hf;
use crate::{Error, MorModel, Result};
use candle_core::{DType, Tensor};
use mor_core::config::{init_sources, Config, InitConfig, InitMethod, ModelDims, ResolvedConfig};
use std::collections::BTreeMap;
use std::path::Path;

/// A pretrained vanilla model, its weights under Llama names (f32, host).
#[derive(Debug)]
pub struct Pretrained {
    /// Its dimensions.
    pub dims: ModelDims,
    /// Its layer count.
    pub num_layers: usize,
    /// Llama-named weights (`model.layers.{i}.…`, `model.embed_tokens.weight`, …).
    pub tensors: BTreeMap<String, Tensor>,
}

fn bad(from: &Path, reason: impl Into<String>) -> Error {
    Error::msg(format!(
        "init.from = \"{}\": {}",
        from.display(),
        reason.into()
    ))
}

/// Whether `dir` is a mor run folder (`config.toml`, or a `config.json` without a Hugging
/// Face `model_type`).
fn is_mor_run(dir: &Path) -> bool {
    if dir.join("config.toml").is_file() {
        return true;
    }
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("model_type").is_none() && v.get("plan").is_some())
}

fn run_config(dir: &Path) -> Result<ResolvedConfig> {
    let toml = dir.join("config.toml");
    if toml.is_file() {
        return Ok(Config::from_path(&toml)?);
    }
    let json = dir.join("config.json");
    let text = std::fs::read_to_string(&json).map_err(|e| Error::io(&json, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: json,
        reason: format!("not a resolved mor config: {e}"),
    })
}

/// The layer count of the pretrained model at `from` (reads its config only).
///
/// # Errors
/// When `from` is neither a Hugging Face Llama folder nor a vanilla mor run folder.
pub fn pretrained_layers(from: &Path) -> Result<usize> {
    if is_mor_run(from) {
        let cfg = run_config(from)?;
        vanilla_check(from, &cfg)?;
        Ok(cfg.plan.num_blocks)
    } else if from.join("config.json").is_file() {
        Ok(HfConfig::from_file(&from.join("config.json"))?.num_layers)
    } else {
        Err(bad(
            from,
            "not a Hugging Face folder (config.json) nor a mor run folder (config.toml)",
        ))
    }
}

fn vanilla_check(from: &Path, cfg: &ResolvedConfig) -> Result<()> {
    let vanilla = cfg.recursion.sharing.kind == "none"
        && cfg.recursion.num_recursions == 1
        && cfg.router.is_none()
        && cfg.recursion.kv_share.is_none();
    if vanilla {
        Ok(())
    } else {
        Err(bad(
            from,
            format!(
                "the pretrained run is not a vanilla model (sharing `{}`, N_r = {}); uptraining starts from a vanilla model",
                cfg.recursion.sharing.kind, cfg.recursion.num_recursions
            ),
        ))
    }
}

/// Reads the pretrained model at `from`: a Hugging Face Llama folder (every check of
/// [`read_hf`]) or a vanilla mor run folder (its `model.safetensors`).
///
/// # Errors
/// When `from` is neither, is not vanilla, or its weights do not load.
pub fn read_pretrained(from: &Path) -> Result<Pretrained> {
    if is_mor_run(from) {
        let cfg = run_config(from)?;
        vanilla_check(from, &cfg)?;
        let model = MorModel::new(&cfg)?;
        crate::checkpoint::load_model(from, &model.named_vars())?;
        let tensors = hf_tensors(&model)?.into_iter().collect();
        Ok(Pretrained {
            dims: cfg.model.clone(),
            num_layers: cfg.plan.num_blocks,
            tensors,
        })
    } else {
        let _ = pretrained_layers(from)?;
        let imp = read_hf(from)?;
        Ok(Pretrained {
            dims: imp.config.model.clone(),
            num_layers: imp.config.plan.num_blocks,
            tensors: imp.tensors,
        })
    }
}

/// What [`apply_init`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct InitReport {
    /// The method.
    pub method: InitMethod,
    /// Pretrained layer count.
    pub pretrained_layers: usize,
    /// Per unique block, the pretrained layers it was filled from (mean of several for
    /// `average`).
    pub sources: Vec<Vec<usize>>,
}

/// The mapping of `init` onto `cfg`'s plan for a pretrained model of `layers` layers, with
/// the error naming `init.method`.
///
/// # Errors
/// When the method cannot map that depth onto the plan.
pub fn init_mapping(
    cfg: &ResolvedConfig,
    init: &InitConfig,
    layers: usize,
) -> Result<Vec<Vec<usize>>> {
    init_sources(&cfg.plan, layers, init.method, cfg.seed).map_err(|why| {
        Error::msg(format!(
            "init.method = \"{}\" does not fit the plan (init.from = \"{}\"): {why}",
            init.method.as_str(),
            init.from.display()
        ))
    })
}

/// Fills `model` from the pretrained model of its config's `[init]` (nothing when there is
/// none): block `b` ← the mean of `sources[b]`'s layers (one layer except for `average`),
/// per-slot norms (`ln_share = false`) ← their block's source norms, embedding, final norm
/// and LM head copied (an untied head from a tied model gets the embedding). Routers are
/// left as they are. Every check runs before any weight changes.
///
/// # Errors
/// When the pretrained model cannot be read, a dimension differs (the message names the
/// `model.*` field), or the method does not fit the plan.
pub fn apply_init(model: &MorModel) -> Result<Option<InitReport>> {
    let cfg = model.config();
    let Some(init) = &cfg.init else {
        return Ok(None);
    };
    let pre = read_pretrained(&init.from)?;
    let (a, b) = (&cfg.model, &pre.dims);
    let fields = [
        ("vocab_size", a.vocab_size, b.vocab_size),
        ("hidden_size", a.hidden_size, b.hidden_size),
        ("num_heads", a.num_heads, b.num_heads),
        ("num_kv_heads", a.num_kv_heads, b.num_kv_heads),
        ("head_dim", a.head_dim, b.head_dim),
        (
            "intermediate_size",
            a.intermediate_size,
            b.intermediate_size,
        ),
    ];
    let diffs: Vec<String> = fields
        .iter()
        .filter(|(_, x, y)| x != y)
        .map(|(n, x, y)| format!("model.{n} = {x}, the pretrained model has {y}"))
        .collect();
    if !diffs.is_empty() {
        return Err(bad(
            &init.from,
            format!("shapes do not fit: {}", diffs.join("; ")),
        ));
    }
    let sources = init_mapping(cfg, init, pre.num_layers)?;
    let get = |name: &str| -> Result<&Tensor> {
        pre.tensors
            .get(name)
            .ok_or_else(|| bad(&init.from, format!("tensor `{name}` is missing")))
    };
    let mean_of = |layers: &[usize], tail: &str| -> Result<Tensor> {
        let first = get(&format!("model.layers.{}.{tail}", layers[0]))?;
        if layers.len() == 1 {
            return Ok(first.clone());
        }
        let mut acc = first.to_dtype(DType::F64)?;
        for l in &layers[1..] {
            acc = (acc + get(&format!("model.layers.{l}.{tail}"))?.to_dtype(DType::F64)?)?;
        }
        Ok((acc / layers.len() as f64)?.to_dtype(DType::F32)?)
    };
    let mut updates = Vec::new();
    for (name, var) in model.named_vars().into_iter().chain(model.aux_named_vars()) {
        let src = if let Some(rest) = name.strip_prefix("model.layers.") {
            let (blk, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let blk: usize = blk
                .parse()
                .map_err(|_| Error::msg(format!("unexpected parameter `{name}`")))?;
            Some(mean_of(&sources[blk], tail)?)
        } else if let Some(rest) = name.strip_prefix("model.slots.") {
            let (slot, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let slot: usize = slot
                .parse()
                .map_err(|_| Error::msg(format!("unexpected parameter `{name}`")))?;
            let blk = cfg.plan.slots[slot].block;
            Some(mean_of(&sources[blk], tail)?)
        } else {
            match name.as_str() {
                "model.embed_tokens.weight" | "model.norm.weight" => Some(get(&name)?.clone()),
                "lm_head.weight" => Some(match pre.tensors.get("lm_head.weight") {
                    Some(h) => h.clone(),
                    None => get("model.embed_tokens.weight")?.clone(),
                }),
                // Routers start fresh.
                _ => None,
            }
        };
        if let Some(t) = src {
            if t.dims() != var.as_tensor().dims() {
                return Err(bad(
                    &init.from,
                    format!(
                        "`{name}` has shape {:?} there, the model needs {:?}",
                        t.dims(),
                        var.as_tensor().dims()
                    ),
                ));
            }
            updates.push((var, t));
        }
    }
    for (var, t) in updates {
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    // DoRA magnitudes start at the row norms of the shared weights (spec §6.4): derive them
    // again from the pretrained weights just set, so the model starts equal to its init.
    model.reset_dora_magnitudes()?;
    Ok(Some(InitReport {
        method: init.method,
        pretrained_layers: pre.num_layers,
        sources,
    }))
}
