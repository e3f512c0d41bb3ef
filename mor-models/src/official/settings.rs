//! The official code's model settings (its Hydra `conf/pretrain/*.yaml` fields) for a mor
//! config, and back.
//!
//! The official checkpoints keep every recursion and router setting in the training YAML,
//! none in `config.json` (\[C\] `util/config.py`, `overwrite_eval_config`). The export writes
//! the fields that decide the `state_dict` keys or the computation as `mor_config.json`
//! and the same fields as `mor_config.yaml` (a fragment of a `conf/pretrain/<name>.yaml`);
//! the import reads either to rebuild the mor config.

use super::names::{official_shape, RouterKeys};
use crate::hf::HfConfig;
use crate::{Error, Result};
use mor_core::config::{Config, ResolvedConfig};
use mor_router::expert_choice::{Gating, RouterFunc, Sampling};
use mor_router::token_choice::{Balancing, TokenRouterFunc};
use mor_router::RouterArch;
use serde_json::{json, Map, Value};
use std::path::Path;

/// File name of the settings as JSON.
pub const SETTINGS_JSON: &str = "mor_config.json";
/// File name of the settings as the official YAML.
pub const SETTINGS_YAML: &str = "mor_config.yaml";

fn arch_name(a: RouterArch) -> &'static str {
    match a {
        RouterArch::Linear => "linear",
        RouterArch::Mlp => "mlp",
        RouterArch::WideMlp => "wide_mlp",
    }
}

/// The official settings of `cfg`'s model: `model`, `model_name_or_path` (`name`),
/// `model_config` (every Llama dimension, `num_hidden_layers` = the unrolled depth),
/// `max_length`, `precision`, `recursive`, `kv_sharing`, `relaxation` and `mor`.
///
/// # Errors
/// When the official code cannot express the model (see
/// [`official_shape`]) or its KV policy, and for a relaxed model (spec §6.4: LoRA, DoRA,
/// adaption prompt or recursion encoding): the layout written here has no relaxation
/// modules, and writing `relaxation.enable = false` would silently drop the adapters.
pub fn official_settings(cfg: &ResolvedConfig, name: &str) -> Result<Value> {
    if let Some(r) = &cfg.recursion.relaxation {
        return Err(Error::msg(format!(
            "recursion.relaxation = \"{}\": the official layout written by mor has no relaxation \
             modules (its state_dict would lose the per-depth adapters); export a model without \
             relaxation",
            r.kind()
        )));
    }
    let (_, router) = official_shape(cfg)?;
    let m = &cfg.model;
    let plan = &cfg.plan;
    let sharing = cfg.recursion.sharing.kind.as_str();
    let recursive = sharing != "none";
    let n_r = plan.num_recursions;
    let (kv_enable, update_cache) = match cfg.kv.kind.as_str() {
        "recursion_wise" => (false, false),
        "recursive_sharing" => (true, false),
        "hybrid" => (true, true),
        other => {
            return Err(Error::msg(format!(
                "KV policy `{other}` has no official equivalent; the official code has recursion_wise (default), \
                 recursive_sharing (kv_sharing.enable) and hybrid (kv_sharing.update_cache)"
            )))
        }
    };
    let accum = (cfg.train.batch_seqs / cfg.train.micro_batch_seqs.max(1)).max(1);
    let null_if = |cond: bool, v: Value| if cond { Value::Null } else { v };
    let mor = match &router {
        RouterKeys::None => json!({ "enable": false }),
        RouterKeys::Expert(p) => json!({
            "enable": true,
            "type": "expert",
            // Always explicit: the official transform splits the string (spec §3.1).
            "capacity": Value::String(
                p.capacities(n_r).iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(","),
            ),
            "rand_router": p.rand_router,
            "router_type": arch_name(p.router_arch),
            "z_loss": p.z_loss,
            "z_coeff": p.z_coeff,
            "temp": p.temperature,
            "expert": {
                // The official warm-up counts forward calls (spec §3.1).
                "cap_warmup_step": p.cap_warmup_steps * accum,
                "router_func": match p.router_func {
                    RouterFunc::Sigmoid => json!("sigmoid"),
                    RouterFunc::Tanh => json!("tanh"),
                    RouterFunc::None => Value::Null,
                },
                "alpha": p.alpha,
                "sampling": match p.sampling {
                    Sampling::None => Value::Null,
                    Sampling::AuxLoss => json!("aux_loss"),
                    Sampling::AuxRouter => json!("aux_router"),
                },
                "coeff": p.aux_coeff,
                "gating": match p.gating { Gating::Weighted => "weighted", Gating::Additive => "additive" },
            },
        }),
        RouterKeys::Token(p) => json!({
            "enable": true,
            "type": "token",
            "capacity": Value::Null,
            "rand_router": p.rand_router,
            "router_type": arch_name(p.router_arch),
            "z_loss": p.z_loss,
            "z_coeff": p.z_coeff,
            "temp": p.temperature,
            "token": {
                "bal_warmup_step": p.bal_warmup_steps * accum,
                "router_func": match p.router_func {
                    TokenRouterFunc::Softmax => "softmax",
                    TokenRouterFunc::Sigmoid => "sigmoid",
                },
                "alpha": p.alpha,
                "balancing": match p.balancing { Balancing::Loss => "loss", Balancing::LossFree => "loss_free" },
                "coeff": p.bal_coeff,
                "u": p.bias_update_u,
                "gating": "weighted",
            },
        }),
    };
    Ok(json!({
        "model": "smollm",
        "model_name_or_path": name,
        "model_config": {
            "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size,
            "intermediate_size": m.intermediate_size,
            "num_hidden_layers": plan.num_slots(),
            "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.num_kv_heads,
            "head_dim": m.head_dim,
            "rms_norm_eps": m.rms_eps,
            "rope_theta": m.rope_theta,
            "tie_word_embeddings": m.tie_embeddings,
            "max_position_embeddings": m.seq_len,
        },
        "max_length": m.seq_len,
        "precision": "fp32",
        "recursive": {
            "enable": recursive,
            "base_depth": Value::Null,
            "num_recursion": null_if(!recursive, json!(n_r)),
            "sharing": null_if(!recursive, json!(sharing)),
            "ln_share": cfg.recursion.ln_share,
            "initialization": "random",
        },
        "kv_sharing": {
            "enable": kv_enable,
            "base_depth": Value::Null,
            "num_recursion": null_if(!kv_enable, json!(n_r)),
            "sharing": null_if(!kv_enable, json!(sharing)),
            "update_cache": update_cache,
        },
        "relaxation": { "enable": false },
        "mor": mor,
    }))
}

