//! Official layout export → import: bit-identical parameters and identical logits (MoR
//! expert-choice Middle-Cycle N_r = 2, recursive Cycle, token-choice with a loss-free bias,
//! per-slot norms), the config inferred from the written settings (JSON and YAML), and
//! each refusal of a checkpoint that does not fit (missing, unexpected, shape, NaN/Inf,
//! aliases that differ), with nothing written on a refused export.
//!
//! With `MOR_OFFICIAL_CHECK_DIR=DIR`, the exported folders are kept in `DIR/<name>` with
//! mor's logits in `DIR/<name>.logits.safetensors`, for `python/check_official_layout.py`.

mod common;

use common::TempDir;

use candle_core::{DType, Device, Tensor};
use common::{micro, Micro};
use mor_core::config::ResolvedConfig;
use mor_models::official::{
    export_official, infer_config, official_keys, parse_yaml, read_official, SETTINGS_JSON,
    SETTINGS_YAML,
};
use mor_models::tokenizer::Tokenizer;
use mor_models::MorModel;
use mor_router::RouteMode;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Vocabulary 260 (the byte tokenizer has 257 ids), hidden 16, 6 layers, context 16.
fn cfg(model: &str, tables: &str) -> ResolvedConfig {
    Micro {
        model,
        tables,
        ..micro(260, 16, 6, 16)
    }
    .resolve()
}

fn rec(n_r: usize, sharing: &str) -> String {
    format!("[recursion]\nnum_recursions = {n_r}\nsharing = {{ kind = \"{sharing}\" }}\n")
}

/// A model whose every parameter (norms included) holds distinct random values, so a
/// swapped tensor cannot go unnoticed.
fn random_model(c: &ResolvedConfig) -> MorModel {
    let model = MorModel::new(c).unwrap();
    for (name, var) in model.named_vars().into_iter().chain(model.aux_named_vars()) {
        let dims = var.as_tensor().dims().to_vec();
        let n: usize = dims.iter().product();
        let mut rng = mor_core::rng::Rng::derive(99, &name);
        let t = Tensor::from_vec(rng.normal_vec(n, 0.3), dims, &Device::Cpu).unwrap();
        var.set(&t).unwrap();
    }
    model
}

fn ids() -> Tensor {
    let v: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % 257).collect();
    Tensor::from_vec(v, (2, 12), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn params(m: &MorModel) -> Vec<(String, Vec<u32>)> {
    m.named_vars()
        .into_iter()
        .chain(m.aux_named_vars())
        .map(|(n, v)| (n, flat(v.as_tensor())))
        .collect()
}

fn logits(m: &MorModel, mode: RouteMode) -> Vec<u32> {
    flat(&m.forward(&ids(), mode).unwrap().logits)
}

/// Exports `model`, reads it back with the config given and with the config inferred,
/// and checks every parameter bit for bit and the logits in full-sequence and causal
/// mode. Returns the export folder's temp guard and path.
fn round_trip(name: &str, model: &MorModel) -> (TempDir, PathBuf) {
    let tmp = TempDir::new(name);
    let out = match std::env::var_os("MOR_OFFICIAL_CHECK_DIR") {
        Some(d) => PathBuf::from(d).join(name),
        None => tmp.0.join("official"),
    };
    let tok = Tokenizer::byte_level();
    export_official(model, &tok, &out).unwrap();
    for f in [
        "model.safetensors",
        "config.json",
        "mor_config.json",
        "mor_config.yaml",
        "tokenizer.json",
    ] {
        assert!(out.join(f).is_file(), "{name}: {f} not written");
    }
    let given = read_official(&out, Some(model.config().clone()))
        .unwrap()
        .model()
        .unwrap();
    let inferred_import = read_official(&out, None).unwrap();
    assert_eq!(
        official_keys(&inferred_import.config).unwrap(),
        official_keys(model.config()).unwrap(),
        "{name}: inferred layout"
    );
    // The YAML holds the same settings as the JSON and infers the same config.
    let yaml_text = std::fs::read_to_string(out.join(SETTINGS_YAML)).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(SETTINGS_JSON)).unwrap()).unwrap();
    assert_eq!(
        parse_yaml(&yaml_text, &out).unwrap(),
        json,
        "{name}: YAML settings"
    );
    let from_yaml = infer_config(&out, Some(&out.join(SETTINGS_YAML))).unwrap();
    assert_eq!(
        from_yaml.router, inferred_import.config.router,
        "{name}: router from YAML"
    );
    assert_eq!(
        from_yaml.plan, inferred_import.config.plan,
        "{name}: plan from YAML"
    );
    let inferred = inferred_import.model().unwrap();
    let want = params(model);
    assert_eq!(params(&given), want, "{name}: parameters (config given)");
    assert_eq!(params(&inferred), want, "{name}: parameters (inferred)");
    for mode in [RouteMode::FullSequence, RouteMode::Causal] {
        let l = logits(model, mode);
        assert_eq!(logits(&given, mode), l, "{name}: logits {mode:?}");
    }
    let l = logits(model, RouteMode::FullSequence);
    assert_eq!(
        logits(&inferred, RouteMode::FullSequence),
        l,
        "{name}: logits (inferred config)"
    );
    if std::env::var_os("MOR_OFFICIAL_CHECK_DIR").is_some() {
        let lt = model
            .forward(&ids(), RouteMode::FullSequence)
            .unwrap()
            .logits;
        let m: HashMap<String, Tensor> = [
            ("logits".to_string(), lt),
            ("ids".to_string(), ids().to_dtype(DType::I64).unwrap()),
        ]
        .into_iter()
        .collect();
        candle_core::safetensors::save(&m, out.with_extension("logits.safetensors")).unwrap();
    }
    (tmp, out)
}

