//! Writing a mor model in the official code's checkpoint layout.

use super::names::{official_keys, Source};
use super::settings::{official_settings, to_yaml, SETTINGS_JSON, SETTINGS_YAML};
use crate::hf::{write_dir_atomically, HfConfig, WEIGHTS_FILE};
use crate::tokenizer::{Tokenizer, TOKENIZER_FILE};
use crate::{Error, MorModel, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::fs;
use std::path::Path;

/// The model's weights under every official key (aliases included, each its own copy), in
/// `state_dict` order, in f32; the token-choice loss-free bias from the router's state.
///
/// # Errors
/// When the official code cannot express the model (see
/// [`official_shape`](super::names::official_shape)) or a parameter the mapping names is
/// absent from the model.
pub fn official_tensors(model: &MorModel) -> Result<Vec<(String, Tensor)>> {
    let cfg = model.config();
    let vars: HashMap<String, candle_core::Var> = model
        .named_vars()
        .into_iter()
        .chain(model.aux_named_vars())
        .collect();
    let mut out = Vec::new();
    for k in official_keys(cfg)? {
        let t = match &k.source {
            Source::Param { name, transpose } => {
                let v = vars.get(name).ok_or_else(|| {
                    Error::msg(format!(
                        "official key `{}` reads the parameter `{name}`, which the model does not have",
                        k.key
                    ))
                })?;
                let t = v.as_tensor().to_dtype(DType::F32)?;
                if *transpose {
                    t.t()?.contiguous()?
                } else {
                    t.copy()?
                }
            }
            Source::RouterBias => {
                let bias = model.router().and_then(|r| {
                    r.buffers()
                        .into_iter()
                        .find(|(n, _)| n == mor_router::token_choice::BIAS_BUFFER)
                });
                match bias {
                    Some((_, t)) => t.to_dtype(DType::F32)?,
                    None => {
                        Tensor::zeros(k.shape.as_slice(), DType::F32, &candle_core::Device::Cpu)?
                    }
                }
            }
        };
        let t = t.to_device(&candle_core::Device::Cpu)?;
        if t.dims() != k.shape.as_slice() {
            return Err(Error::msg(format!(
                "official key `{}` needs shape {:?}; the model's tensor has {:?}",
                k.key,
                k.shape,
                t.dims()
            )));
        }
        out.push((k.key, t));
    }
    Ok(out)
}

/// Writes `model` and `tokenizer` in the official layout at `out`: `model.safetensors`
/// (every official key, f32), `mor_config.json` and `mor_config.yaml` (the official
/// settings, see [`official_settings`]), `config.json` (the Llama config of the unrolled
/// model: `num_hidden_layers` = every position) and `tokenizer.json`. Everything is written
/// into a temporary sibling folder renamed to `out` at the end.
///
/// # Errors
/// When the official code cannot express the model, the tokenizer is larger than the
/// vocabulary, `out` exists and is not an empty folder, or a file cannot be written.
pub fn export_official(model: &MorModel, tokenizer: &Tokenizer, out: &Path) -> Result<()> {
    let cfg = model.config();
    if tokenizer.vocab_size() > cfg.model.vocab_size {
        return Err(Error::msg(format!(
            "the run's tokenizer has {} tokens, more than the model's vocab_size {}",
            tokenizer.vocab_size(),
            cfg.model.vocab_size
        )));
    }
    let name = out
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("mor")
        .to_string();
    let settings = official_settings(cfg, &name)?;
    let tensors: HashMap<String, Tensor> = official_tensors(model)?.into_iter().collect();
    let mut hf = HfConfig::from_mor(cfg, None, Some(u64::from(tokenizer.eos_id())));
    hf.num_layers = cfg.plan.num_slots();
    let mut hf_json = hf.to_json();
    if cfg.router.is_some() {
        hf_json["architectures"] = serde_json::json!(["MoRLlamaForCausalLM"]);
    }
    write_dir_atomically(out, |tmp| {
        let write = |file: &str, text: String| -> Result<()> {
            let p = tmp.join(file);
            fs::write(&p, text).map_err(|e| Error::io(&p, e))
        };
        write(
            "config.json",
            serde_json::to_string_pretty(&hf_json).unwrap_or_default(),
        )?;
        write(
            SETTINGS_JSON,
            serde_json::to_string_pretty(&settings).unwrap_or_default(),
        )?;
        write(
            SETTINGS_YAML,
            format!(
                "# Model settings of the official code (a fragment of conf/pretrain/{name}.yaml).\n{}",
                to_yaml(&settings)
            ),
        )?;
        candle_core::safetensors::save(&tensors, tmp.join(WEIGHTS_FILE))?;
        write(TOKENIZER_FILE, tokenizer.to_json()?)
    })
}
