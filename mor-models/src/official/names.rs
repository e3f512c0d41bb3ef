//! The mapping between mor's parameter names and the official code's `state_dict` keys.
//!
//! The official code keeps one decoder-layer module per unrolled position and ties the
//! shared positions' weights by aliasing `nn.Parameter`s (spec §2, \[C\]
//! `model/sharing_strategy/llama.py`), so its `state_dict` lists every position: a shared
//! mor tensor appears under every key that aliases it. The MoR transforms nest the
//! positions (\[C\] `model/mor_model/modeling_llama.py`):
//!
//! - vanilla and recursive models: `model.layers.{i}.*` for every position `i`;
//! - expert-choice (spec §3.1): one module per recursion step `r` holding `block.{j}` and
//!   its own router `mor_router` (and `mlp_router` with the auxiliary router); Middle-Cycle
//!   keeps the first and last layers outside (`model.layers.0`, `model.layers.{N_r+1}`);
//! - token-choice (spec §3.2, Middle-Cycle only): one module `model.layers.1` holding
//!   `block_list.{r}.{j}`, one router `mor_router` with `N_r` outputs and, with loss-free
//!   balancing, `router_bias`; the last layer is `model.layers.2`.
//!
//! The router networks are bias-free `nn.Linear`s stored `[out, in]`; mor stores them
//! `[in, out]`, so they are transposed on the way. `lm_head.weight` is always listed
//! (PyTorch's `state_dict` keeps tied weights).

use crate::{Error, Result};
use mor_core::config::ResolvedConfig;
use mor_core::plan::Segment;
use mor_router::token_choice::Balancing;
use mor_router::{ExpertChoiceParams, RouterArch, TokenChoiceParams};

/// Where the value of an official key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A mor parameter (`MorModel::named_vars` / `aux_named_vars` name); `transpose` when
    /// the official tensor is its transpose (router networks).
    Param {
        /// The mor parameter name.
        name: String,
        /// The official tensor is the transpose of the mor one.
        transpose: bool,
    },
    /// The token-choice router's loss-free bias (a router buffer in mor,
    /// [`mor_router::token_choice::BIAS_BUFFER`]).
    RouterBias,
}

/// One key of the official `state_dict`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfficialKey {
    /// The official key, e.g. `model.layers.1.block.0.self_attn.q_proj.weight`.
    pub key: String,
    /// Its shape in the official layout.
    pub shape: Vec<usize>,
    /// Where its value comes from.
    pub source: Source,
}

/// How the official code nests the positions of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nesting {
    /// `model.layers.{i}` for every position (vanilla and recursive models).
    Flat,
    /// Expert-choice MoR: one module per recursion step.
    Expert {
        /// Middle-Cycle (a unique first and last layer) rather than Cycle.
        middle: bool,
    },
    /// Token-choice MoR (Middle-Cycle): one module holding every step.
    Token,
}

/// The router settings that decide the official router keys.
#[derive(Debug, Clone, PartialEq)]
pub enum RouterKeys {
    /// No router.
    None,
    /// Expert-choice.
    Expert(ExpertChoiceParams),
    /// Token-choice.
    Token(TokenChoiceParams),
}

