//! The official checkpoint layout: closed-form key lists of small models (vanilla,
//! recursive with each sharing, expert-choice Cycle and Middle-Cycle, token-choice with
//! the loss-free bias, MLP and auxiliary routers), the alias groups of tied tensors, the
//! round trip mor names → official keys → mor names against the model's own parameters,
//! and the settings the official code cannot express.

mod common;

use common::{micro, Micro};
use mor_core::config::ResolvedConfig;
use mor_models::official::{alias_groups, mor_names, official_keys, official_shape, Source};
use mor_models::MorModel;
use std::collections::BTreeSet;

const LAYER: [&str; 9] = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
];

/// Hidden 16 (4 query heads and 2 K/V heads of 4, MLP 24), vocabulary 32.
fn cfg(layers: usize, tables: &str) -> ResolvedConfig {
    Micro {
        tables,
        ..micro(32, 16, layers, 8)
    }
    .resolve()
}

fn rec(n_r: usize, sharing: &str) -> String {
    format!("[recursion]\nnum_recursions = {n_r}\nsharing = {{ kind = \"{sharing}\" }}\n")
}

/// The nine layer keys under each prefix, with `extra` keys inserted after the prefix of
/// the same index in `after`.
fn expand(items: &[&str]) -> Vec<String> {
    let mut out = vec!["model.embed_tokens.weight".to_string()];
    for it in items {
        if it.ends_with('.') {
            out.extend(LAYER.iter().map(|l| format!("{it}{l}")));
        } else {
            out.push(it.to_string());
        }
    }
    out.push("model.norm.weight".into());
    out.push("lm_head.weight".into());
    out
}

fn key_names(c: &ResolvedConfig) -> Vec<String> {
    official_keys(c)
        .unwrap()
        .into_iter()
        .map(|k| k.key)
        .collect()
}

fn shape_of(c: &ResolvedConfig, key: &str) -> Vec<usize> {
    official_keys(c)
        .unwrap()
        .into_iter()
        .find(|k| k.key == key)
        .unwrap_or_else(|| panic!("no key {key}"))
        .shape
}

/// The official keys of each alias group, as (mor name, keys).
fn groups(c: &ResolvedConfig) -> Vec<(String, Vec<String>)> {
    alias_groups(c)
        .unwrap()
        .into_iter()
        .map(|(s, keys)| match s {
            Source::Param { name, .. } => (name, keys),
            Source::RouterBias => ("router_bias".into(), keys),
        })
        .collect()
}

fn group_of(c: &ResolvedConfig, mor: &str) -> Vec<String> {
    groups(c)
        .into_iter()
        .find(|(n, _)| n == mor)
        .unwrap_or_else(|| panic!("no group {mor}"))
        .1
}

#[test]
fn expert_middle_cycle_six_layers_two_recursions() {
    let c = cfg(
        6,
        &format!(
            "{}[router]\nkind = \"expert_choice\"\n",
            rec(2, "middle_cycle")
        ),
    );
    let want = expand(&[
        "model.layers.0.",
        "model.layers.1.block.0.",
        "model.layers.1.block.1.",
        "model.layers.1.mor_router.router.weight",
        "model.layers.2.block.0.",
        "model.layers.2.block.1.",
        "model.layers.2.mor_router.router.weight",
        "model.layers.3.",
    ]);
    assert_eq!(want.len(), 1 + 6 * 9 + 2 + 2);
    assert_eq!(key_names(&c), want);
    assert_eq!(
        shape_of(&c, "model.layers.2.mor_router.router.weight"),
        vec![1, 16]
    );
    assert_eq!(
        shape_of(&c, "model.layers.1.block.1.self_attn.k_proj.weight"),
        vec![8, 16]
    );
    assert_eq!(
        shape_of(&c, "model.layers.3.mlp.down_proj.weight"),
        vec![16, 24]
    );
    // Position 1 (block.0 of step 1) and position 3 (block.0 of step 2) alias mor block 1;
    // the first and last layers are blocks 0 and 3, each under one key.
    assert_eq!(
        group_of(&c, "model.layers.1.self_attn.q_proj.weight"),
        vec![
            "model.layers.1.block.0.self_attn.q_proj.weight",
            "model.layers.2.block.0.self_attn.q_proj.weight"
        ]
    );
    assert_eq!(
        group_of(&c, "model.layers.2.input_layernorm.weight"),
        vec![
            "model.layers.1.block.1.input_layernorm.weight",
            "model.layers.2.block.1.input_layernorm.weight"
        ]
    );
    assert_eq!(
        group_of(&c, "model.layers.3.mlp.up_proj.weight"),
        vec!["model.layers.3.mlp.up_proj.weight"]
    );
    // Tied embeddings: the LM head is the embedding under a second key.
    assert_eq!(
        group_of(&c, "model.embed_tokens.weight"),
        vec!["model.embed_tokens.weight", "lm_head.weight"]
    );
    assert_eq!(
        group_of(&c, "model.router.2.w1"),
        vec!["model.layers.2.mor_router.router.weight"]
    );
    let transposed = official_keys(&c)
        .unwrap()
        .into_iter()
        .filter(|k| {
            matches!(
                k.source,
                Source::Param {
                    transpose: true,
                    ..
                }
            )
        })
        .count();
    assert_eq!(transposed, 2);
}

