//! Relaxation of the shared weights per recursion depth (spec §6.4, relaxation table):
//! recursion encoding, LoRA, DoRA and adaption prompt. An untrained relaxation equals the
//! base model; a LoRA shared by every depth equals the base model with merged weights; an
//! encoding of step 1 on a plan without a prelude equals a shifted embedding; DoRA and the
//! adaption prompt equal a naive per-token reference (DoRA's `W'_r` built explicitly, the
//! prefix attention as a loop per query); gradients of the relaxation parameters against
//! central finite differences in f64; checkpoints round-trip them; the decode engine honours
//! them.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{rmsnorm, rope, Micro};
use mor_core::config::ResolvedConfig;
use mor_models::model::MorModel;
use mor_router::RouteMode;

const LORA: &str = "relaxation = { kind = \"lora\", rank = 2, alpha = 3.0, targets = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"] }";
const ENCODING: &str = "relaxation = { kind = \"recursion_encoding\" }";
const DORA: &str = "relaxation = { kind = \"dora\", rank = 2, alpha = 3.0, targets = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"] }";
const PROMPT: &str = "relaxation = { kind = \"adaption_prompt\", prompt_len = 3 }";

/// A micro MoR config: 8 layers, middle_cycle (or `sharing`) with N_r = 3, the given
/// relaxation line (empty: none) and router table body (empty: no router).
fn config(sharing: &str, relax: &str, router: &str, backend: &str) -> ResolvedConfig {
    config_with(sharing, relax, router, backend, "")
}

/// As [`config`], with further `[model]` keys.
fn config_with(
    sharing: &str,
    relax: &str,
    router: &str,
    backend: &str,
    model_keys: &str,
) -> ResolvedConfig {
    let router = if router.is_empty() {
        String::new()
    } else {
        format!("\n[router]\n{router}")
    };
    Micro {
        runtime: &common::runtime(backend, 7),
        tables: &format!(
            "[recursion]\nnum_recursions = 3\nsharing = {{ kind = \"{sharing}\" }}\n{relax}{router}"
        ),
        model: model_keys,
        ..common::micro(32, 16, 8, 12)
    }
    .resolve()
}

fn model(cfg: &ResolvedConfig) -> MorModel {
    MorModel::new_with(cfg, DType::F64, Device::Cpu).unwrap()
}

fn ids(seed: u64) -> Tensor {
    common::id_tensor(2, 12, 32, seed)
}

