//! Reading a checkpoint in the official code's layout into a mor model.

use super::names::{official_keys, Source};
use super::settings::{config_from_settings, parse_yaml, SETTINGS_JSON, SETTINGS_YAML};
use crate::hf::{HfConfig, WEIGHTS_FILE};
use crate::{Error, MorModel, Result};
use candle_core::{DType, Device, Tensor};
use mor_core::config::ResolvedConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The PyTorch weights file the official training writes (`torch.save` of the
/// `state_dict`).
pub const TORCH_WEIGHTS_FILE: &str = "pytorch_model.bin";

/// A checkpoint in the official layout, checked against a mor config.
#[derive(Debug)]
pub struct OfficialImport {
    /// The weights file read.
    pub path: PathBuf,
    /// The mor config of the model.
    pub config: ResolvedConfig,
    /// The mor parameters by name (f32, on the host; routers in mor's `[in, out]`).
    pub params: HashMap<String, Tensor>,
    /// The token-choice loss-free bias, when the layout has one.
    pub router_bias: Option<Tensor>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Reads the tensors of `path`: safetensors, or a PyTorch pickle (`.bin`/`.pt`, zip
/// format) through candle's reader.
///
/// # Errors
/// When the file is missing or not in either format.
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(bad(path, "file not found"));
    }
    let is_torch = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e == "bin" || e == "pt" || e == "pth");
    if is_torch {
        let v = candle_core::pickle::read_all(path)
            .map_err(|e| bad(path, format!("not a readable PyTorch checkpoint: {e}")))?;
        Ok(v.into_iter().collect())
    } else {
        crate::checkpoint::load_tensors(path)
    }
}

/// The weights file of an official checkpoint folder: `model.safetensors`, else
/// `pytorch_model.bin`; a file path is taken as is.
///
/// # Errors
/// When a folder has neither file.
pub fn weights_path(dir: &Path) -> Result<PathBuf> {
    if dir.is_file() {
        return Ok(dir.to_path_buf());
    }
    for f in [WEIGHTS_FILE, TORCH_WEIGHTS_FILE] {
        let p = dir.join(f);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(bad(
        dir,
        format!("has neither {WEIGHTS_FILE} nor {TORCH_WEIGHTS_FILE}"),
    ))
}

/// The mor config of the official checkpoint folder `dir`, from its settings
/// (`mor_config.json`, else `mor_config.yaml`, else the `yaml` given: an official
/// `conf/pretrain/<name>.yaml`) and `config.json` when present.
///
/// # Errors
/// When there is no settings file, or it cannot be read or mapped (see
/// [`config_from_settings`]).
pub fn infer_config(dir: &Path, yaml: Option<&Path>) -> Result<ResolvedConfig> {
    let json_path = dir.join(SETTINGS_JSON);
    let yaml_path = yaml
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join(SETTINGS_YAML));
    let (settings, origin) = if yaml.is_none() && json_path.is_file() {
        let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(&json_path, format!("not valid JSON: {e}")))?;
        (v, json_path)
    } else if yaml_path.is_file() {
        let text = std::fs::read_to_string(&yaml_path).map_err(|e| Error::io(&yaml_path, e))?;
        (parse_yaml(&text, &yaml_path)?, yaml_path)
    } else {
        return Err(bad(
            dir,
            format!(
                "has no {SETTINGS_JSON} or {SETTINGS_YAML}; give the mor config (TOML) or the official \
                 training YAML"
            ),
        ));
    };
    let cj = dir.join("config.json");
    let hf = if cj.is_file() {
        Some(HfConfig::from_file(&cj)?)
    } else {
        None
    };
    let cfg = config_from_settings(&settings, hf.as_ref(), &origin)?;
    Ok(cfg)
}

