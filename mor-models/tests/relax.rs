//! Relaxation of the shared weights per recursion depth (spec §6, relaxation table):
//! recursion encoding and LoRA. An untrained relaxation equals the base model; a LoRA
//! shared by every depth equals the base model with merged weights; an encoding of step 1
//! on a plan without a prelude equals a shifted embedding; gradients of the relaxation
//! parameters against central finite differences in f64; checkpoints round-trip them.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::Micro;
use mor_core::config::ResolvedConfig;
use mor_models::model::MorModel;
use mor_router::RouteMode;

const LORA: &str = "relaxation = { kind = \"lora\", rank = 2, alpha = 3.0, targets = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"] }";
const ENCODING: &str = "relaxation = { kind = \"recursion_encoding\" }";

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
            for relax in [LORA, ENCODING] {
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
            for relax in [LORA, ENCODING] {
                let m = model(&config("middle_cycle", relax, router, backend));
                // Non-zero B, so that A has a gradient.
                randomize(&m, 5, 0.2);
                let n = fd_check(&m, &format!("{router} {backend} {relax}"));
                assert!(n >= 3 * 6, "{n}");
            }
        }
    }
}

#[test]
fn checkpoints_round_trip_the_relaxation() {
    let dir = std::env::temp_dir().join(format!("mor-relax-ckpt-{}", std::process::id()));
    let cfg = config(
        "middle_cycle",
        LORA,
        "kind = \"expert_choice\"",
        "reference",
    );
    let a = model(&cfg);
    randomize(&a, 11, 0.2);
    mor_models::checkpoint::save_run_model(&dir, &a, &serde_json::json!({})).unwrap();
    let b = model(&cfg);
    assert!(max_diff(&logits(&a), &logits(&b)) > 1e-4);
    mor_models::checkpoint::load_run_model(&dir, &b).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    for ((na, va), (nb, vb)) in relax_vars(&a).iter().zip(relax_vars(&b).iter()) {
        assert_eq!(na, nb);
        let (x, y) = (
            va.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            vb.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        );
        assert_eq!(x, y, "{na}");
    }
    assert_eq!(logits(&a), logits(&b));
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
    for relax in [LORA, ENCODING] {
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
        for relax in [LORA, ENCODING] {
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
            if relax == LORA {
                // 6 recursion slots (3 steps × 2 layers), L = 12 tokens each: 2·rank·(in+out)
                // per target, q 16→16, k/v 16→8 (absent at steps 2, 3 under sharing), o 16→16.
                let full = 2 * 2 * ((16 + 16) + 2 * (16 + 8) + (16 + 16));
                let shared = 2 * 2 * ((16 + 16) + (16 + 16));
                let expect = if kv.is_empty() {
                    6 * full
                } else {
                    2 * full + 4 * shared
                };
                assert_eq!(r.flops_per_token - base.flops_per_token, expect as f64);
            } else {
                assert_eq!(r.flops_per_token, base.flops_per_token);
            }
        }
    }
}