fn logits(m: &MorModel) -> Vec<f64> {
    m.forward(&ids(1), RouteMode::Train)
        .unwrap()
        .logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn random(shape: &[usize], seed: u64, std: f64) -> Vec<f64> {
    mor_core::rng::Rng::new(seed)
        .normal_vec(shape.iter().product(), std)
        .into_iter()
        .map(f64::from)
        .collect()
}

fn set(v: &Var, data: Vec<f64>) {
    v.set(&Tensor::from_vec(data, v.shape(), v.device()).unwrap())
        .unwrap();
}

fn relax_vars(m: &MorModel) -> Vec<(String, Var)> {
    m.named_vars()
        .into_iter()
        .filter(|(n, _)| n.starts_with("model.relax."))
        .collect()
}

/// Sets every relaxation parameter to N(0, std) values.
fn randomize(m: &MorModel, seed: u64, std: f64) {
    for (i, (_, v)) in relax_vars(m).iter().enumerate() {
        set(v, random(v.dims(), seed + i as u64, std));
    }
}

#[test]
fn names_and_shapes_of_the_relaxation_parameters() {
    let m = model(&config("middle_cycle", LORA, "", "reference"));
    let names: Vec<(String, Vec<usize>)> = relax_vars(&m)
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    // 8 layers, middle_cycle N_r = 3: prelude 1, coda 1, a cycle of 2 blocks (1, 2);
    // 3 steps × 2 layers × 4 targets × (A, B). d = 16, 4 heads of 4 (q 16), 2 KV heads (8).
    assert_eq!(names.len(), 3 * 2 * 4 * 2, "{names:?}");
    let find = |n: &str| names.iter().find(|x| x.0 == n).map(|x| x.1.clone());
    assert_eq!(find("model.relax.lora.1.1.q_proj.A"), Some(vec![2, 16]));
    assert_eq!(find("model.relax.lora.1.1.q_proj.B"), Some(vec![16, 2]));
    assert_eq!(find("model.relax.lora.3.2.k_proj.B"), Some(vec![8, 2]));
    assert_eq!(find("model.relax.lora.2.2.v_proj.A"), Some(vec![2, 16]));
    assert_eq!(find("model.relax.lora.2.1.o_proj.A"), Some(vec![2, 16]));
    assert_eq!(find("model.relax.lora.2.1.o_proj.B"), Some(vec![16, 2]));
    // A is N(0, init_std) (non-zero), B is zero.
    let v = relax_vars(&m);
    let a = &v.iter().find(|x| x.0.ends_with("q_proj.A")).unwrap().1;
    assert!(a
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .any(|&x| x != 0.0));
    let e = model(&config("middle_cycle", ENCODING, "", "reference"));
    let enc: Vec<(String, Vec<usize>)> = relax_vars(&e)
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    assert_eq!(
        enc,
        (1..=3)
            .map(|r| (format!("model.relax.encoding.{r}"), vec![16]))
            .collect::<Vec<_>>()
    );
}

#[test]
fn an_untrained_relaxation_equals_the_base_model() {
    for router in ["", "kind = \"expert_choice\"", "kind = \"token_choice\""] {
        for backend in ["reference", "cpu"] {
            let base = logits(&model(&config("middle_cycle", "", router, backend)));
            for relax in [LORA, ENCODING, DORA, PROMPT] {
                let m = model(&config("middle_cycle", relax, router, backend));
                let d = max_diff(&base, &logits(&m));
                assert!(d < 1e-12, "{router} {backend} {relax}: {d:e}");
                randomize(&m, 3, 0.3);
                let d = max_diff(&base, &logits(&m));
                assert!(
                    d > 1e-4,
                    "{router} {backend} {relax}: trained differs ({d:e})"
                );
            }
        }
    }
}

/// With the same (A, B) at every depth, `W + (alpha/rank) B A` is again one shared weight:
/// the relaxed model equals the base model with merged weights.
#[test]
fn a_lora_shared_by_every_depth_equals_merged_weights() {
    for router in ["", "kind = \"expert_choice\""] {
        let relaxed = model(&config("middle_cycle", LORA, router, "reference"));
        let base = model(&config("middle_cycle", "", router, "reference"));
        let scale = 3.0 / 2.0;
        let block_of = |name: &str, b: usize| format!("model.layers.{b}.self_attn.{name}.weight");
        let vars = relaxed.named_vars();
        let get = |n: &str| vars.iter().find(|x| x.0 == n).unwrap().1.clone();
        let base_vars = base.named_vars();
        for block in [1usize, 2] {
            for (ti, t) in ["q_proj", "k_proj", "v_proj", "o_proj"].iter().enumerate() {
                let a1 = get(&format!("model.relax.lora.1.{block}.{t}.A"));
                let b1 = get(&format!("model.relax.lora.1.{block}.{t}.B"));
                let seed = 100 + 10 * block as u64 + ti as u64;
                let a = random(a1.dims(), seed, 0.3);
                let b = random(b1.dims(), seed + 5000, 0.3);
                for step in 1..=3 {
                    set(
                        &get(&format!("model.relax.lora.{step}.{block}.{t}.A")),
                        a.clone(),
                    );
                    set(
                        &get(&format!("model.relax.lora.{step}.{block}.{t}.B")),
                        b.clone(),
                    );
                }
                // W += scale · B A, naive loops.
                let (rank, d_in) = (a1.dims()[0], a1.dims()[1]);
                let d_out = b1.dims()[0];
                let w = &base_vars
                    .iter()
                    .find(|x| x.0 == block_of(t, block))
                    .unwrap()
                    .1;
                let mut wv = w.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                for o in 0..d_out {
                    for i in 0..d_in {
                        let s: f64 = (0..rank).map(|k| b[o * rank + k] * a[k * d_in + i]).sum();
                        wv[o * d_in + i] += scale * s;
                    }
                }
                set(w, wv);
            }
        }
        let d = max_diff(&logits(&base), &logits(&relaxed));
        assert!(d < 1e-10, "{router}: {d:e}");
    }
}

/// On a cycle plan (no prelude) the state entering step 1 is the embedding: an encoding of
/// step 1 alone equals adding it to every embedding row.
#[test]
fn the_step_one_encoding_shifts_the_embedding() {
    // An untied LM head: the shift must not reach it.
    let untied = "tie_embeddings = false";
    let relaxed = model(&config_with("cycle", ENCODING, "", "reference", untied));
    let base = model(&config_with("cycle", "", "", "reference", untied));
    let e = random(&[16], 9, 0.5);
    set(&relax_vars(&relaxed)[0].1, e.clone());
    assert_eq!(relax_vars(&relaxed)[0].0, "model.relax.encoding.1");
    let emb = base.embedding();
    let mut ev = emb.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for (i, x) in ev.iter_mut().enumerate() {
        *x += e[i % 16];
    }
    set(emb, ev);
    let d = max_diff(&logits(&base), &logits(&relaxed));
    assert!(d < 1e-12, "{d:e}");
    // Step 2's encoding is not step 1's: moving it there changes the logits.
    set(&relax_vars(&relaxed)[0].1, vec![0.0; 16]);
    set(&relax_vars(&relaxed)[1].1, e);
    assert!(max_diff(&logits(&base), &logits(&relaxed)) > 1e-4);
}

const EPS: f64 = 1e-5;
const TOL: f64 = 1e-6;

fn loss(m: &MorModel) -> (Tensor, Vec<Vec<u8>>) {
    let out = m.forward(&ids(1), RouteMode::Train).unwrap();
    let ce = MorModel::cross_entropy(&out.logits, &ids(2)).unwrap();
    let l = match &out.router.loss {
        Some(r) => (ce + r).unwrap(),
        None => ce,
    };
    (l, out.depths)
}

/// Every coordinate of the encodings and 6 of each LoRA matrix against central differences.
fn fd_check(m: &MorModel, what: &str) -> usize {
    let (l0, depths0) = loss(m);
    let grads = l0.backward().unwrap();
    let mut rng = mor_core::rng::Rng::new(17);
    let mut checked = 0;
    for (name, v) in relax_vars(m) {
        let base = v.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let ana = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let mut coords: Vec<usize> = (0..base.len()).collect();
        rng.shuffle(&mut coords);
        coords.truncate(6);
        for &i in &coords {
            let at = |x: f64| {
                let mut p = base.clone();
                p[i] = x;
                set(&v, p);
                let (l, depths) = loss(m);
                assert_eq!(depths, depths0, "{what}: {name}[{i}] changed the routing");
                l.to_scalar::<f64>().unwrap()
            };
            let num = (at(base[i] + EPS) - at(base[i] - EPS)) / (2.0 * EPS);
            set(&v, base.clone());
            let err = (num - ana[i]).abs() / num.abs().max(ana[i].abs()).max(1e-3);
            assert!(
                err < TOL,
                "{what}: {name}[{i}]: analytic {} vs numeric {num} ({err:e})",
                ana[i]
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn relaxation_gradients_match_finite_differences() {
    for router in ["", "kind = \"expert_choice\""] {
        for backend in ["reference", "cpu"] {
            for relax in [LORA, ENCODING, DORA, PROMPT] {
                let m = model(&config("middle_cycle", relax, router, backend));
                // Non-zero B (and gates), so that A (and the prefix) have a gradient.
                randomize(&m, 5, 0.2);
                let n = fd_check(&m, &format!("{router} {backend} {relax}"));
                assert!(n >= 3 * 6, "{n}");
            }
        }
    }
}

#[test]
fn checkpoints_round_trip_the_relaxation() {
    for (i, relax) in [LORA, DORA, PROMPT].into_iter().enumerate() {
        let dir = std::env::temp_dir().join(format!("mor-relax-ckpt-{}-{i}", std::process::id()));
        let cfg = config(
            "middle_cycle",
            relax,
            "kind = \"expert_choice\"",
            "reference",
        );
        let a = model(&cfg);
        randomize(&a, 11, 0.2);
        mor_models::checkpoint::save_run_model(&dir, &a, &serde_json::json!({})).unwrap();
        let b = model(&cfg);
        assert!(max_diff(&logits(&a), &logits(&b)) > 1e-4, "{relax}");
        let loaded = mor_models::checkpoint::load_run_model(&dir, &b);
        std::fs::remove_dir_all(&dir).unwrap();
        loaded.unwrap();
        assert_eq!(relax_vars(&a).len(), relax_vars(&b).len());
        for ((na, va), (nb, vb)) in relax_vars(&a).iter().zip(relax_vars(&b).iter()) {
            assert_eq!(na, nb);
            let (x, y) = (
                va.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                vb.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            );
            assert_eq!(x, y, "{na}");
        }
        assert_eq!(logits(&a), logits(&b), "{relax}");
    }
}

/// Sets every relaxation parameter of an f32 model to N(0, std) values.
fn randomize_f32(m: &MorModel, seed: u64, std: f64) {
    for (i, (_, v)) in relax_vars(m).iter().enumerate() {
        let t = Tensor::from_vec(
            random(v.dims(), seed + i as u64, std),
            v.shape(),
            v.device(),
        )
        .unwrap()
        .to_dtype(v.dtype())
        .unwrap();
        v.set(&t).unwrap();
    }
}

/// Relaxed f32 models with non-zero relaxation parameters, for the decode engine.
fn engine_cases() -> Vec<(String, MorModel)> {
    let _ = mor_models::builtin::link();
    let mut out = Vec::new();
    let sharing_kv = "[kv]\nkind = \"recursive_sharing\"\n";
    for relax in [LORA, ENCODING, DORA, PROMPT] {
        for (name, sharing, extra, router) in [
            ("recursive", "middle_cycle", "", ""),
            ("expert", "middle_cycle", "", "kind = \"expert_choice\""),
            (
                "token/sharing",
                "middle_cycle",
                sharing_kv,
                "kind = \"token_choice\"",
            ),
            ("sequence", "middle_sequence", "", ""),
        ] {
            let cfg = config(sharing, &format!("{relax}\n{extra}"), router, "cpu");
            let m = MorModel::new(&cfg).unwrap();
            randomize_f32(&m, 21, 0.3);
            out.push((format!("{name} {relax}"), m));
        }
    }
    out
}

#[test]
fn the_decoder_honours_the_relaxation() {
    use mor_models::engine::{DecodeOptions, Decoder};
    for (name, m) in engine_cases() {
        let ids = common::random_ids(2 * 12, 32, 9);
        let t = Tensor::from_vec(ids.clone(), (2, 12), &Device::Cpu).unwrap();
        let full = m.forward(&t, RouteMode::Causal).unwrap();
        let want = full.logits.to_vec3::<f32>().unwrap();
        let mut worst = 0f32;
        for row in 0..2 {
            let mut dec = Decoder::new(&m, DecodeOptions::default()).unwrap();
            for pos in 0..12 {
                let step = dec.step(ids[row * 12 + pos]).unwrap();
                assert_eq!(step.depth, full.depths[row][pos] as usize, "{name}");
                for (a, b) in step.logits.iter().zip(&want[row][pos]) {
                    worst = worst.max((a - b).abs());
                }
            }
        }
        assert!(worst < 1e-4, "{name}: decode vs forward {worst}");
    }
}

#[test]
fn depthwise_batching_of_a_relaxed_model_equals_sequential_decoding() {
    use mor_models::engine::{
        Batching, DecodeOptions, Engine, EngineConfig, FinishReason, Request,
    };
    for (name, m) in engine_cases() {
        let mut rng = mor_core::rng::Rng::new(5);
        let reqs: Vec<Request> = (0..9)
            .map(|i| {
                let plen = 1 + rng.below(5);
                Request::greedy(common::random_ids(plen, 32, 50 + i), 1 + rng.below(6))
            })
            .collect();
        let want = common::decode_each(&m, &reqs, &DecodeOptions::default());
        let ecfg = EngineConfig {
            batch_size: 8,
            block_tokens: 4,
            batching: Batching::DepthWise,
            ..Default::default()
        };
        let mut engine = Engine::new(&m, ecfg).unwrap();
        for rq in &reqs {
            engine.submit(rq.clone()).unwrap();
        }
        let done = engine.run_to_completion().unwrap();
        assert_eq!(done.len(), reqs.len());
        for (i, (c, w)) in done.iter().zip(&want).enumerate() {
            assert!(
                !matches!(c.finish, FinishReason::Error(_)),
                "{name}: {:?}",
                c.finish
            );
            assert_eq!((&c.tokens, &c.depths), (&w.0, &w.1), "{name}: request {i}");
        }
        if name.starts_with("expert") {
            assert!(
                engine.stats().mixed_depth_calls > 0,
                "{name}: no block call mixed depths"
            );
        }
    }
}

/// The accounting counts exactly the parameters the model lists, with and without KV
/// sharing (whose steps >= 2 have no K/V adapters).
#[test]
fn accounting_counts_the_listed_relaxation_parameters() {
    for kv in ["", "[kv]\nkind = \"recursive_sharing\"\n"] {
        for relax in [LORA, ENCODING, DORA, PROMPT] {
            let cfg = config("middle_cycle", &format!("{relax}\n{kv}"), "", "reference");
            let m = model(&cfg);
            let listed: usize = relax_vars(&m).iter().map(|(_, v)| v.elem_count()).sum();
            let r = mor_core::accounting::report(&cfg).unwrap();
            assert_eq!(r.relaxation_params as usize, listed, "{kv} {relax}");
            let base =
                mor_core::accounting::report(&config("middle_cycle", kv, "", "reference")).unwrap();
            assert_eq!(r.total_params, base.total_params + listed as u64);
            // The forward runs under either policy; untrained it is the base model.
            let plain = model(&config("middle_cycle", kv, "", "reference"));
            assert!(
                max_diff(&logits(&m), &logits(&plain)) < 1e-12,
                "{kv} {relax}"
            );
            randomize(&m, 4, 0.3);
            assert!(
                max_diff(&logits(&m), &logits(&plain)) > 1e-4,
                "{kv} {relax}"
            );
            // 6 recursion slots (3 steps × 2 layers), L = 12 tokens each. LoRA: 2·rank·(in+out)
            // per target, q 16→16, k/v 16→8 (absent at steps 2, 3 under sharing), o 16→16;
            // DoRA adds one multiply per output; the prompt 2·2·d_a·P.
            let (full, shared, outs_full, outs_shared) = (
                2 * 2 * ((16 + 16) + 2 * (16 + 8) + (16 + 16)),
                2 * 2 * ((16 + 16) + (16 + 16)),
                16 + 2 * 8 + 16,
                16 + 16,
            );
            let per_slot = |shared_step: bool| match relax {
                LORA if shared_step => shared,
                LORA => full,
                DORA if shared_step => shared + outs_shared,
                DORA => full + outs_full,
                PROMPT => 2 * 2 * 16 * 3,
                _ => 0,
            };
            let expect = if kv.is_empty() {
                6 * per_slot(false)
            } else {
                2 * per_slot(false) + 4 * per_slot(true)
            };
            assert_eq!(
                r.flops_per_token - base.flops_per_token,
                expect as f64,
                "{kv} {relax}"
            );
            // Parameters in closed form: DoRA = LoRA + d_out per target and slot; the prompt
            // P·d + n_head per slot.
            let lora_params = |shared_step: bool| {
                if shared_step {
                    2 * ((16 + 16) + (16 + 16))
                } else {
                    2 * ((16 + 16) + 2 * (16 + 8) + (16 + 16))
                }
            };
            let params = |shared_step: bool| match relax {
                LORA => lora_params(shared_step),
                DORA if shared_step => lora_params(true) + outs_shared,
                DORA => lora_params(false) + outs_full,
                PROMPT => 3 * 16 + 4,
                _ => 0,
            };
            let expect = if relax == ENCODING {
                3 * 16
            } else if kv.is_empty() {
                6 * params(false)
            } else {
                2 * params(false) + 4 * params(true)
            };
            assert_eq!(listed, expect, "{kv} {relax}");
        }
    }
}

#[test]
fn names_and_shapes_of_dora_and_prompt_parameters() {
    let m = model(&config("middle_cycle", DORA, "", "reference"));
    let names: Vec<(String, Vec<usize>)> = relax_vars(&m)
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    // 3 steps × 2 layers × 4 targets × (A, B, m).
    assert_eq!(names.len(), 3 * 2 * 4 * 3, "{names:?}");
    let find = |n: &str| names.iter().find(|x| x.0 == n).map(|x| x.1.clone());
    assert_eq!(find("model.relax.dora.1.1.q_proj.A"), Some(vec![2, 16]));
    assert_eq!(find("model.relax.dora.1.1.q_proj.B"), Some(vec![16, 2]));
    assert_eq!(find("model.relax.dora.1.1.q_proj.m"), Some(vec![16]));
    assert_eq!(find("model.relax.dora.3.2.k_proj.m"), Some(vec![8]));
    assert_eq!(find("model.relax.dora.2.1.o_proj.m"), Some(vec![16]));
    // m starts at the row norms of the shared weight.
    let vars = m.named_vars();
    let get = |n: &str| {
        vars.iter()
            .find(|x| x.0 == n)
            .unwrap()
            .1
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let w = get("model.layers.2.self_attn.k_proj.weight");
    let norms: Vec<f64> = w
        .chunks(16)
        .map(|r| r.iter().map(|x| x * x).sum::<f64>().sqrt())
        .collect();
    assert_eq!(norms.len(), 8);
    assert!(max_diff(&norms, &get("model.relax.dora.3.2.k_proj.m")) < 1e-15);
    let p = model(&config("middle_cycle", PROMPT, "", "reference"));
    let names: Vec<(String, Vec<usize>)> = relax_vars(&p)
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let mut want = Vec::new();
    for step in 1..=3 {
        for block in 1..=2 {
            want.push((
                format!("model.relax.prompt.{step}.{block}.prefix"),
                vec![3, 16],
            ));
            want.push((format!("model.relax.prompt.{step}.{block}.gate"), vec![4]));
        }
    }
    assert_eq!(names, want);
    let vars = relax_vars(&p);
    let vals = |i: usize| vars[i].1.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert!(vals(0).iter().any(|&x| x != 0.0), "prefix N(0, init_std)");
    assert!(vals(1).iter().all(|&x| x == 0.0), "gate zero");
}

/// An untrained DoRA / adaption-prompt model equals its base model in f32 too (the DoRA
/// scale `m / ‖W‖` is exactly 1, the gate exactly 0).
#[test]
fn untrained_dora_and_prompt_equal_the_base_model_in_f32() {
    let f32_logits = |m: &MorModel| -> Vec<f64> {
        m.forward(&ids(1), RouteMode::Train)
            .unwrap()
            .logits
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    for backend in ["reference", "cpu"] {
        for router in ["", "kind = \"expert_choice\""] {
            let base =
                f32_logits(&MorModel::new(&config("middle_cycle", "", router, backend)).unwrap());
            for relax in [DORA, PROMPT] {
                let m = MorModel::new(&config("middle_cycle", relax, router, backend)).unwrap();
                let d = max_diff(&base, &f32_logits(&m));
                assert!(d < 1e-6, "{backend} {router} {relax}: {d:e}");
            }
        }
    }
}

/// After the shared weights change (as an uptraining initialisation changes them), the
/// DoRA magnitudes no longer match; `reset_dora_magnitudes` makes the untrained model equal
/// its base model again.
#[test]
fn dora_magnitudes_follow_replaced_shared_weights() {
    let base = model(&config("middle_cycle", "", "", "reference"));
    let dora = model(&config("middle_cycle", DORA, "", "reference"));
    for (i, ((nb, vb), (nd, vd))) in base
        .named_vars()
        .iter()
        .zip(dora.named_vars().iter())
        .enumerate()
    {
        assert_eq!(nb, nd);
        if nb.contains("self_attn") {
            let data = random(vb.dims(), 300 + i as u64, 0.4);
            set(vb, data.clone());
            set(vd, data);
        }
    }
    assert!(max_diff(&logits(&base), &logits(&dora)) > 1e-4);
    dora.reset_dora_magnitudes().unwrap();
    assert!(max_diff(&logits(&base), &logits(&dora)) < 1e-12);
}

// ---- A naive per-token reference of a relaxed recursive model (no router) ----

type Named = std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>;

fn weights(m: &MorModel) -> Named {
    m.named_vars()
        .into_iter()
        .map(|(n, v)| {
            let t = v.as_tensor();
            (
                n,
                (
                    t.dims().to_vec(),
                    t.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                ),
            )
        })
        .collect()
}

/// `W x` for `W: [out, in]` (row-major).
fn matvec(w: &[f64], d_in: usize, x: &[f64]) -> Vec<f64> {
    w.chunks(d_in)
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

/// The effective weight of `target` at slot (step, block): `W`, or with a DoRA
/// `diag(m / ‖W + s·B A‖_row)(W + s·B A)` built explicitly.
fn effective(w: &Named, step: usize, block: usize, target: &str, scale: f64) -> (Vec<f64>, usize) {
    let (dims, base) = &w[&format!("model.layers.{block}.self_attn.{target}.weight")];
    let (d_out, d_in) = (dims[0], dims[1]);
    let key = |x: &str| format!("model.relax.dora.{step}.{block}.{target}.{x}");
    let Some((ad, a)) = w.get(&key("A")) else {
        return (base.clone(), d_in);
    };
    let (b, m) = (&w[&key("B")].1, &w[&key("m")].1);
    let rank = ad[0];
    let mut merged = base.clone();
    for o in 0..d_out {
        for i in 0..d_in {
            merged[o * d_in + i] += scale
                * (0..rank)
                    .map(|k| b[o * rank + k] * a[k * d_in + i])
                    .sum::<f64>();
        }
    }
    for o in 0..d_out {
        let row = &mut merged[o * d_in..(o + 1) * d_in];
        let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        row.iter_mut().for_each(|x| *x *= m[o] / n);
    }
    (merged, d_in)
}

/// Logits `[b][t][vocab]` of a recursive (no router) relaxed model in plain loops: every
/// token runs every slot in plan order; under `sharing` a slot of step >= 2 and layer j
/// attends to the step-1 K/V of layer j (spec §4). The adaption prompt of the slot adds, per
/// query and head, `tanh(g_h) · Σ_p softmax_p(q_h · K_p[p] / √dh) V_p[p]` with `K_p[p] =
/// W_k P[p]`, `V_p[p] = W_v P[p]` (no RoPE).
fn naive_relaxed(m: &MorModel, ids: &[Vec<u32>], sharing: bool, scale: f64) -> Vec<Vec<Vec<f64>>> {
    let c = &m.config().model;
    let (d, hq, hkv, dh, eps, theta) = (
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.rms_eps,
        c.rope_theta,
    );
    let w = weights(m);
    let get = |n: &str| &w.get(n).unwrap_or_else(|| panic!("no {n}")).1;
    let emb = get("model.embed_tokens.weight");
    let head = w.get("lm_head.weight").map_or(emb, |x| &x.1);
    let mut out = Vec::new();
    for row in ids {
        let t = row.len();
        let mut h: Vec<Vec<f64>> = row
            .iter()
            .map(|&i| emb[i as usize * d..(i as usize + 1) * d].to_vec())
            .collect();
        // Per block layer j, the step-1 K/V (roped keys).
        let mut first: std::collections::HashMap<usize, (Vec<Vec<f64>>, Vec<Vec<f64>>)> =
            Default::default();
        for s in &m.config().plan.slots {
            let b = s.block;
            let (step, lj) = match s.segment {
                mor_core::plan::Segment::Recursion { step, layer } => (step, layer),
                _ => (0, usize::MAX),
            };
            let pre = format!("model.layers.{b}");
            let x: Vec<Vec<f64>> = h
                .iter()
                .map(|v| rmsnorm(v, get(&format!("{pre}.input_layernorm.weight")), eps))
                .collect();
            let (wq, _) = effective(&w, step, b, "q_proj", scale);
            let (wk, _) = effective(&w, step, b, "k_proj", scale);
            let (wv, _) = effective(&w, step, b, "v_proj", scale);
            let (wo, o_in) = effective(&w, step, b, "o_proj", scale);
            let (keys, vals) = if sharing && step >= 2 {
                first[&lj].clone()
            } else {
                let mut ks = Vec::new();
                let mut vs = Vec::new();
                for (p, xi) in x.iter().enumerate() {
                    let k = matvec(&wk, d, xi);
                    ks.push(
                        (0..hkv)
                            .flat_map(|hh| rope(&k[hh * dh..(hh + 1) * dh], p, theta))
                            .collect(),
                    );
                    vs.push(matvec(&wv, d, xi));
                }
                (ks, vs)
            };
            if step == 1 {
                first.insert(lj, (keys.clone(), vals.clone()));
            }
            let prompt =
                w.get(&format!("model.relax.prompt.{step}.{b}.prefix"))
                    .map(|(pd, prefix)| {
                        let wk0 = get(&format!("{pre}.self_attn.k_proj.weight"));
                        let wv0 = get(&format!("{pre}.self_attn.v_proj.weight"));
                        let rows: Vec<&[f64]> = prefix.chunks(pd[1]).collect();
                        let kp: Vec<Vec<f64>> = rows.iter().map(|r| matvec(wk0, d, r)).collect();
                        let vp: Vec<Vec<f64>> = rows.iter().map(|r| matvec(wv0, d, r)).collect();
                        let gate = get(&format!("model.relax.prompt.{step}.{b}.gate")).clone();
                        (kp, vp, gate)
                    });
            let mut next = Vec::with_capacity(t);
            for p in 0..t {
                let q = matvec(&wq, d, &x[p]);
                let mut att = vec![0.0; hq * dh];
                for hh in 0..hq {
                    let kvh = hh / (hq / hkv);
                    let qh = rope(&q[hh * dh..(hh + 1) * dh], p, theta);
                    let dot = |k: &[f64]| {
                        (0..dh).map(|e| qh[e] * k[kvh * dh + e]).sum::<f64>() / (dh as f64).sqrt()
                    };
                    let sc: Vec<f64> = (0..=p).map(|j| dot(&keys[j])).collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|v| (v - mx).exp()).sum();
                    for j in 0..=p {
                        for e in 0..dh {
                            att[hh * dh + e] += (sc[j] - mx).exp() / z * vals[j][kvh * dh + e];
                        }
                    }
                    if let Some((kp, vp, gate)) = &prompt {
                        let sc: Vec<f64> = kp.iter().map(|k| dot(k)).collect();
                        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = sc.iter().map(|v| (v - mx).exp()).sum();
                        for (j, v) in vp.iter().enumerate() {
                            for e in 0..dh {
                                att[hh * dh + e] +=
                                    gate[hh].tanh() * (sc[j] - mx).exp() / z * v[kvh * dh + e];
                            }
                        }
                    }
                }
                let o = matvec(&wo, o_in, &att);
                let h1: Vec<f64> = h[p].iter().zip(&o).map(|(a, b)| a + b).collect();
                let x2 = rmsnorm(
                    &h1,
                    get(&format!("{pre}.post_attention_layernorm.weight")),
                    eps,
                );
                let ff = c.intermediate_size;
                let g = matvec(get(&format!("{pre}.mlp.gate_proj.weight")), d, &x2);
                let u = matvec(get(&format!("{pre}.mlp.up_proj.weight")), d, &x2);
                let sw: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                    .collect();
                let dn = matvec(get(&format!("{pre}.mlp.down_proj.weight")), ff, &sw);
                next.push(h1.iter().zip(&dn).map(|(a, b)| a + b).collect());
            }
            h = next;
        }
        let fw = get("model.norm.weight");
        out.push(
            h.iter()
                .map(|x| matvec(head, d, &rmsnorm(x, fw, eps)))
                .collect(),
        );
    }
    out
}

/// DoRA and the adaption prompt with random non-zero parameters (different at every depth)
/// equal the naive reference, under every sharing plan, with and without KV sharing, on
/// both backends.
#[test]
fn dora_and_prompt_equal_a_naive_reference() {
    let ids: Vec<Vec<u32>> = common::random_ids(2 * 12, 32, 1)
        .chunks(12)
        .map(<[u32]>::to_vec)
        .collect();
    let x = Tensor::from_vec(ids.concat(), (2, 12), &Device::Cpu).unwrap();
    for backend in ["reference", "cpu"] {
        for sharing in ["middle_cycle", "cycle", "middle_sequence"] {
            for kv in ["", "[kv]\nkind = \"recursive_sharing\"\n"] {
                for relax in [DORA, PROMPT] {
                    let cfg = config(sharing, &format!("{relax}\n{kv}"), "", backend);
                    let m = model(&cfg);
                    randomize(&m, 40, 0.5);
                    let got = m
                        .forward(&x, RouteMode::Train)
                        .unwrap()
                        .logits
                        .to_vec3::<f64>()
                        .unwrap();
                    let want = naive_relaxed(&m, &ids, !kv.is_empty(), 3.0 / 2.0);
                    let base = naive_relaxed(
                        &model(&config(sharing, kv, "", backend)),
                        &ids,
                        !kv.is_empty(),
                        0.0,
                    );
                    let flat = |v: &Vec<Vec<Vec<f64>>>| v.concat().concat();
                    let d = max_diff(&flat(&got), &flat(&want));
                    assert!(d < 1e-10, "{backend} {sharing} {kv} {relax}: {d:e}");
                    assert!(
                        max_diff(&flat(&got), &flat(&base)) > 1e-3,
                        "{backend} {sharing} {kv} {relax}: the relaxation changed nothing"
                    );
                }
            }
        }
    }
}

/// The official layout has no relaxation modules: its settings refuse a relaxed model by
/// name instead of writing `relaxation.enable = false` without the adapters.
#[test]
fn official_settings_refuse_a_relaxed_model() {
    use mor_models::official::official_settings;
    assert!(official_settings(&config("middle_cycle", "", "", "reference"), "x").is_ok());
    for (relax, kind) in [
        (LORA, "lora"),
        (DORA, "dora"),
        (PROMPT, "adaption_prompt"),
        (ENCODING, "recursion_encoding"),
    ] {
        let e = official_settings(&config("middle_cycle", relax, "", "reference"), "x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("recursion.relaxation") && e.contains(kind),
            "{relax}: {e}"
        );
    }
}
