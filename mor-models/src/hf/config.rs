//! The Hugging Face `config.json` of a Llama-family model and its mor equivalent.

use crate::{Error, Result};
use mor_core::config::{Config, ResolvedConfig};
use serde_json::Value;
use std::path::Path;

/// The `model_type`s mor reads: Llama (SmolLM is a Llama) and Mistral without a sliding
/// window (the same decoder).
pub const MODEL_TYPES: [&str; 2] = ["llama", "mistral"];

/// The fields of a Llama-family `config.json` that define the decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    /// `model_type` (one of [`MODEL_TYPES`]).
    pub model_type: String,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `num_attention_heads`.
    pub num_heads: usize,
    /// `num_key_value_heads` (defaults to `num_attention_heads`).
    pub num_kv_heads: usize,
    /// `head_dim` (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `rms_norm_eps`.
    pub rms_eps: f64,
    /// `rope_theta` (or `rope_parameters.rope_theta`; default 10000).
    pub rope_theta: f64,
    /// `tie_word_embeddings` (default true for `llama`, false for `mistral`).
    pub tie_embeddings: bool,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// `initializer_range` (default 0.02).
    pub init_std: f64,
    /// `bos_token_id`, when a single integer.
    pub bos_token_id: Option<u64>,
    /// `eos_token_id`, when a single integer (the first of a list otherwise).
    pub eos_token_id: Option<u64>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.into(),
        reason: reason.into(),
    }
}

fn usize_field(v: &Value, path: &Path, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) if n > 0 => Ok(Some(n as usize)),
            _ => Err(bad(
                path,
                format!("`{key}` is {x}; a positive integer is needed"),
            )),
        },
    }
}

fn req_usize(v: &Value, path: &Path, key: &str) -> Result<usize> {
    usize_field(v, path, key)?.ok_or_else(|| bad(path, format!("`{key}` is missing")))
}

fn f64_field(v: &Value, path: &Path, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_f64() {
            Some(f) if f.is_finite() && f > 0.0 => Ok(Some(f)),
            _ => Err(bad(
                path,
                format!("`{key}` is {x}; a positive number is needed"),
            )),
        },
    }
}

fn bool_field(v: &Value, path: &Path, key: &str) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(x) => Err(bad(
            path,
            format!("`{key}` is {x}; true or false is needed"),
        )),
    }
}

fn token_id(v: &Value, key: &str) -> Option<u64> {
    match v.get(key)? {
        Value::Number(n) => n.as_u64(),
        Value::Array(a) => a.first().and_then(Value::as_u64),
        _ => None,
    }
}

/// Refuses RoPE scaling: `rope_scaling` (older files) or `rope_parameters` (transformers 5)
/// must be absent, null, or of `rope_type` `"default"`.
fn rope_theta(v: &Value, path: &Path) -> Result<f64> {
    for key in ["rope_scaling", "rope_parameters"] {
        match v.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) => {
                let ty = o
                    .get("rope_type")
                    .or_else(|| o.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if ty != "default" {
                    return Err(bad(
                        path,
                        format!(
                            "`{key}.rope_type` is \"{ty}\": RoPE scaling is not supported (only \"default\", or no `{key}`)"
                        ),
                    ));
                }
            }
            Some(x) => {
                return Err(bad(
                    path,
                    format!("`{key}` is {x}; an object or null is needed"),
                ))
            }
        }
    }
    let nested = v
        .get("rope_parameters")
        .filter(|p| p.is_object())
        .map(|p| f64_field(p, path, "rope_theta"))
        .transpose()?
        .flatten();
    Ok(f64_field(v, path, "rope_theta")?
        .or(nested)
        .unwrap_or(10_000.0))
}

