//! Uptraining initialisation (spec §2) end to end: a recursive / MoR model built with
//! `[init]` holds exactly the pretrained weights the method maps to each block.

mod common;

use common::{hf_fixture as fixture, TempDir};

use candle_core::Tensor;
use mor_core::config::{Config, ResolvedConfig};
use mor_models::hf::apply_init;
use mor_models::MorModel;
use std::collections::HashMap;
use std::path::Path;

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn vars(m: &MorModel) -> HashMap<String, Vec<f32>> {
    m.named_vars()
        .into_iter()
        .map(|(n, v)| (n, flat(v.as_tensor())))
        .collect()
}

const TAILS: [&str; 9] = [
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

#[test]
fn stepwise_from_the_fixture_copies_the_expected_layers() {
    let _ = mor_models::builtin::link();
    // MoR, Cycle, N_r = 2 over 4 slots: 2 shared blocks; stepwise from 2 pretrained layers
    // = round(linspace(0, 1, 2)) = layers 0, 1.
    let text = format!(
        "[model]\nvocab_size = 256\nhidden_size = 64\nnum_layers = 4\nnum_heads = 4\nnum_kv_heads = 2\nhead_dim = 8\nintermediate_size = 128\nseq_len = 16\ntie_embeddings = false\n[recursion]\nnum_recursions = 2\nsharing = \"cycle\"\n[router]\nkind = \"expert_choice\"\n[init]\nfrom = \"{}\"\nmethod = \"stepwise\"\n",
        fixture().display()
    );
    let cfg = Config::from_toml_str(&text).unwrap();
    let model = MorModel::new(&cfg).unwrap();
    let fresh = vars(&model);
    let report = apply_init(&model).unwrap().unwrap();
    assert_eq!(report.sources, vec![vec![0], vec![1]]);
    assert_eq!(report.pretrained_layers, 2);
    let pre = candle_core::safetensors::load(
        fixture().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let got = vars(&model);
    for (blk, layer) in [(0, 0), (1, 1)] {
        for tail in TAILS {
            assert_eq!(
                got[&format!("model.layers.{blk}.{tail}")],
                flat(&pre[&format!("model.layers.{layer}.{tail}")]),
                "block {blk} {tail}"
            );
        }
    }
    for n in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert_eq!(got[n], flat(&pre[n]), "{n}");
    }
    // Routers start fresh: unchanged by the initialisation.
    let routers: Vec<&String> = got.keys().filter(|n| n.contains("router")).collect();
    assert!(!routers.is_empty());
    for n in routers {
        assert_eq!(got[n], fresh[n], "{n}");
    }
    // No [init]: nothing happens.
    let plain = Config::from_toml_str(text.split("[init]").next().unwrap()).unwrap();
    assert!(apply_init(&MorModel::new(&plain).unwrap())
        .unwrap()
        .is_none());
}

#[test]
fn dora_magnitudes_follow_the_pretrained_weights() {
    let _ = mor_models::builtin::link();
    // Recursive Cycle N_r = 2 with DoRA on q and v: after the initialisation, each depth's
    // magnitude m is the row norm of the pretrained projection its block now holds, so the
    // relaxed model starts equal to the initialised base model.
    let text = format!(
        "[model]\nvocab_size = 256\nhidden_size = 64\nnum_layers = 4\nnum_heads = 4\nnum_kv_heads = 2\nhead_dim = 8\nintermediate_size = 128\nseq_len = 16\ntie_embeddings = false\n[recursion]\nnum_recursions = 2\nsharing = \"cycle\"\nrelaxation = {{ kind = \"dora\", rank = 2 }}\n[init]\nfrom = \"{}\"\nmethod = \"stepwise\"\n",
        fixture().display()
    );
    let cfg = Config::from_toml_str(&text).unwrap();
    let model = MorModel::new(&cfg).unwrap();
    apply_init(&model).unwrap().unwrap();
    let got = vars(&model);
    let mut checked = 0;
    for (name, m) in &got {
        let Some(rest) = name.strip_prefix("model.relax.dora.") else {
            continue;
        };
        let Some(rest) = rest.strip_suffix(".m") else {
            continue;
        };
        // rest = "{step}.{block}.{target}"
        let parts: Vec<&str> = rest.split('.').collect();
        assert_eq!(parts.len(), 3, "{name}");
        let (block, target) = (parts[1], parts[2]);
        let w = &got[&format!("model.layers.{block}.self_attn.{target}.weight")];
        let d_out = m.len();
        let d_in = w.len() / d_out;
        for (row, &mag) in m.iter().enumerate() {
            let norm = w[row * d_in..(row + 1) * d_in]
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt();
            assert!(
                (f64::from(mag) - norm).abs() <= 1e-5 * norm,
                "{name} row {row}: {mag} vs {norm}"
            );
        }
        checked += 1;
    }
    // 2 depths x 2 blocks x {q, v}.
    assert_eq!(checked, 8);
}

/// A vanilla mor run folder of `layers` layers with distinct random weights.
fn pretrained_run(dir: &Path, layers: usize) -> ResolvedConfig {
    let text = format!("[model]\nvocab_size = 300\nhidden_size = 32\nnum_layers = {layers}\nnum_heads = 4\nnum_kv_heads = 2\nhead_dim = 8\nintermediate_size = 64\nseq_len = 16\n[runtime]\nseed = 5\n");
    let cfg = Config::from_toml_str(&text).unwrap();
    let model = MorModel::new(&cfg).unwrap();
    // Norms away from 1, distinct per layer.
    for (n, v) in model.named_vars() {
        if n.ends_with("norm.weight") {
            let d = v.as_tensor().dims1().unwrap();
            let k = n.bytes().map(u32::from).sum::<u32>() as f32;
            let w: Vec<f32> = (0..d)
                .map(|i| 1.0 + 0.01 * ((i as f32 * 7.0 + k) % 13.0))
                .collect();
            v.set(&Tensor::new(w, &candle_core::Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let json: serde_json::Value = serde_json::from_str(&cfg.to_json().unwrap()).unwrap();
    mor_models::checkpoint::save_model(dir, &model.named_vars(), &json).unwrap();
    std::fs::write(dir.join("config.toml"), cfg.to_toml_string()).unwrap();
    cfg
}

fn target(
    from: &Path,
    sharing: &str,
    method: &str,
    extra: &str,
) -> mor_core::Result<ResolvedConfig> {
    Config::from_toml_str(&format!(
        "[model]\nvocab_size = 300\nhidden_size = 32\nnum_layers = 6\nnum_heads = 4\nnum_kv_heads = 2\nhead_dim = 8\nintermediate_size = 64\nseq_len = 16\n[recursion]\nnum_recursions = 2\nsharing = \"{sharing}\"\n{extra}\n[init]\nfrom = \"{}\"\nmethod = \"{method}\"\n",
        from.display()
    ))
}

#[test]
fn average_and_upper_from_a_mor_run_folder() {
    let _ = mor_models::builtin::link();
    let d = TempDir::new("run");
    let pre_dir = d.0.join("pre");
    pretrained_run(&pre_dir, 6);
    let pre = candle_core::safetensors::load(
        pre_dir.join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let layer = |l: usize, tail: &str| flat(&pre[&format!("model.layers.{l}.{tail}")]);

    // Middle-Cycle N_r = 2: first 0, shared {1, 3} and {2, 4}, last 5 (spec §2).
    let cfg = target(&pre_dir, "middle_cycle", "average", "").unwrap();
    let model = MorModel::new(&cfg).unwrap();
    let r = apply_init(&model).unwrap().unwrap();
    assert_eq!(r.sources, vec![vec![0], vec![1, 3], vec![2, 4], vec![5]]);
    let got = vars(&model);
    for tail in TAILS {
        assert_eq!(got[&format!("model.layers.0.{tail}")], layer(0, tail));
        assert_eq!(got[&format!("model.layers.3.{tail}")], layer(5, tail));
        for (blk, (x, y)) in [(1, (1, 3)), (2, (2, 4))] {
            let want: Vec<f32> = layer(x, tail)
                .iter()
                .zip(layer(y, tail))
                .map(|(a, b)| ((f64::from(*a) + f64::from(b)) / 2.0) as f32)
                .collect();
            assert_eq!(
                got[&format!("model.layers.{blk}.{tail}")],
                want,
                "block {blk} {tail}"
            );
        }
    }

    // Cycle N_r = 2 with per-slot norms, upper: blocks 0..3 <- layers 3, 4, 5; slot s of
    // block b gets layer (3 + b)'s norms.
    let cfg = target(&pre_dir, "cycle", "upper", "ln_share = false").unwrap();
    let model = MorModel::new(&cfg).unwrap();
    assert_eq!(
        apply_init(&model).unwrap().unwrap().sources,
        vec![vec![3], vec![4], vec![5]]
    );
    let got = vars(&model);
    for (s, slot) in cfg.plan.slots.iter().enumerate() {
        assert_eq!(
            got[&format!("model.slots.{s}.input_layernorm.weight")],
            layer(3 + slot.block, "input_layernorm.weight"),
            "slot {s}"
        );
    }
    assert_eq!(
        got["model.layers.1.mlp.up_proj.weight"],
        layer(4, "mlp.up_proj.weight")
    );
    // The tied head of the pretrained model is the embedding.
    assert_eq!(
        got["model.embed_tokens.weight"],
        flat(&pre["model.embed_tokens.weight"])
    );
}

#[test]
fn misfits_are_refused_before_any_weight_changes() {
    let _ = mor_models::builtin::link();
    let d = TempDir::new("misfit");
    let pre_dir = d.0.join("pre");
    pretrained_run(&pre_dir, 8);
    // 8 pretrained layers cannot be averaged onto 4 recursion slots.
    let cfg = target(&pre_dir, "middle_cycle", "average", "").unwrap();
    let model = MorModel::new(&cfg).unwrap();
    let before = vars(&model);
    let e = apply_init(&model).unwrap_err().to_string();
    assert!(
        e.contains("init.method = \"average\"")
            && e.contains("4 recursion slots")
            && e.contains("6 layers"),
        "{e}"
    );
    assert_eq!(vars(&model), before);
    // A different width names the field.
    let cfg = Config::from_toml_str(&format!(
        "[model]\nvocab_size = 300\nhidden_size = 48\nnum_layers = 6\nnum_heads = 4\nnum_kv_heads = 2\nhead_dim = 8\nintermediate_size = 64\nseq_len = 16\n[recursion]\nnum_recursions = 2\nsharing = \"cycle\"\n[init]\nfrom = \"{}\"\nmethod = \"lower\"\n",
        pre_dir.display()
    ))
    .unwrap();
    let e = apply_init(&MorModel::new(&cfg).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.hidden_size = 48, the pretrained model has 32"),
        "{e}"
    );
    // A recursive pretrained run is refused.
    let e = {
        let rec = d.0.join("rec");
        let text = "[model]\nvocab_size = 300\nhidden_size = 32\nnum_layers = 6\nnum_heads = 4\nnum_kv_heads = 2\nhead_dim = 8\nintermediate_size = 64\nseq_len = 16\n[recursion]\nnum_recursions = 2\nsharing = \"cycle\"\n";
        let c = Config::from_toml_str(text).unwrap();
        let m = MorModel::new(&c).unwrap();
        mor_models::checkpoint::save_model(&rec, &m.named_vars(), &serde_json::json!({})).unwrap();
        std::fs::write(rec.join("config.toml"), text).unwrap();
        let cfg = target(&rec, "cycle", "lower", "").unwrap();
        apply_init(&MorModel::new(&cfg).unwrap())
            .unwrap_err()
            .to_string()
    };
    assert!(e.contains("not a vanilla model"), "{e}");
    // A folder that is neither.
    let cfg = target(&d.0.join("nothing"), "cycle", "lower", "").unwrap();
    let e = apply_init(&MorModel::new(&cfg).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("init.from") && e.contains("nothing"), "{e}");
}