#[test]
fn expert_cycle_mlp_and_aux_routers() {
    let c = cfg(
        6,
        &format!(
            "{}[router]\nkind = \"expert_choice\"\nrouter_arch = \"mlp\"\nsampling = \"aux_router\"\n",
            rec(3, "cycle")
        ),
    );
    let mut items = Vec::new();
    let mut prefixes = Vec::new();
    for r in 0..3 {
        prefixes.push(format!("model.layers.{r}.block.0."));
        prefixes.push(format!("model.layers.{r}.block.1."));
        for p in ["mor_router", "mlp_router"] {
            prefixes.push(format!("model.layers.{r}.{p}.router.0.weight"));
            prefixes.push(format!("model.layers.{r}.{p}.router.2.weight"));
        }
    }
    items.extend(prefixes.iter().map(String::as_str));
    assert_eq!(key_names(&c), expand(&items));
    assert_eq!(
        shape_of(&c, "model.layers.1.mor_router.router.0.weight"),
        vec![32, 16]
    );
    assert_eq!(
        shape_of(&c, "model.layers.2.mlp_router.router.2.weight"),
        vec![1, 32]
    );
    assert_eq!(
        group_of(&c, "model.layers.1.mlp.gate_proj.weight"),
        vec![
            "model.layers.0.block.1.mlp.gate_proj.weight",
            "model.layers.1.block.1.mlp.gate_proj.weight",
            "model.layers.2.block.1.mlp.gate_proj.weight"
        ]
    );
    assert_eq!(
        group_of(&c, "model.aux_router.3.w2"),
        vec!["model.layers.2.mlp_router.router.2.weight"]
    );
}

#[test]
fn token_choice_middle_cycle_with_loss_free_bias() {
    let c = cfg(
        6,
        &format!(
            "{}[router]\nkind = \"token_choice\"\nbalancing = \"loss_free\"\n",
            rec(2, "middle_cycle")
        ),
    );
    let want = expand(&[
        "model.layers.0.",
        "model.layers.1.block_list.0.0.",
        "model.layers.1.block_list.0.1.",
        "model.layers.1.block_list.1.0.",
        "model.layers.1.block_list.1.1.",
        "model.layers.1.mor_router.router.weight",
        "model.layers.1.router_bias",
        "model.layers.2.",
    ]);
    assert_eq!(key_names(&c), want);
    assert_eq!(
        shape_of(&c, "model.layers.1.mor_router.router.weight"),
        vec![2, 16]
    );
    assert_eq!(shape_of(&c, "model.layers.1.router_bias"), vec![2]);
    assert_eq!(
        group_of(&c, "model.layers.2.self_attn.o_proj.weight"),
        vec![
            "model.layers.1.block_list.0.1.self_attn.o_proj.weight",
            "model.layers.1.block_list.1.1.self_attn.o_proj.weight"
        ]
    );
    // With the balancing loss there is no bias.
    let c = cfg(
        6,
        &format!(
            "{}[router]\nkind = \"token_choice\"\n",
            rec(2, "middle_cycle")
        ),
    );
    assert!(!key_names(&c).iter().any(|k| k.contains("router_bias")));
}