/// Why `cfg` has no official layout, or `Ok` with its nesting and router settings.
///
/// # Errors
/// A sentence naming the setting the official code cannot express and what it can.
pub fn official_shape(cfg: &ResolvedConfig) -> Result<(Nesting, RouterKeys)> {
    let sharing = cfg.recursion.sharing.kind.as_str();
    const SHARINGS: [&str; 5] = [
        "none",
        "cycle",
        "sequence",
        "middle_cycle",
        "middle_sequence",
    ];
    if !SHARINGS.contains(&sharing) {
        return Err(Error::msg(format!(
            "sharing `{sharing}` has no official layout; the official code knows {}",
            SHARINGS.join(", ")
        )));
    }
    if cfg.recursion.kv_share.is_some() {
        return Err(Error::msg(
            "a vanilla model with KV sharing (`kv.share_pattern`) has no K/V projections in the layers of later \
             loops, while the official layout stores them for every layer; export it without KV sharing",
        ));
    }
    let middle = sharing.starts_with("middle_");
    let Some(spec) = &cfg.router else {
        return Ok((Nesting::Flat, RouterKeys::None));
    };
    let bad_params =
        |e: String| Error::msg(format!("router `{}`: invalid parameters: {e}", spec.kind));
    let check_arch = |arch: RouterArch, wide_mult: usize| -> Result<()> {
        if arch == RouterArch::WideMlp && wide_mult != 2 {
            return Err(Error::msg(format!(
                "router_arch = \"wide_mlp\" with wide_mult = {wide_mult}: the official `wide_mlp` router has a \
                 hidden size of 2·hidden_size (wide_mult = 2); no official router has {wide_mult}·hidden_size"
            )));
        }
        Ok(())
    };
    if sharing != "cycle" && sharing != "middle_cycle" {
        return Err(Error::msg(format!(
            "a routed model needs sharing cycle or middle_cycle in the official code, not `{sharing}`"
        )));
    }
    match spec.kind.as_str() {
        "expert_choice" => {
            let p: ExpertChoiceParams =
                mor_core::registry::parse_params(&spec.params).map_err(bad_params)?;
            check_arch(p.router_arch, p.wide_mult)?;
            Ok((Nesting::Expert { middle }, RouterKeys::Expert(p)))
        }
        "token_choice" => {
            let p: TokenChoiceParams =
                mor_core::registry::parse_params(&spec.params).map_err(bad_params)?;
            check_arch(p.router_arch, p.wide_mult)?;
            if !middle {
                return Err(Error::msg(
                    "token-choice with sharing `cycle`: the official code's token-choice model runs only \
                     middle_cycle (its cycle variant replaces the layer list by a single module and cannot run)",
                ));
            }
            if p.gate_intermediate {
                return Err(Error::msg(
                    "token-choice with gate_intermediate = true: the official code never gates the continuing \
                     branch; export a model trained with gate_intermediate = false",
                ));
            }
            Ok((Nesting::Token, RouterKeys::Token(p)))
        }
        other => Err(Error::msg(format!(
            "router `{other}` has no official layout; the official code has expert_choice and token_choice"
        ))),
    }
}

