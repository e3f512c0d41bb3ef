//! Hugging Face Llama export: import(export(x)) == x (bit-identical weights, equal logits)
//! for the imported fixture, a tied-embedding model and a model with per-slot norms;
//! recursive and MoR models are refused; the output folder is written whole or not at all.
//!
//! With `MOR_HF_CHECK_DIR=DIR`, the exported folders are kept in `DIR/<name>` with mor's
//! logits in `DIR/<name>.logits.safetensors`, for `python/check_hf_export.py DIR` to load
//! them with `transformers`.

mod common;

use common::{hf_fixture as fixture, TempDir};

use candle_core::{DType, Device, Tensor};
use mor_core::config::Config;
use mor_models::hf::{export_hf, read_hf};
use mor_models::tokenizer::Tokenizer;
use mor_models::MorModel;
use mor_router::RouteMode;
use std::path::PathBuf;

fn ids(vocab: u32) -> Tensor {
    let v: Vec<u32> = (0..12u32).map(|i| (i * 37 + 5) % vocab).collect();
    Tensor::from_vec(v, (1, 12), &Device::Cpu).unwrap()
}

fn logits(model: &MorModel, ids: &Tensor) -> Tensor {
    model.forward(ids, RouteMode::Causal).unwrap().logits
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Exports `model`, imports the folder back and checks every weight bit for bit (under
/// `names`, the Llama names of the model's parameters) and the logits.
fn round_trip(name: &str, model: &MorModel, tok: &Tokenizer, names: &[(String, String)]) {
    let keep = std::env::var_os("MOR_HF_CHECK_DIR").map(PathBuf::from);
    let tmp = TempDir::new(name);
    let out = match &keep {
        Some(d) => d.join(name),
        None => tmp.0.join("hf"),
    };
    export_hf(model, tok, &out).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{name}: {f}");
    }
    let back = read_hf(&out).unwrap();
    let vars: std::collections::HashMap<String, candle_core::Var> =
        model.named_vars().into_iter().collect();
    assert_eq!(back.tensors.len(), names.len(), "{name}");
    for (mor_name, hf_name) in names {
        let a = flat(vars[mor_name].as_tensor());
        let b = flat(&back.tensors[hf_name]);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len(),
            "{name}: {mor_name} -> {hf_name} changed"
        );
    }
    let x = ids(model.config().model.vocab_size as u32);
    let want = logits(model, &x);
    let got = logits(&back.model().unwrap(), &x);
    assert_eq!(flat(&got), flat(&want), "{name}: logits changed");
    if let Some(d) = keep {
        let map = std::collections::HashMap::from([
            ("input_ids".to_string(), x.to_dtype(DType::I64).unwrap()),
            ("logits".to_string(), want),
        ]);
        candle_core::safetensors::save(&map, d.join(format!("{name}.logits.safetensors"))).unwrap();
    }
}

fn same_names(model: &MorModel) -> Vec<(String, String)> {
    model
        .named_vars()
        .into_iter()
        .map(|(n, _)| (n.clone(), n))
        .collect()
}

fn vanilla(extra: &str) -> mor_core::config::ResolvedConfig {
    Config::from_toml_str(&format!(
        "[model]\nvocab_size = 260\nhidden_size = 32\nnum_layers = 3\nnum_heads = 4\nnum_kv_heads = 2\nhead_dim = 8\nintermediate_size = 64\nseq_len = 32\n{extra}\n[recursion]\nnum_recursions = 1\nsharing = \"none\"\n"
    ))
    .unwrap()
}

#[test]
fn imported_fixture_round_trips() {
    let _ = mor_models::builtin::link();
    let imp = read_hf(&fixture()).unwrap();
    let model = imp.model().unwrap();
    round_trip("tiny", &model, &imp.tokenizer, &same_names(&model));
    // The exported config.json carries the fixture's dimensions.
    let back = read_hf(&fixture()).unwrap().hf;
    assert_eq!(back.rope_theta, 500000.0);
    assert_eq!(back.head_dim, 8);
}

