//! Hugging Face Llama import: the tiny fixture made by `python/make_hf_fixture.py` gives
//! transformers' logits, every storage variant (bf16, f16, sharded) reads the same weights,
//! and every bad input is refused naming its file and tensor with nothing written.

mod common;

use common::{hf_fixture as fixture, TempDir};

use candle_core::{DType, Device, Tensor};
use mor_models::hf::{read_hf, HfImport};
use mor_router::RouteMode;
use std::collections::HashMap;

fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap()
}

/// A copy of the fixture folder with `tensors` as its weights and `config` (edited JSON).
fn variant(
    tag: &str,
    tensors: &HashMap<String, Tensor>,
    edit: impl FnOnce(&mut serde_json::Value),
) -> TempDir {
    let d = TempDir::new(tag);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(d.0.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(fixture().join("tokenizer.json"), d.0.join("tokenizer.json")).unwrap();
    candle_core::safetensors::save(tensors, d.0.join("model.safetensors")).unwrap();
    d
}

fn logits(imp: &HfImport, ids: &Tensor) -> Vec<f32> {
    let _ = mor_models::builtin::link();
    let model = imp.model().unwrap();
    let out = model.forward(ids, RouteMode::Causal).unwrap();
    out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn reference() -> (Tensor, Vec<f32>) {
    let r = candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu)
        .unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = r["logits"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (ids, logits)
}

/// max |a − b| / max |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    worst / scale
}

#[test]
fn imported_fixture_gives_transformers_logits() {
    let _ = mor_models::builtin::link();
    let imp = read_hf(&fixture()).unwrap();
    let m = &imp.config.model;
    // head_dim 8 != hidden 64 / 4 heads; GQA 4/2; untied head; non-default theta and eps.
    assert_eq!(
        (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim),
        (64, 4, 2, 8)
    );
    assert_eq!(
        (m.rope_theta, m.rms_eps, m.tie_embeddings),
        (500000.0, 1e-6, false)
    );
    assert_eq!(imp.config.plan.num_blocks, 2);
    let (ids, want) = reference();
    let got = logits(&imp, &ids);
    let d = rel_diff(&got, &want);
    eprintln!("max relative logit difference to transformers: {d:e}");
    assert!(
        d < 1e-5,
        "imported logits differ from transformers' by {d:e} (relative)"
    );
    // The comparison can fail: a swapped pair of heads (wrong GQA/RoPE layout) is seen.
    let mut t = fixture_tensors();
    let q = &t["model.layers.0.self_attn.q_proj.weight"];
    let swapped = Tensor::cat(
        &[
            q.narrow(0, 8, 8).unwrap(),
            q.narrow(0, 0, 8).unwrap(),
            q.narrow(0, 16, 16).unwrap(),
        ],
        0,
    )
    .unwrap();
    t.insert("model.layers.0.self_attn.q_proj.weight".into(), swapped);
    let v = variant("swapped", &t, |_| {});
    let d = rel_diff(&logits(&read_hf(&v.0).unwrap(), &ids), &want);
    assert!(d > 1e-3, "a swapped head went unseen ({d:e})");
}

#[test]
fn half_precision_weights_are_converted_to_f32() {
    let f32s = fixture_tensors();
    for (tag, dt) in [("bf16", DType::BF16), ("f16", DType::F16)] {
        let half: HashMap<String, Tensor> = f32s
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(dt).unwrap()))
            .collect();
        let v = variant(tag, &half, |c| c["dtype"] = tag.into());
        let imp = read_hf(&v.0).unwrap();
        for (name, t) in &half {
            let want = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = imp.tensors[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got, want, "{tag} {name}");
            assert_eq!(imp.tensors[name].dtype(), DType::F32);
        }
        // Rounded weights still give logits close to the reference.
        let (ids, want) = reference();
        let d = rel_diff(&logits(&imp, &ids), &want);
        assert!(d < 5e-2 && d > 0.0, "{tag}: {d:e}");
    }
}

fn write_sharded(tag: &str, drop_shard: bool) -> TempDir {
    let d = variant(tag, &fixture_tensors(), |_| {});
    std::fs::remove_file(d.0.join("model.safetensors")).unwrap();
    let t = fixture_tensors();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (n, x) in t {
        let (shard, file) = if n.contains("layers.1") || n == "lm_head.weight" {
            (&mut b, "model-00002-of-00002.safetensors")
        } else {
            (&mut a, "model-00001-of-00002.safetensors")
        };
        map.insert(n.clone(), file.into());
        shard.insert(n, x);
    }
    candle_core::safetensors::save(&a, d.0.join("model-00001-of-00002.safetensors")).unwrap();
    if !drop_shard {
        candle_core::safetensors::save(&b, d.0.join("model-00002-of-00002.safetensors")).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(d.0.join("model.safetensors.index.json"), index.to_string()).unwrap();
    d
}

#[test]
fn sharded_weights_read_like_a_single_file() {
    let single = read_hf(&fixture()).unwrap();
    let d = write_sharded("sharded", false);
    let sharded = read_hf(&d.0).unwrap();
    assert_eq!(single.tensors.len(), sharded.tensors.len());
    for (n, t) in &single.tensors {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = sharded.tensors[n]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "{n}");
    }
    let d = write_sharded("missing-shard", true);
    let e = read_hf(&d.0).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors.index.json")
            && e.contains("model-00002-of-00002.safetensors")
            && e.contains("absent"),
        "{e}"
    );
}