/// The nine keys of one decoder layer, in `state_dict` order, with the mor block field
/// they hold.
const LAYER_KEYS: [(&str, &str); 9] = [
    ("self_attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("self_attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("self_attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("self_attn.o_proj.weight", "self_attn.o_proj.weight"),
    ("mlp.gate_proj.weight", "mlp.gate_proj.weight"),
    ("mlp.up_proj.weight", "mlp.up_proj.weight"),
    ("mlp.down_proj.weight", "mlp.down_proj.weight"),
    ("input_layernorm.weight", "input_layernorm.weight"),
    (
        "post_attention_layernorm.weight",
        "post_attention_layernorm.weight",
    ),
];

fn param(name: String, transpose: bool) -> Source {
    Source::Param { name, transpose }
}

/// The official router keys of one router network `mor_name` (`model.router.1`, …) under
/// `prefix` (`…mor_router.`), with `out` outputs.
fn router_net_keys(
    out_keys: &mut Vec<OfficialKey>,
    prefix: &str,
    mor_name: &str,
    arch: RouterArch,
    d: usize,
    out: usize,
) {
    match arch {
        RouterArch::Linear => out_keys.push(OfficialKey {
            key: format!("{prefix}router.weight"),
            shape: vec![out, d],
            source: param(format!("{mor_name}.w1"), true),
        }),
        RouterArch::Mlp | RouterArch::WideMlp => {
            out_keys.push(OfficialKey {
                key: format!("{prefix}router.0.weight"),
                shape: vec![2 * d, d],
                source: param(format!("{mor_name}.w1"), true),
            });
            out_keys.push(OfficialKey {
                key: format!("{prefix}router.2.weight"),
                shape: vec![out, 2 * d],
                source: param(format!("{mor_name}.w2"), true),
            });
        }
    }
}

/// Every key of the official `state_dict` of `cfg`'s model, in `state_dict` order, with
/// its shape and its mor source. Shared tensors appear under every aliasing key.
///
/// # Errors
/// As [`official_shape`].
pub fn official_keys(cfg: &ResolvedConfig) -> Result<Vec<OfficialKey>> {
    let (nesting, router) = official_shape(cfg)?;
    let m = &cfg.model;
    let plan = &cfg.plan;
    let (d, dq, dkv, di) = (
        m.hidden_size,
        m.num_heads * m.head_dim,
        m.num_kv_heads * m.head_dim,
        m.intermediate_size,
    );
    let n_r = plan.num_recursions;
    let shape_of = |field: &str| -> Vec<usize> {
        match field {
            "self_attn.q_proj.weight" => vec![dq, d],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![dkv, d],
            "self_attn.o_proj.weight" => vec![d, dq],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![di, d],
            "mlp.down_proj.weight" => vec![d, di],
            _ => vec![d],
        }
    };
    // The module prefix of each position, in position order.
    let prefix = |segment: Segment| -> String {
        match (nesting, segment) {
            (Nesting::Expert { middle: true }, Segment::Prelude)
            | (Nesting::Token, Segment::Prelude) => "model.layers.0.".into(),
            (Nesting::Expert { middle: true }, Segment::Coda) => {
                format!("model.layers.{}.", n_r + 1)
            }
            (Nesting::Token, Segment::Coda) => "model.layers.2.".into(),
            (Nesting::Expert { middle }, Segment::Recursion { step, layer }) => {
                let r = if middle { step } else { step - 1 };
                format!("model.layers.{r}.block.{layer}.")
            }
            (Nesting::Token, Segment::Recursion { step, layer }) => {
                format!("model.layers.1.block_list.{}.{layer}.", step - 1)
            }
            // Flat, and an expert Cycle model has no prelude or coda.
            _ => String::new(),
        }
    };
    let mut keys = vec![OfficialKey {
        key: "model.embed_tokens.weight".into(),
        shape: vec![m.vocab_size, d],
        source: param("model.embed_tokens.weight".into(), false),
    }];
    let router_prefix = |step: usize| -> String {
        match nesting {
            Nesting::Expert { middle: true } => format!("model.layers.{step}."),
            Nesting::Expert { middle: false } => format!("model.layers.{}.", step - 1),
            _ => "model.layers.1.".into(),
        }
    };
    let mut last_step = 0;
    for (i, slot) in plan.slots.iter().enumerate() {
        let b = slot.block;
        let pre = match nesting {
            Nesting::Flat => format!("model.layers.{i}."),
            _ => prefix(slot.segment),
        };
        for (official, field) in LAYER_KEYS {
            let name = if field.ends_with("layernorm.weight") && !cfg.recursion.ln_share {
                format!("model.slots.{i}.{field}")
            } else {
                format!("model.layers.{b}.{field}")
            };
            keys.push(OfficialKey {
                key: format!("{pre}{official}"),
                shape: shape_of(field),
                source: param(name, false),
            });
        }
        // A MoR step module's own parameters come after its block (registration order).
        let step = match slot.segment {
            Segment::Recursion { step, layer } if layer + 1 == plan.base_depth => step,
            _ => continue,
        };
        match &router {
            RouterKeys::Expert(p) if !p.rand_router => {
                let rp = router_prefix(step);
                router_net_keys(
                    &mut keys,
                    &format!("{rp}mor_router."),
                    &format!("model.router.{step}"),
                    p.router_arch,
                    d,
                    1,
                );
                if p.sampling == mor_router::expert_choice::Sampling::AuxRouter {
                    router_net_keys(
                        &mut keys,
                        &format!("{rp}mlp_router."),
                        &format!("model.aux_router.{step}"),
                        p.router_arch,
                        d,
                        1,
                    );
                }
            }
            RouterKeys::Token(p) if step == n_r => {
                let rp = router_prefix(step);
                if !p.rand_router {
                    router_net_keys(
                        &mut keys,
                        &format!("{rp}mor_router."),
                        "model.router",
                        p.router_arch,
                        d,
                        n_r,
                    );
                }
                if p.balancing == Balancing::LossFree {
                    keys.push(OfficialKey {
                        key: format!("{rp}router_bias"),
                        shape: vec![n_r],
                        source: Source::RouterBias,
                    });
                }
            }
            _ => {}
        }
        last_step = step;
    }
    debug_assert!(router == RouterKeys::None || last_step == n_r);
    keys.push(OfficialKey {
        key: "model.norm.weight".into(),
        shape: vec![d],
        source: param("model.norm.weight".into(), false),
    });
    let head = if m.tie_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    keys.push(OfficialKey {
        key: "lm_head.weight".into(),
        shape: vec![m.vocab_size, d],
        source: param(head.into(), false),
    });
    Ok(keys)
}

/// The mor parameter names the official keys of `cfg` read, each once, in first-use order
/// (the union of `MorModel::named_vars` and `aux_named_vars` for a model the official
/// layout can express).
///
/// # Errors
/// As [`official_shape`].
pub fn mor_names(cfg: &ResolvedConfig) -> Result<Vec<String>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for k in official_keys(cfg)? {
        if let Source::Param { name, .. } = k.source {
            if seen.insert(name.clone()) {
                out.push(name);
            }
        }
    }
    Ok(out)
}

/// The official keys grouped by mor source: for each mor parameter (and the router bias),
/// its aliasing official keys in `state_dict` order, groups in first-use order.
///
/// # Errors
/// As [`official_shape`].
pub fn alias_groups(cfg: &ResolvedConfig) -> Result<Vec<(Source, Vec<String>)>> {
    let mut out: Vec<(Source, Vec<String>)> = Vec::new();
    for k in official_keys(cfg)? {
        match out.iter_mut().find(|(s, _)| *s == k.source) {
            Some((_, v)) => v.push(k.key),
            None => out.push((k.source, vec![k.key])),
        }
    }
    Ok(out)
}