impl HfConfig {
    /// Reads and checks `config.json` (a file, or the file inside a folder).
    ///
    /// # Errors
    /// When the file is missing or not JSON, `model_type` is not one of [`MODEL_TYPES`], a
    /// Mistral has a sliding window, a needed field is missing or invalid, the activation
    /// is not SiLU, the projections have biases, or RoPE is scaled.
    pub fn from_file(path: &Path) -> Result<Self> {
        let path = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(&path, format!("not valid JSON: {e}")))?;
        Self::from_json(&v, &path)
    }

    /// As [`HfConfig::from_file`] on parsed JSON; `path` names the file in errors.
    ///
    /// # Errors
    /// As [`HfConfig::from_file`].
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(path, "`model_type` is missing"))?
            .to_string();
        if !MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(bad(
                path,
                format!(
                    "`model_type` is \"{model_type}\"; supported: {} (Llama-family decoders)",
                    MODEL_TYPES.map(|s| format!("\"{s}\"")).join(", ")
                ),
            ));
        }
        if model_type == "mistral" && v.get("sliding_window").is_some_and(|s| !s.is_null()) {
            return Err(bad(
                path,
                format!(
                    "`sliding_window` is {}: sliding-window attention is not supported (it must be null)",
                    v["sliding_window"]
                ),
            ));
        }
        for key in ["hidden_act", "hidden_activation"] {
            if let Some(act) = v.get(key).and_then(Value::as_str) {
                if act != "silu" {
                    return Err(bad(
                        path,
                        format!("`{key}` is \"{act}\"; only \"silu\" (SwiGLU) is supported"),
                    ));
                }
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if bool_field(v, path, key)? == Some(true) {
                return Err(bad(
                    path,
                    format!("`{key}` is true; projections with biases are not supported"),
                ));
            }
        }
        let hidden_size = req_usize(v, path, "hidden_size")?;
        let num_heads = req_usize(v, path, "num_attention_heads")?;
        let num_kv_heads = usize_field(v, path, "num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match usize_field(v, path, "head_dim")? {
            Some(h) => h,
            None => {
                if !hidden_size.is_multiple_of(num_heads) {
                    return Err(bad(
                        path,
                        format!(
                            "`head_dim` is missing and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
                        ),
                    ));
                }
                hidden_size / num_heads
            }
        };
        Ok(HfConfig {
            vocab_size: req_usize(v, path, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(v, path, "intermediate_size")?,
            num_heads,
            num_kv_heads,
            head_dim,
            num_layers: req_usize(v, path, "num_hidden_layers")?,
            rms_eps: f64_field(v, path, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: rope_theta(v, path)?,
            tie_embeddings: bool_field(v, path, "tie_word_embeddings")?
                .unwrap_or(model_type == "llama"),
            max_position_embeddings: usize_field(v, path, "max_position_embeddings")?
                .unwrap_or(2048),
            init_std: f64_field(v, path, "initializer_range")?.unwrap_or(0.02),
            bos_token_id: token_id(v, "bos_token_id"),
            eos_token_id: token_id(v, "eos_token_id"),
            model_type,
        })
    }

    /// The `[model]` section of the equivalent vanilla mor config.
    pub fn model_toml(&self) -> String {
        format!(
            "[model]\nvocab_size = {}\nhidden_size = {}\nnum_layers = {}\nnum_heads = {}\nnum_kv_heads = {}\nhead_dim = {}\nintermediate_size = {}\nseq_len = {}\nrope_theta = {:?}\nrms_eps = {:?}\ninit_std = {:?}\ntie_embeddings = {}\n",
            self.vocab_size,
            self.hidden_size,
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
            self.max_position_embeddings,
            self.rope_theta,
            self.rms_eps,
            self.init_std,
            self.tie_embeddings,
        )
    }

    /// The vanilla mor config of this model (one layer per block, no recursion, no router;
    /// training context = `max_position_embeddings`); everything else at its defaults.
    ///
    /// # Errors
    /// When the dimensions are outside what a mor config allows (the message names the
    /// field).
    pub fn to_mor_config(&self) -> Result<ResolvedConfig> {
        let text = format!(
            "{}\n[recursion]\nnum_recursions = 1\nsharing = {{ kind = \"none\" }}\n",
            self.model_toml()
        );
        Ok(Config::from_toml_str(&text)?)
    }

    /// The Llama `config.json` of a vanilla mor model (written by the `hf` export).
    pub fn from_mor(cfg: &ResolvedConfig, bos: Option<u64>, eos: Option<u64>) -> Self {
        let m = &cfg.model;
        HfConfig {
            model_type: "llama".into(),
            vocab_size: m.vocab_size,
            hidden_size: m.hidden_size,
            intermediate_size: m.intermediate_size,
            num_heads: m.num_heads,
            num_kv_heads: m.num_kv_heads,
            head_dim: m.head_dim,
            num_layers: cfg.plan.num_blocks,
            rms_eps: m.rms_eps,
            rope_theta: m.rope_theta,
            tie_embeddings: m.tie_embeddings,
            max_position_embeddings: m.seq_len,
            init_std: m.init_std,
            bos_token_id: bos,
            eos_token_id: eos,
        }
    }

    /// This config as `LlamaForCausalLM`'s `config.json`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.init_std,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        })
    }
}