/// Formats a JSON number so that YAML 1.1 loaders (PyYAML, used by OmegaConf) read a float
/// as a float (`1e-5` needs a dot: `1.0e-5`).
fn yaml_number(n: &serde_json::Number) -> String {
    let s = n.to_string();
    if n.is_f64() && s.contains(['e', 'E']) && !s.contains('.') {
        let i = s.find(['e', 'E']).unwrap_or(s.len());
        format!("{}.0{}", &s[..i], &s[i..])
    } else {
        s
    }
}

fn yaml_lines(v: &Map<String, Value>, indent: usize, out: &mut String) {
    for (k, val) in v {
        let pad = " ".repeat(indent);
        match val {
            Value::Object(o) => {
                out.push_str(&format!("{pad}{k}:\n"));
                yaml_lines(o, indent + 2, out);
            }
            Value::Null => out.push_str(&format!("{pad}{k}: null\n")),
            Value::Bool(b) => out.push_str(&format!("{pad}{k}: {b}\n")),
            Value::Number(n) => out.push_str(&format!("{pad}{k}: {}\n", yaml_number(n))),
            // A JSON string is a valid YAML double-quoted scalar.
            other => out.push_str(&format!("{pad}{k}: {other}\n")),
        }
    }
}

/// The settings as YAML (nested block mappings of scalars).
pub fn to_yaml(settings: &Value) -> String {
    let mut out = String::new();
    if let Value::Object(o) = settings {
        yaml_lines(o, 0, &mut out);
    }
    out
}

fn yaml_scalar(s: &str) -> Value {
    let s = s.trim();
    match s {
        "" | "null" | "~" | "Null" | "NULL" => return Value::Null,
        "true" | "True" => return Value::Bool(true),
        "false" | "False" => return Value::Bool(false),
        _ => {}
    }
    if let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        return serde_json::from_str(s).unwrap_or_else(|_| Value::String(inner.to_string()));
    }
    if let Some(inner) = s.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        return Value::String(inner.replace("''", "'"));
    }
    if let Ok(i) = s.parse::<i64>() {
        return json!(i);
    }
    if let Ok(f) = s.parse::<f64>() {
        return json!(f);
    }
    Value::String(s.to_string())
}