#[test]
fn expert_middle_cycle_round_trip() {
    let c = cfg(
        "",
        &format!(
            "{}[router]\nkind = \"expert_choice\"\n",
            rec(2, "middle_cycle")
        ),
    );
    round_trip("expert_mc", &random_model(&c));
}

#[test]
fn recursive_cycle_round_trip() {
    let c = cfg("tie_embeddings = false", &rec(3, "cycle"));
    round_trip("recursive_cycle", &random_model(&c));
}

#[test]
fn token_choice_loss_free_and_per_slot_norms_round_trip() {
    let c = cfg(
        "",
        &format!(
            "{}ln_share = false\n[router]\nkind = \"token_choice\"\nbalancing = \"loss_free\"\n",
            rec(2, "middle_cycle")
        ),
    );
    let model = random_model(&c);
    let bias = Tensor::new(&[0.25f64, -0.5], &Device::Cpu).unwrap();
    model
        .router()
        .unwrap()
        .load_buffers(&[(mor_router::token_choice::BIAS_BUFFER.into(), bias)])
        .unwrap();
    let (_tmp, out) = round_trip("token_lf", &model);
    let back = read_official(&out, None).unwrap().model().unwrap();
    let b = match back.router().unwrap().buffers().into_iter().next() {
        Some((_, t)) => t.to_vec1::<f64>().unwrap(),
        None => panic!("no bias"),
    };
    assert_eq!(b, vec![0.25, -0.5]);
}

#[test]
fn expert_cycle_aux_router_and_vanilla_round_trip() {
    let c = cfg(
        "",
        &format!(
            "{}[router]\nkind = \"expert_choice\"\nrouter_arch = \"mlp\"\nsampling = \"aux_router\"\ncapacity = [1.0, 0.5]\nalpha = 0.2\n",
            rec(2, "cycle")
        ),
    );
    round_trip("expert_cycle_aux", &random_model(&c));
    let c = cfg("", &format!("[recursion]\n{}", common::VANILLA));
    round_trip("vanilla", &random_model(&c));
}

/// Rewrites the export at `src` into `dst` with `edit` applied to its tensors.
fn edited(src: &Path, dst: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", SETTINGS_JSON] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, dst.join("model.safetensors")).unwrap();
}

fn import_error(dir: &Path) -> String {
    read_official(dir, None).unwrap_err().to_string()
}