/// Reads the official checkpoint at `dir` (a folder or a weights file) for `config`, or for
/// the config inferred from the folder's settings when `config` is `None`
/// ([`infer_config`]), and checks every tensor: the first problem in `state_dict` order is
/// reported (a missing key, an unexpected one, a shape that does not fit, a NaN/Inf, or
/// aliases of one mor tensor that differ), with the number of further problems.
///
/// # Errors
/// As above, and when the config has no official layout.
pub fn read_official(dir: &Path, config: Option<ResolvedConfig>) -> Result<OfficialImport> {
    let path = weights_path(dir)?;
    let config = match config {
        Some(c) => c,
        None => infer_config(
            if dir.is_file() {
                dir.parent().unwrap_or(Path::new("."))
            } else {
                dir
            },
            None,
        )?,
    };
    let keys = official_keys(&config)?;
    let tensors = read_weights(&path)?;
    let mut problems: Vec<String> = Vec::new();
    let mut params: HashMap<String, Tensor> = HashMap::new();
    let mut first_key: HashMap<String, String> = HashMap::new();
    let mut router_bias = None;
    for k in &keys {
        let Some(t) = tensors.get(&k.key) else {
            problems.push(format!("`{}` is missing (shape {:?})", k.key, k.shape));
            continue;
        };
        if t.dims() != k.shape.as_slice() {
            problems.push(format!(
                "`{}` has shape {:?}, the config needs {:?}",
                k.key,
                t.dims(),
                k.shape
            ));
            continue;
        }
        let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let host = t.flatten_all()?.to_vec1::<f32>()?;
        if let Some(i) = host.iter().position(|x| !x.is_finite()) {
            problems.push(format!(
                "`{}` holds a non-finite value ({}) at flat index {i}",
                k.key, host[i]
            ));
            continue;
        }
        match &k.source {
            Source::Param { name, transpose } => {
                let t = if *transpose { t.t()?.contiguous()? } else { t };
                match params.get(name) {
                    None => {
                        params.insert(name.clone(), t);
                        first_key.insert(name.clone(), k.key.clone());
                    }
                    Some(prev) => {
                        let a = prev.flatten_all()?.to_vec1::<f32>()?;
                        let b = t.flatten_all()?.to_vec1::<f32>()?;
                        if let Some(i) = a
                            .iter()
                            .zip(&b)
                            .position(|(x, y)| x.to_bits() != y.to_bits())
                        {
                            problems.push(format!(
                                "`{}` differs from `{}` (both hold mor's `{name}`, tied by the sharing) at flat index {i}: {} vs {}",
                                k.key, first_key[name], b[i], a[i]
                            ));
                        }
                    }
                }
            }
            Source::RouterBias => router_bias = Some(t),
        }
    }
    let known: std::collections::HashSet<&str> = keys.iter().map(|k| k.key.as_str()).collect();
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    extra.sort();
    for k in extra {
        problems.push(format!(
            "`{k}` is unexpected (not part of the official layout of this config)"
        ));
    }
    if let Some(first) = problems.first() {
        let more = match problems.len() - 1 {
            0 => String::new(),
            n => format!(" (and {n} more problem{})", if n == 1 { "" } else { "s" }),
        };
        return Err(bad(
            &path,
            format!(
                "does not fit the {} model: {first}{more}",
                describe(&config)
            ),
        ));
    }
    Ok(OfficialImport {
        path,
        config,
        params,
        router_bias,
    })
}

fn describe(cfg: &ResolvedConfig) -> String {
    format!(
        "{} (sharing `{}`, N_r = {}, {} positions)",
        cfg.router
            .as_ref()
            .map(|r| r.kind.clone())
            .unwrap_or_else(|| if cfg.recursion.sharing.kind == "none" {
                "vanilla".into()
            } else {
                "recursive".into()
            }),
        cfg.recursion.sharing.kind,
        cfg.plan.num_recursions,
        cfg.plan.num_slots()
    )
}

impl OfficialImport {
    /// Copies the weights into `model` (built from a config with this import's layout),
    /// converting to the model's dtype; the loss-free bias goes to the router.
    ///
    /// # Errors
    /// When the model's parameters are not exactly the imported ones.
    pub fn load_into(&self, model: &MorModel) -> Result<()> {
        let vars: Vec<(String, candle_core::Var)> = model
            .named_vars()
            .into_iter()
            .chain(model.aux_named_vars())
            .collect();
        let mut map = HashMap::new();
        for (name, var) in &vars {
            if let Some(t) = self.params.get(name) {
                map.insert(name.clone(), t.to_dtype(var.dtype())?);
            }
        }
        for name in self.params.keys() {
            if !map.contains_key(name) {
                return Err(bad(
                    &self.path,
                    format!("the model has no parameter `{name}` that the checkpoint fills"),
                ));
            }
        }
        crate::checkpoint::assign_params(&self.path, &vars, &map)?;
        if let (Some(b), Some(r)) = (&self.router_bias, model.router()) {
            r.load_buffers(&[(mor_router::token_choice::BIAS_BUFFER.to_string(), b.clone())])?;
        }
        Ok(())
    }

    /// The model of this import (f32, on the host).
    ///
    /// # Errors
    /// When the model cannot be built or the weights do not fit it.
    pub fn model(&self) -> Result<MorModel> {
        let model = MorModel::new(&self.config)?;
        self.load_into(&model)?;
        Ok(model)
    }
}

/// Reads the official checkpoint at `dir` (see [`read_official`]) and loads it into
/// `model`, whose config decides the layout.
///
/// # Errors
/// As [`read_official`] and [`OfficialImport::load_into`].
pub fn load_official(dir: &Path, model: &MorModel) -> Result<()> {
    read_official(dir, Some(model.config().clone()))?.load_into(model)
}