/// Reads the block-mapping YAML of an official `conf/pretrain/*.yaml` (nested `key: value`
/// mappings, `#` comments; flow lists and other forms are kept as strings) into JSON.
///
/// # Errors
/// A line that is not `key: value` or `key:`, or an indentation that does not nest; the
/// message names `path` and the line.
pub fn parse_yaml(text: &str, path: &Path) -> Result<Value> {
    /// A mapping being filled: its indentation, entries, own key in the parent, and the
    /// last key that opened a nested mapping.
    struct Frame {
        indent: usize,
        map: Map<String, Value>,
        key: String,
        open: String,
    }
    fn close(stack: &mut Vec<Frame>) {
        if let Some(f) = stack.pop() {
            if let Some(parent) = stack.last_mut() {
                parent.map.insert(f.key, Value::Object(f.map));
            }
        }
    }
    let mut stack = vec![Frame {
        indent: 0,
        map: Map::new(),
        key: String::new(),
        open: String::new(),
    }];
    let mut pending_indent: Option<usize> = None;
    for (no, raw) in text.lines().enumerate() {
        let line = match raw.find(" #") {
            Some(i) if !raw[..i].contains('"') && !raw[..i].contains('\'') => &raw[..i],
            _ => raw,
        };
        if line.trim().is_empty() || line.trim_start().starts_with('#') || line.trim() == "---" {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let bad = |why: &str| Error::Checkpoint {
            path: path.into(),
            reason: format!("line {}: {why}: `{}`", no + 1, raw.trim_end()),
        };
        if let Some(p) = pending_indent.take() {
            if indent > p {
                let key = stack.last().map(|f| f.open.clone()).unwrap_or_default();
                stack.push(Frame {
                    indent,
                    map: Map::new(),
                    key,
                    open: String::new(),
                });
            }
        }
        while stack.len() > 1 && indent < stack.last().map(|f| f.indent).unwrap_or(0) {
            close(&mut stack);
        }
        if indent != stack.last().map(|f| f.indent).unwrap_or(0) {
            return Err(bad("indentation does not match an enclosing mapping"));
        }
        let Some((k, v)) = line.trim().split_once(':') else {
            return Err(bad("expected `key: value`"));
        };
        let key = k.trim().to_string();
        if let Some(top) = stack.last_mut() {
            if v.trim().is_empty() {
                // A nested mapping follows (or the value is empty: null).
                top.map.insert(key.clone(), Value::Null);
                top.open = key;
                pending_indent = Some(indent);
            } else {
                top.map.insert(key, yaml_scalar(v));
            }
        }
    }
    while stack.len() > 1 {
        close(&mut stack);
    }
    Ok(Value::Object(
        stack.pop().map(|f| f.map).unwrap_or_default(),
    ))
}

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(v, |v, k| v.get(k).unwrap_or(&Value::Null))
}