/// Positions aliasing each mor block, read off the `q_proj` groups of a flat layout.
fn flat_groups(c: &ResolvedConfig) -> Vec<Vec<usize>> {
    (0..c.plan.num_blocks)
        .map(|b| {
            group_of(c, &format!("model.layers.{b}.self_attn.q_proj.weight"))
                .iter()
                .map(|k| {
                    k.strip_prefix("model.layers.")
                        .and_then(|r| r.split('.').next())
                        .unwrap()
                        .parse()
                        .unwrap()
                })
                .collect()
        })
        .collect()
}

#[test]
fn recursive_models_are_flat_with_alias_groups_of_each_sharing() {
    // The groups of the official sharing code (spec §2): cycle {j + r·B}, sequence
    // {j·N .. (j+1)·N}, middle_* the same shifted by one with unique ends.
    let cases: [(&str, usize, usize, Vec<Vec<usize>>); 4] = [
        ("cycle", 6, 3, vec![vec![0, 2, 4], vec![1, 3, 5]]),
        ("sequence", 6, 3, vec![vec![0, 1, 2], vec![3, 4, 5]]),
        (
            "middle_cycle",
            8,
            3,
            vec![vec![0], vec![1, 3, 5], vec![2, 4, 6], vec![7]],
        ),
        (
            "middle_sequence",
            8,
            3,
            vec![vec![0], vec![1, 2, 3], vec![4, 5, 6], vec![7]],
        ),
    ];
    for (sharing, layers, n_r, want) in cases {
        let c = cfg(layers, &rec(n_r, sharing));
        let items: Vec<String> = (0..layers).map(|i| format!("model.layers.{i}.")).collect();
        let items: Vec<&str> = items.iter().map(String::as_str).collect();
        assert_eq!(key_names(&c), expand(&items), "{sharing}");
        assert_eq!(flat_groups(&c), want, "{sharing}");
    }
    // Vanilla: one key per tensor.
    let c = cfg(3, &format!("[recursion]\n{}", common::VANILLA));
    assert!(groups(&c)
        .iter()
        .all(|(n, keys)| keys.len() == 1 || n == "model.embed_tokens.weight"));
    assert_eq!(key_names(&c).len(), 1 + 3 * 9 + 2);
}

#[test]
fn untied_head_and_per_slot_norms() {
    let c = Micro {
        model: "tie_embeddings = false",
        tables: &format!("{}ln_share = false\n", rec(2, "middle_cycle")),
        ..micro(32, 16, 6, 8)
    }
    .resolve();
    assert_eq!(group_of(&c, "lm_head.weight"), vec!["lm_head.weight"]);
    assert_eq!(
        group_of(&c, "model.embed_tokens.weight"),
        vec!["model.embed_tokens.weight"]
    );
    // Each position has its own norms; the projections stay tied.
    assert_eq!(
        group_of(&c, "model.slots.3.input_layernorm.weight"),
        vec!["model.layers.3.input_layernorm.weight"]
    );
    assert_eq!(
        group_of(&c, "model.layers.1.self_attn.v_proj.weight").len(),
        2
    );
}