fn refusal(
    tag: &str,
    tensors: &HashMap<String, Tensor>,
    edit: impl FnOnce(&mut serde_json::Value),
) -> String {
    let v = variant(tag, tensors, edit);
    let out = v.0.join("run");
    let e = match read_hf(&v.0) {
        Ok(imp) => imp.write_run(&out).map(|_| ()).unwrap_err(),
        Err(e) => e,
    }
    .to_string();
    assert!(!out.exists(), "{tag}: the output folder was written");
    e
}

#[test]
fn bad_inputs_are_refused_naming_file_and_tensor() {
    let t = fixture_tensors();
    let e = refusal("type", &t, |c| c["model_type"] = "gpt2".into());
    assert!(
        e.contains("config.json") && e.contains("\"gpt2\"") && e.contains("\"llama\""),
        "{e}"
    );
    let e = refusal("sliding", &t, |c| {
        c["model_type"] = "mistral".into();
        c["sliding_window"] = 4096.into();
    });
    assert!(e.contains("sliding_window"), "{e}");
    let e = refusal("scaling", &t, |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
    });
    assert!(e.contains("rope_scaling") && e.contains("llama3"), "{e}");

    let mut m = t.clone();
    m.remove("model.layers.1.mlp.up_proj.weight");
    let e = refusal("missing", &m, |_| {});
    assert!(
        e.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"),
        "{e}"
    );

    let mut m = t.clone();
    m.insert(
        "model.layers.2.mlp.up_proj.weight".into(),
        t["model.layers.1.mlp.up_proj.weight"].clone(),
    );
    let e = refusal("extra", &m, |_| {});
    assert!(
        e.contains("model.safetensors")
            && e.contains("unexpected tensor `model.layers.2.mlp.up_proj.weight`"),
        "{e}"
    );

    let mut m = t.clone();
    m.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((8, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = refusal("shape", &m, |_| {});
    assert!(e.contains("`model.layers.0.self_attn.k_proj.weight` has shape [8, 64], config.json needs [16, 64]"), "{e}");

    let mut m = t.clone();
    let mut w = t["model.norm.weight"].to_vec1::<f32>().unwrap();
    w[3] = f32::NAN;
    w[5] = f32::INFINITY;
    m.insert(
        "model.norm.weight".into(),
        Tensor::new(w, &Device::Cpu).unwrap(),
    );
    let e = refusal("nan", &m, |_| {});
    assert!(
        e.contains("`model.norm.weight` has 2 NaN or infinite"),
        "{e}"
    );

    // A vocabulary smaller than the tokenizer's (256 tokens) cannot hold every id.
    let mut m = t.clone();
    for n in ["model.embed_tokens.weight", "lm_head.weight"] {
        m.insert(n.into(), t[n].narrow(0, 0, 200).unwrap());
    }
    let e = refusal("vocab", &m, |c| c["vocab_size"] = 200.into());
    assert!(
        e.contains("tokenizer.json") && e.contains("256 tokens") && e.contains("vocab_size 200"),
        "{e}"
    );

    // A tied config with a head that is not the embedding.
    let e = refusal("tied", &t, |c| c["tie_word_embeddings"] = true.into());
    assert!(
        e.contains("lm_head.weight") && e.contains("tie_word_embeddings"),
        "{e}"
    );
}

#[test]
fn run_folder_is_written_whole_and_reloads() {
    let _ = mor_models::builtin::link();
    let imp = read_hf(&fixture()).unwrap();
    let d = TempDir::new("run");
    let out = d.0.join("imported");
    imp.write_run(&out).unwrap();
    for f in [
        "config.toml",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "manifest.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    mor_models::checkpoint::verify_files(
        &out,
        &[
            "config.toml",
            "config.json",
            "model.safetensors",
            "tokenizer.json",
        ],
        true,
    )
    .unwrap();
    let cfg = mor_core::config::Config::from_path(&out.join("config.toml")).unwrap();
    assert_eq!(cfg.model, imp.config.model);
    let model = mor_models::MorModel::new(&cfg).unwrap();
    mor_models::checkpoint::load_model(&out, &model.named_vars()).unwrap();
    let (ids, want) = reference();
    let got = model
        .forward(&ids, RouteMode::Causal)
        .unwrap()
        .logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(rel_diff(&got, &want) < 1e-5);
    // A non-empty output folder is refused and left as it was.
    let e = imp.write_run(&out).unwrap_err().to_string();
    assert!(e.contains("not an empty folder"), "{e}");
}