#[test]
fn checkpoints_that_do_not_fit_are_refused_naming_the_tensor() {
    let c = cfg(
        "",
        &format!(
            "{}[router]\nkind = \"expert_choice\"\n",
            rec(2, "middle_cycle")
        ),
    );
    let model = random_model(&c);
    let tmp = TempDir::new("bad");
    let src = tmp.0.join("src");
    export_official(&model, &Tokenizer::byte_level(), &src).unwrap();
    let q = "model.layers.2.block.0.self_attn.q_proj.weight";

    let d = tmp.0.join("missing");
    edited(&src, &d, |t| {
        t.remove(q);
    });
    let e = import_error(&d);
    assert!(e.contains(&format!("`{q}` is missing")), "{e}");

    let d = tmp.0.join("unexpected");
    edited(&src, &d, |t| {
        t.insert(
            "model.layers.9.extra".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = import_error(&d);
    assert!(e.contains("`model.layers.9.extra` is unexpected"), "{e}");

    let d = tmp.0.join("shape");
    edited(&src, &d, |t| {
        t.insert(
            "model.layers.1.mor_router.router.weight".into(),
            Tensor::zeros((16, 1), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = import_error(&d);
    assert!(
        e.contains(
            "`model.layers.1.mor_router.router.weight` has shape [16, 1], the config needs [1, 16]"
        ),
        "{e}"
    );

    let d = tmp.0.join("nan");
    edited(&src, &d, |t| {
        let mut v = t["model.norm.weight"].to_vec1::<f32>().unwrap();
        v[3] = f32::INFINITY;
        t.insert(
            "model.norm.weight".into(),
            Tensor::new(v, &Device::Cpu).unwrap(),
        );
    });
    let e = import_error(&d);
    assert!(
        e.contains("`model.norm.weight` holds a non-finite value (inf) at flat index 3"),
        "{e}"
    );

    let d = tmp.0.join("alias");
    edited(&src, &d, |t| {
        let w = (&t[q] + 1e-3).unwrap();
        t.insert(q.into(), w);
    });
    let e = import_error(&d);
    assert!(
        e.contains(&format!(
            "`{q}` differs from `model.layers.1.block.0.self_attn.q_proj.weight`"
        )),
        "{e}"
    );

    // The untouched export still loads, and a second export into it is refused.
    assert!(read_official(&src, None).is_ok());
    let e = export_official(&model, &Tokenizer::byte_level(), &src)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an empty folder"), "{e}");
}

#[test]
fn refused_export_writes_nothing() {
    let c = cfg(
        "",
        &format!("{}[router]\nkind = \"token_choice\"\n", rec(2, "cycle")),
    );
    let model = MorModel::new(&c).unwrap();
    let tmp = TempDir::new("refused");
    let out = tmp.0.join("out");
    let e = export_official(&model, &Tokenizer::byte_level(), &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("token-choice"), "{e}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(&tmp.0).unwrap().count(), 0);
}

/// An official training YAML (the released style, with comments and fields mor does not
/// use) gives the mor config of its model.
#[test]
fn official_yaml_gives_the_mor_config() {
    let tmp = TempDir::new("yaml");
    let yaml = tmp.0.join("run.yaml");
    std::fs::write(
        &yaml,
        r#"# released-style config
model: smollm
model_name_or_path: HuggingFaceTB/SmolLM-135M
model_config:
  vocab_size: 260
  hidden_size: 16
  intermediate_size: 24
  num_hidden_layers: 8
  num_attention_heads: 4
  num_key_value_heads: 2
  max_position_embeddings: 16
  tie_word_embeddings: true
precision: bf16
recursive:
  enable: true
  base_depth: null
  num_recursion: 3   # N
  sharing: middle_cycle
  ln_share: true
  initialization: random
kv_sharing:
  enable: false
relaxation:
  enable: false
  lora: {r: 16, alpha: 32}
mor:
  enable: true
  type: expert
  capacity: 1.0,0.5,0.25
  rand_router: false
  router_type: linear
  z_loss: false
  z_coeff: 1.0e-05
  temp: 1.0
  expert:
    cap_warmup_step: 0
    router_func: sigmoid
    alpha: 0.1
    sampling: aux_loss
    coeff: 0.001
    gating: weighted
"#,
    )
    .unwrap();
    let c = infer_config(&tmp.0, Some(&yaml)).unwrap();
    assert_eq!(c.plan.num_slots(), 8);
    assert_eq!(c.plan.base_depth, 2);
    assert_eq!(c.model.head_dim, 4);
    let r = c.router.as_ref().unwrap();
    assert_eq!(r.kind, "expert_choice");
    let p: mor_router::ExpertChoiceParams = mor_core::registry::parse_params(&r.params).unwrap();
    assert_eq!(p.capacities(3), vec![1.0, 0.5, 0.25]);
    assert_eq!(p.z_coeff, 1e-5);
    let keys = official_keys(&c).unwrap();
    assert_eq!(keys.len(), 1 + 8 * 9 + 3 + 2);
    assert_eq!(
        keys[10].key,
        "model.layers.1.block.0.self_attn.q_proj.weight"
    );
}

/// `tests/fixtures/official_expert_mc`: the `expert_mc` export of this file and the
/// `pytorch_model.bin` that `python/check_official_layout.py` saved from the official module
/// tree after a strict load (tied positions share one storage, as in the released
/// checkpoints). The PyTorch file reads back to the same parameters and logits as the
/// safetensors file and as the model that was exported.
#[test]
fn torch_checkpoint_with_shared_storage_reads_like_safetensors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/official_expert_mc");
    let from_bin = read_official(&dir.join("pytorch_model.bin"), None).unwrap();
    assert!(from_bin.path.ends_with("pytorch_model.bin"));
    let from_st = read_official(&dir.join("model.safetensors"), None).unwrap();
    let (a, b) = (from_bin.model().unwrap(), from_st.model().unwrap());
    assert_eq!(params(&a), params(&b));
    let c = cfg(
        "",
        &format!(
            "{}[router]\nkind = \"expert_choice\"\n",
            rec(2, "middle_cycle")
        ),
    );
    let original = random_model(&c);
    assert_eq!(params(&a), params(&original));
    assert_eq!(
        logits(&a, RouteMode::FullSequence),
        logits(&original, RouteMode::FullSequence)
    );
}