/// The mor names the mapping reads are exactly the model's parameters (main and
/// auxiliary), and each official key's shape is its parameter's (transposed for routers).
#[test]
fn names_to_keys_to_names_round_trip() {
    let tables = [
        format!("[recursion]\n{}", common::VANILLA),
        rec(3, "cycle"),
        rec(3, "sequence"),
        format!("{}ln_share = false\n", rec(2, "middle_cycle")),
        rec(2, "middle_sequence"),
        format!("{}[router]\nkind = \"expert_choice\"\n", rec(2, "middle_cycle")),
        format!(
            "{}[router]\nkind = \"expert_choice\"\nrouter_arch = \"wide_mlp\"\nsampling = \"aux_router\"\n",
            rec(3, "cycle")
        ),
        format!(
            "{}[router]\nkind = \"expert_choice\"\nrand_router = true\n",
            rec(2, "middle_cycle")
        ),
        format!(
            "{}[router]\nkind = \"token_choice\"\nrouter_arch = \"mlp\"\nbalancing = \"loss_free\"\n",
            rec(3, "middle_cycle")
        ),
    ];
    for t in &tables {
        let c = Micro {
            model: "tie_embeddings = false",
            tables: t,
            ..micro(32, 16, 6, 8)
        }
        .resolve();
        let model = MorModel::new(&c).unwrap();
        let vars: Vec<(String, candle_core::Var)> = model
            .named_vars()
            .into_iter()
            .chain(model.aux_named_vars())
            .collect();
        let have: BTreeSet<String> = vars.iter().map(|(n, _)| n.clone()).collect();
        let mapped: BTreeSet<String> = mor_names(&c).unwrap().into_iter().collect();
        assert_eq!(mapped, have, "{t}");
        for k in official_keys(&c).unwrap() {
            if let Source::Param { name, transpose } = &k.source {
                let v = &vars.iter().find(|(n, _)| n == name).unwrap().1;
                let mut dims = v.as_tensor().dims().to_vec();
                if *transpose {
                    dims.reverse();
                }
                assert_eq!(dims, k.shape, "{} ({t})", k.key);
            }
        }
        let keys = key_names(&c);
        let unique: BTreeSet<&String> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "duplicate keys ({t})");
    }
}

fn refusal(layers: usize, tables: &str) -> String {
    let c = cfg(layers, tables);
    official_shape(&c).unwrap_err().to_string()
}

#[test]
fn settings_the_official_code_lacks_are_refused() {
    let e = refusal(
        6,
        &format!("{}[router]\nkind = \"token_choice\"\n", rec(3, "cycle")),
    );
    assert!(e.contains("token-choice with sharing `cycle`"), "{e}");
    let e = refusal(
        6,
        &format!(
            "{}[router]\nkind = \"expert_choice\"\nrouter_arch = \"wide_mlp\"\nwide_mult = 4\n",
            rec(2, "middle_cycle")
        ),
    );
    assert!(e.contains("wide_mult = 4"), "{e}");
    let e = refusal(
        6,
        &format!(
            "{}[router]\nkind = \"token_choice\"\ngate_intermediate = true\n",
            rec(2, "middle_cycle")
        ),
    );
    assert!(e.contains("gate_intermediate"), "{e}");
    let e = refusal(
        6,
        &format!(
            "[recursion]\n{}\n[kv]\nkind = \"recursive_sharing\"\nshare_pattern = \"cycle\"\nshare_loops = 2\n",
            common::VANILLA
        ),
    );
    assert!(e.contains("KV sharing"), "{e}");
}

/// The KV policies map to the official `kv_sharing` fields and back: recursive sharing is
/// `enable`, the hybrid policy adds `update_cache` (spec §4).
#[test]
fn kv_policies_map_to_official_kv_sharing_and_back() {
    use mor_models::official::{config_from_settings, official_settings};
    for (kv, enable, update) in [
        ("recursion_wise", false, false),
        ("recursive_sharing", true, false),
        ("hybrid", true, true),
    ] {
        let c = cfg(
            6,
            &format!(
                "{}[router]\nkind = \"expert_choice\"\n[kv]\nkind = \"{kv}\"\n",
                rec(2, "middle_cycle")
            ),
        );
        let s = official_settings(&c, "x").unwrap();
        assert_eq!(s["kv_sharing"]["enable"], enable, "{kv}");
        assert_eq!(s["kv_sharing"]["update_cache"], update, "{kv}");
        assert_eq!(s["model_config"]["num_hidden_layers"], 6);
        assert_eq!(s["mor"]["capacity"], "1.0,0.5");
        let back = config_from_settings(&s, None, std::path::Path::new("x.json")).unwrap();
        assert_eq!(back.kv.kind, kv);
        assert_eq!(back.plan, c.plan);
        assert_eq!(back.router.as_ref().unwrap().kind, "expert_choice");
    }
}
