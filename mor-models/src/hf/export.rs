//! Writing a vanilla mor model as a Hugging Face Llama folder.

use super::config::HfConfig;
use super::import::write_dir_atomically;
use crate::tokenizer::{Tokenizer, TOKENIZER_FILE};
use crate::{Error, MorModel, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::fs;
use std::path::Path;

/// Why `model` cannot be written as a plain Llama, or `None` when it can: it must be a
/// vanilla model (sharing `none`, `N_r = 1`, no router, no KV sharing).
pub fn hf_refusal(model: &MorModel) -> Option<String> {
    let cfg = model.config();
    let recursive = cfg.recursion.sharing.kind != "none"
        || cfg.recursion.num_recursions != 1
        || cfg.router.is_some();
    if recursive {
        return Some(format!(
            "a {} model (sharing `{}`, N_r = {}{}) has no Hugging Face Llama equivalent: the `hf` format holds vanilla models only; use `--format official` for recursive and MoR models",
            if cfg.router.is_some() { "MoR" } else { "recursive" },
            cfg.recursion.sharing.kind,
            cfg.recursion.num_recursions,
            if cfg.router.is_some() { ", with a router" } else { "" },
        ));
    }
    if cfg.recursion.kv_share.is_some() {
        return Some(
            "a vanilla model with KV sharing (`kv.share_pattern`) reads other layers' keys and values, which a Llama cannot express; the `hf` format holds vanilla models without KV sharing only".into(),
        );
    }
    None
}

/// The model's weights under Llama names, in f32 (per-slot norms of a vanilla model with
/// `ln_share = false` become the norms of the slot's layer).
pub fn hf_tensors(model: &MorModel) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (name, var) in model.named_vars() {
        let t = var.as_tensor().to_dtype(DType::F32)?;
        let name = match name.strip_prefix("model.slots.") {
            Some(rest) => {
                let (slot, tail) = rest
                    .split_once('.')
                    .ok_or_else(|| Error::msg(format!("unexpected parameter `{name}`")))?;
                let slot: usize = slot
                    .parse()
                    .map_err(|_| Error::msg(format!("unexpected parameter `{name}`")))?;
                let block = model.plan().slots[slot].block;
                format!("model.layers.{block}.{tail}")
            }
            None => name,
        };
        out.push((name, t));
    }
    Ok(out)
}

/// Writes `model` (vanilla) and `tokenizer` as a Hugging Face Llama folder at `out`:
/// `config.json`, `model.safetensors` (f32), `tokenizer.json` and
/// `generation_config.json`, into a temporary folder renamed to `out` at the end.
///
/// # Errors
/// When the model is not vanilla (see [`hf_refusal`]), `out` exists and is not an empty
/// folder, or a file cannot be written.
pub fn export_hf(model: &MorModel, tokenizer: &Tokenizer, out: &Path) -> Result<()> {
    if let Some(why) = hf_refusal(model) {
        return Err(Error::msg(why));
    }
    let cfg = model.config();
    if tokenizer.vocab_size() > cfg.model.vocab_size {
        return Err(Error::msg(format!(
            "the run's tokenizer has {} tokens, more than the model's vocab_size {}",
            tokenizer.vocab_size(),
            cfg.model.vocab_size
        )));
    }
    let eos = u64::from(tokenizer.eos_id());
    let hf = HfConfig::from_mor(cfg, None, Some(eos));
    let tensors: HashMap<String, Tensor> = hf_tensors(model)?.into_iter().collect();
    write_dir_atomically(out, |tmp| {
        let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
            let p = tmp.join(name);
            let text = serde_json::to_string_pretty(v).unwrap_or_default();
            fs::write(&p, text).map_err(|e| Error::io(&p, e))
        };
        write_json("config.json", &hf.to_json())?;
        write_json(
            "generation_config.json",
            &serde_json::json!({ "eos_token_id": eos, "do_sample": false }),
        )?;
        candle_core::safetensors::save(&tensors, tmp.join(super::import::WEIGHTS_FILE))?;
        let tok = tmp.join(TOKENIZER_FILE);
        fs::write(&tok, tokenizer.to_json()?).map_err(|e| Error::io(&tok, e))
    })
}