#[test]
fn tied_and_untied_vanilla_models_round_trip() {
    let _ = mor_models::builtin::link();
    for (name, extra) in [
        ("tied", "tie_embeddings = true"),
        (
            "untied",
            "tie_embeddings = false\nrope_theta = 1000.0\nrms_eps = 1e-6",
        ),
    ] {
        let cfg = vanilla(extra);
        let model = MorModel::new(&cfg).unwrap();
        round_trip(name, &model, &Tokenizer::byte_level(), &same_names(&model));
    }
}

#[test]
fn per_slot_norms_become_layer_norms() {
    let _ = mor_models::builtin::link();
    let cfg = Config::from_toml_str(&format!(
        "{}\n[recursion]\nnum_recursions = 1\nsharing = \"none\"\nln_share = false\n",
        vanilla("").source["model"]
            .as_table()
            .map(|t| format!("[model]\n{t}"))
            .unwrap()
    ))
    .unwrap();
    let model = MorModel::new(&cfg).unwrap();
    // Distinct norm values, so that a norm exported to the wrong layer changes the logits.
    for (n, v) in model.named_vars() {
        if n.contains("layernorm") {
            let d = v.as_tensor().dims1().unwrap();
            let seed = n.bytes().map(u32::from).sum::<u32>() as f32;
            let w: Vec<f32> = (0..d)
                .map(|i| 1.0 + 0.01 * ((i as f32 + seed) % 17.0))
                .collect();
            v.set(&Tensor::new(w, &Device::Cpu).unwrap()).unwrap();
        }
    }
    let names: Vec<(String, String)> = model
        .named_vars()
        .into_iter()
        .map(|(n, _)| {
            let hf = match n.strip_prefix("model.slots.") {
                Some(rest) => {
                    let (slot, tail) = rest.split_once('.').unwrap();
                    let block = model.plan().slots[slot.parse::<usize>().unwrap()].block;
                    format!("model.layers.{block}.{tail}")
                }
                None => n.clone(),
            };
            (n, hf)
        })
        .collect();
    assert!(names.iter().any(|(a, b)| a != b));
    round_trip("slot_norms", &model, &Tokenizer::byte_level(), &names);
}

#[test]
fn recursive_models_and_busy_folders_are_refused() {
    let _ = mor_models::builtin::link();
    let tmp = TempDir::new("refuse");
    let base = "[model]\nvocab_size = 260\nhidden_size = 32\nnum_layers = 4\nnum_heads = 4\nnum_kv_heads = 2\nhead_dim = 8\nintermediate_size = 64\nseq_len = 32\n";
    for (what, rec) in [
        ("recursive", "[recursion]\nnum_recursions = 2\nsharing = \"cycle\"\n"),
        ("MoR", "[recursion]\nnum_recursions = 2\nsharing = \"middle_cycle\"\n[router]\nkind = \"expert_choice\"\n"),
    ] {
        let cfg = Config::from_toml_str(&format!("{base}{rec}")).unwrap();
        let model = MorModel::new(&cfg).unwrap();
        let out = tmp.0.join(what);
        let e = export_hf(&model, &Tokenizer::byte_level(), &out).unwrap_err().to_string();
        assert!(e.contains(&format!("a {what} model")) && e.contains("--format official"), "{e}");
        assert!(!out.exists());
    }
    let model = MorModel::new(&vanilla("")).unwrap();
    let out = tmp.0.join("busy");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let e = export_hf(&model, &Tokenizer::byte_level(), &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an empty folder"), "{e}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    // An empty folder is fine.
    let out = tmp.0.join("empty");
    std::fs::create_dir_all(&out).unwrap();
    export_hf(&model, &Tokenizer::byte_level(), &out).unwrap();
    assert!(out.join("model.safetensors").is_file());
    // No temporary folder is left behind.
    let left: Vec<_> = std::fs::read_dir(&tmp.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(left.is_empty());
}