/// The mor config of a model with official settings `settings` and Llama `config.json`
/// `hf` (when given; otherwise the dimensions come from `settings.model_config`).
/// `origin` names the settings file in errors. Settings mor does not have take mor's
/// defaults (e.g. the causal decoding rule).
///
/// # Errors
/// A field with a value mor does not know, relaxation (not part of the official layout
/// here), or dimensions a mor config refuses; the message names the field.
pub fn config_from_settings(
    settings: &Value,
    hf: Option<&HfConfig>,
    origin: &Path,
) -> Result<ResolvedConfig> {
    let bad = |field: &str, why: String| Error::Checkpoint {
        path: origin.into(),
        reason: format!("`{field}`: {why}"),
    };
    let model_toml = match hf {
        Some(h) => h.model_toml(),
        None => {
            let mc = get(settings, "model_config");
            let mut v = mc.clone();
            if let Value::Object(o) = &mut v {
                o.entry("model_type").or_insert(json!("llama"));
            }
            HfConfig::from_json(&v, origin)
                .map_err(|e| bad("model_config", e.to_string()))?
                .model_toml()
        }
    };
    if get(settings, "relaxation.enable") == &Value::Bool(true) {
        return Err(bad(
            "relaxation.enable",
            "true; relaxation modules are not part of the supported official layout".into(),
        ));
    }
    let as_str = |p: &str| get(settings, p).as_str().map(str::to_string);
    let as_f64 = |p: &str, default: f64| get(settings, p).as_f64().unwrap_or(default);
    let as_bool = |p: &str, default: bool| get(settings, p).as_bool().unwrap_or(default);
    let recursive = as_bool("recursive.enable", false);
    let mor = as_bool("mor.enable", false);
    let mut text = model_toml;
    if recursive {
        let n_r = get(settings, "recursive.num_recursion")
            .as_u64()
            .ok_or_else(|| bad("recursive.num_recursion", "missing or not a count".into()))?;
        let sharing = as_str("recursive.sharing")
            .ok_or_else(|| bad("recursive.sharing", "missing".into()))?;
        text.push_str(&format!(
            "[recursion]\nnum_recursions = {n_r}\nsharing = {{ kind = {} }}\nln_share = {}\n",
            toml::Value::String(sharing),
            as_bool("recursive.ln_share", true)
        ));
    } else {
        if mor {
            return Err(bad("mor.enable", "true without recursive.enable".into()));
        }
        text.push_str("[recursion]\nnum_recursions = 1\nsharing = { kind = \"none\" }\n");
    }
    let kv = if as_bool("kv_sharing.enable", false) {
        if as_bool("kv_sharing.update_cache", false) {
            "hybrid"
        } else {
            "recursive_sharing"
        }
    } else {
        "recursion_wise"
    };
    if mor {
        let arch = as_str("mor.router_type").unwrap_or_else(|| "linear".into());
        if !["linear", "mlp", "wide_mlp"].contains(&arch.as_str()) {
            return Err(bad(
                "mor.router_type",
                format!("\"{arch}\"; expected linear, mlp or wide_mlp"),
            ));
        }
        let common = format!(
            "router_arch = \"{arch}\"\nrand_router = {}\nz_loss = {}\nz_coeff = {:?}\ntemperature = {:?}\n",
            as_bool("mor.rand_router", false),
            as_bool("mor.z_loss", false),
            as_f64("mor.z_coeff", 1e-3),
            as_f64("mor.temp", 1.0),
        );
        match as_str("mor.type").as_deref() {
            Some("expert") => {
                let func = match get(settings, "mor.expert.router_func") {
                    Value::Null => "none".to_string(),
                    v => v.as_str().unwrap_or("?").to_string(),
                };
                if !["sigmoid", "tanh", "none"].contains(&func.as_str()) {
                    return Err(bad(
                        "mor.expert.router_func",
                        format!("{func}; expected sigmoid, tanh or null"),
                    ));
                }
                let sampling = match get(settings, "mor.expert.sampling") {
                    Value::Null => "none".to_string(),
                    v => v.as_str().unwrap_or("?").to_string(),
                };
                if !["aux_loss", "aux_router", "none"].contains(&sampling.as_str()) {
                    return Err(bad(
                        "mor.expert.sampling",
                        format!("{sampling}; expected aux_loss, aux_router or null"),
                    ));
                }
                let capacity = match get(settings, "mor.capacity") {
                    Value::Null => "\"auto\"".to_string(),
                    Value::String(s) => {
                        let v: std::result::Result<Vec<f64>, _> =
                            s.split(',').map(|c| c.trim().parse::<f64>()).collect();
                        let v = v.map_err(|_| {
                            bad(
                                "mor.capacity",
                                format!("\"{s}\" is not a comma-separated list of fractions"),
                            )
                        })?;
                        format!("{v:?}")
                    }
                    Value::Number(n) => format!("[{n}]"),
                    other => {
                        return Err(bad(
                            "mor.capacity",
                            format!("{other}; expected null or \"c1,c2,…\""),
                        ))
                    }
                };
                let gating = as_str("mor.expert.gating").unwrap_or_else(|| "weighted".into());
                text.push_str(&format!(
                    "[router]\nkind = \"expert_choice\"\n{common}router_func = \"{func}\"\nalpha = {:?}\ncapacity = {capacity}\nsampling = \"{sampling}\"\naux_coeff = {:?}\ngating = {}\n",
                    as_f64("mor.expert.alpha", 0.1),
                    as_f64("mor.expert.coeff", 0.001),
                    toml::Value::String(gating),
                ));
            }
            Some("token") => {
                // Anything but "sigmoid" is softmax in the official code (spec §3.2).
                let func = if as_str("mor.token.router_func").as_deref() == Some("sigmoid") {
                    "sigmoid"
                } else {
                    "softmax"
                };
                let balancing = as_str("mor.token.balancing").unwrap_or_else(|| "loss".into());
                if !["loss", "loss_free"].contains(&balancing.as_str()) {
                    return Err(bad(
                        "mor.token.balancing",
                        format!("\"{balancing}\"; expected loss or loss_free"),
                    ));
                }
                text.push_str(&format!(
                    "[router]\nkind = \"token_choice\"\n{common}router_func = \"{func}\"\nalpha = {:?}\nbalancing = \"{balancing}\"\nbal_coeff = {:?}\nbias_update_u = {:?}\n",
                    as_f64("mor.token.alpha", 1.0),
                    as_f64("mor.token.coeff", 0.1),
                    as_f64("mor.token.u", 0.001),
                ));
            }
            other => {
                return Err(bad(
                    "mor.type",
                    format!("{other:?}; expected \"expert\" or \"token\""),
                ))
            }
        }
    }
    text.push_str(&format!("[kv]\nkind = \"{kv}\"\n"));
    Config::from_toml_str(&text).map_err(|e| Error::Checkpoint {
        path: origin.into(),
        reason: format!("the settings give a mor config that does not resolve: {e}"),
    })
}
