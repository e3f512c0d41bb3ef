//! Model invariants: gradients reach every parameter, tied parameters share one storage,
//! N_r = 1 equals vanilla, save → load is exact, causality, and a tiny model overfits.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{Micro, VANILLA};
use mor_core::config::ResolvedConfig;
use mor_models::model::MorModel;
use mor_models::optim::{AdamW, AdamWConfig};
use mor_router::RouteMode;

/// `tables`: the `[recursion]` table and what the model needs beyond it.
fn cfg(tables: &str) -> ResolvedConfig {
    Micro {
        runtime: &common::runtime("cpu", 3),
        tables,
        ..common::micro(64, 32, 5, 16)
    }
    .resolve()
}

fn vanilla() -> ResolvedConfig {
    cfg(&format!("[recursion]\n{VANILLA}\n"))
}

fn recursive(n: usize, sharing: &str) -> ResolvedConfig {
    cfg(&format!(
        "[recursion]\nnum_recursions = {n}\nsharing = {{ kind = \"{sharing}\" }}\n"
    ))
}

fn mor(router: &str, kv: &str) -> ResolvedConfig {
    cfg(&format!(
        "[recursion]\nnum_recursions = 3\nsharing = {{ kind = \"middle_cycle\" }}\n[router]\nkind = \"{router}\"\n[kv]\nkind = \"{kv}\"\n"
    ))
}

fn ids(b: usize, t: usize, seed: u64) -> Tensor {
    common::id_tensor(b, t, 64, seed)
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    for (name, c) in [
        ("vanilla", vanilla()),
        ("recursive-mcyc", recursive(3, "middle_cycle")),
        ("recursive-seq", recursive(2, "sequence")),
        ("mor-expert", mor("expert_choice", "recursion_wise")),
        (
            "mor-expert-share",
            mor("expert_choice", "recursive_sharing"),
        ),
        ("mor-token", mor("token_choice", "recursion_wise")),
    ] {
        let model = MorModel::new(&c).unwrap();
        let x = ids(2, 16, 1);
        let y = ids(2, 16, 2);
        let out = model.forward(&x, RouteMode::Train).unwrap();
        let mut loss = MorModel::cross_entropy(&out.logits, &y).unwrap();
        if let Some(r) = &out.router.loss {
            loss = (loss + r).unwrap();
        }
        let grads = loss.backward().unwrap();
        for (n, v) in model.named_vars() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
            let sq = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                sq.is_finite() && sq > 0.0,
                "{name}: gradient of {n} has squared norm {sq}"
            );
        }
    }
}

/// `forward_loss` (LM head and loss as one fused op on the cpu backend) gives the loss and
/// the gradients of `cross_entropy(forward(..).logits)`, for the model families.
#[test]
fn forward_loss_equals_cross_entropy_of_the_logits() {
    for (name, c) in [
        ("vanilla", vanilla()),
        ("recursive-mcyc", recursive(3, "middle_cycle")),
        ("mor-expert", mor("expert_choice", "recursion_wise")),
        ("mor-token", mor("token_choice", "recursion_wise")),
    ] {
        let model = MorModel::new(&c).unwrap();
        let (x, y) = (ids(2, 16, 5), ids(2, 16, 6));
        let out = model.forward(&x, RouteMode::Train).unwrap();
        let a = MorModel::cross_entropy(&out.logits, &y).unwrap();
        let fused = model.forward_loss(&x, &y, RouteMode::Train).unwrap();
        let (la, lb) = (
            a.to_scalar::<f32>().unwrap(),
            fused.ce.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (la - lb).abs() < 1e-5 * la.abs().max(1.0),
            "{name}: {la} vs {lb}"
        );
        assert_eq!(out.depths, fused.depths, "{name}: same routing");
        let (ga, gb) = (a.backward().unwrap(), fused.ce.backward().unwrap());
        for (n, v) in model.named_vars() {
            let (p, q) = (ga.get(v.as_tensor()), gb.get(v.as_tensor()));
            let (Some(p), Some(q)) = (p, q) else {
                assert!(
                    p.is_none() && q.is_none(),
                    "{name}: {n} has a gradient in one only"
                );
                continue;
            };
            let scale = p
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = (p - q)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-4 * scale.max(1e-3),
                "{name}: {n} differs by {diff} (scale {scale})"
            );
        }
    }
}

/// Regression test for the lost weight tie of the reference implementation (spec §8,
/// [I#17]): shared attention and MLP projections must be one storage per unique block.
#[test]
fn tied_parameters_share_one_storage() {
    let c = recursive(3, "middle_cycle");
    let model = MorModel::new(&c).unwrap();
    let plan = model.plan();
    // 1 + B_d + 1 unique blocks for 1 + 3·B_d + 1 slots.
    assert_eq!(plan.num_slots(), 2 + 3 * plan.base_depth);
    assert_eq!(model.blocks().len(), plan.num_blocks);
    assert_eq!(plan.num_blocks, 2 + plan.base_depth);
    let mut ids: Vec<_> = model
        .named_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().id())
        .collect();
    let n = ids.len();
    ids.sort_by_key(|i| format!("{i:?}"));
    ids.dedup();
    assert_eq!(ids.len(), n, "a parameter is listed twice");
    // Parameter count equals the accounting of unique blocks (spec §1.4).
    let acct = mor_core::accounting::report(&c).unwrap();
    let total: usize = model
        .named_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count())
        .sum();
    assert_eq!(
        total as u64,
        acct.non_embedding_params + acct.embedding_params
    );
    // Changing one shared block changes the output of every slot that uses it: perturbing
    // block 1 (used at steps 1, 2 and 3) must change the logits, and the gradient of its q
    // projection equals the sum of three per-slot contributions — checked by comparing the
    // analytic gradient with a central finite difference of one entry in f64.
    let model = MorModel::new_with(&c, DType::F64, Device::Cpu).unwrap();
    let x = ids_f(1, 8);
    let q = model.blocks()[1].q.clone();
    let f = |m: &MorModel| -> f64 {
        let out = m.forward(&x, RouteMode::Train).unwrap();
        out.logits
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let out = model.forward(&x, RouteMode::Train).unwrap();
    let g = out
        .logits
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gq = g
        .get(q.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = q
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let eps = 1e-6;
    for i in [0usize, 7, 33] {
        let mut p = base.clone();
        p[i] += eps;
        q.set(&Tensor::from_vec(p.clone(), q.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let lp = f(&model);
        p[i] -= 2.0 * eps;
        q.set(&Tensor::from_vec(p, q.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let lm = f(&model);
        q.set(&Tensor::from_vec(base.clone(), q.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let num = (lp - lm) / (2.0 * eps);
        assert!(
            (num - gq[i]).abs() <= 1e-5 * num.abs().max(1e-3),
            "entry {i}: analytic {} numeric {num}",
            gq[i]
        );
    }
}

/// Flattened logits of one forward.
fn logits(m: &MorModel, x: &Tensor, mode: RouteMode) -> Vec<f32> {
    m.forward(x, mode)
        .unwrap()
        .logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn ids_f(b: usize, t: usize) -> Tensor {
    ids(b, t, 9)
}

#[test]
fn recursive_with_one_recursion_equals_vanilla() {
    let v = MorModel::new(&vanilla()).unwrap();
    let r = MorModel::new(&recursive(1, "middle_cycle")).unwrap();
    assert_eq!(r.plan().num_slots(), v.plan().num_slots());
    // Copy the weights by name, so equality does not rest on the initialisation.
    let src: std::collections::HashMap<String, Tensor> = v
        .named_vars()
        .into_iter()
        .map(|(n, x)| (n, x.as_tensor().clone()))
        .collect();
    for (n, x) in r.named_vars() {
        x.set(src.get(&n).unwrap_or_else(|| panic!("vanilla has no {n}")))
            .unwrap();
    }
    let x = ids(2, 16, 4);
    let a = logits(&v, &x, RouteMode::Train);
    let b = logits(&r, &x, RouteMode::Train);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(worst == 0.0, "max |vanilla - recursive(N_r=1)| = {worst}");
}

/// AdamW at lr 1e-2 over every parameter of `m`, decay applied to all.
fn adamw(m: &MorModel, weight_decay: f64) -> AdamW {
    let cfg = AdamWConfig {
        lr: 1e-2,
        betas: (0.9, 0.95),
        eps: 1e-8,
        weight_decay,
    };
    AdamW::new(
        cfg,
        m.named_vars()
            .into_iter()
            .map(|(n, v)| (n, v, true))
            .collect(),
    )
    .unwrap()
}

#[test]
fn save_then_load_gives_identical_logits() {
    let c = mor("expert_choice", "recursion_wise");
    let a = MorModel::new(&c).unwrap();
    // Train one step so the weights differ from the initialisation.
    let mut opt = adamw(&a, 0.1);
    let x = ids(2, 16, 5);
    let out = a.forward(&x, RouteMode::Train).unwrap();
    let loss = MorModel::cross_entropy(&out.logits, &ids(2, 16, 6)).unwrap();
    opt.step(&loss.backward().unwrap(), 1e-2).unwrap();
    let dir = std::env::temp_dir().join(format!("mor-save-load-{}", std::process::id()));
    mor_models::checkpoint::save_model(&dir, &a.named_vars(), &serde_json::json!({})).unwrap();
    let mut c2 = c.clone();
    c2.seed += 1; // a different initialisation, overwritten by the load
    let b = MorModel::new(&c2).unwrap();
    mor_models::checkpoint::load_model(&dir, &b.named_vars()).unwrap();
    let la = logits(&a, &x, RouteMode::Causal);
    let lb = logits(&b, &x, RouteMode::Causal);
    assert_eq!(la, lb);
    // A file of another config is refused, naming the mismatch.
    let other = MorModel::new(&vanilla()).unwrap();
    let err = mor_models::checkpoint::load_model(&dir, &other.named_vars())
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not match the config"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A future token must not change an earlier logit, for every model family, under causal
/// routing (and for models without a router, under any routing).
#[test]
fn causal_paths_are_causal() {
    for (name, c, mode) in [
        ("vanilla", vanilla(), RouteMode::Train),
        ("recursive", recursive(2, "middle_cycle"), RouteMode::Train),
        (
            "mor-expert",
            mor("expert_choice", "recursion_wise"),
            RouteMode::Causal,
        ),
        (
            "mor-expert-share",
            mor("expert_choice", "recursive_sharing"),
            RouteMode::Causal,
        ),
        (
            "mor-expert-hybrid",
            mor("expert_choice", "hybrid"),
            RouteMode::Causal,
        ),
        (
            "mor-token",
            mor("token_choice", "recursion_wise"),
            RouteMode::Causal,
        ),
        (
            "mor-token-share",
            mor("token_choice", "recursive_sharing"),
            RouteMode::Train,
        ),
    ] {
        let m = MorModel::new(&c).unwrap();
        let x = ids(1, 16, 7);
        let mut v = x.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        let a = m
            .forward(&x, mode)
            .unwrap()
            .logits
            .to_vec3::<f32>()
            .unwrap();
        v[12] = (v[12] + 1) % 64;
        let x2 = Tensor::from_vec(v, (1, 16), &Device::Cpu).unwrap();
        let b = m
            .forward(&x2, mode)
            .unwrap()
            .logits
            .to_vec3::<f32>()
            .unwrap();
        for t in 0..12 {
            assert_eq!(
                a[0][t], b[0][t],
                "{name}: position {t} changed when token 12 changed"
            );
        }
    }
}

#[test]
fn tiny_model_overfits_one_batch() {
    // A fixed batch of 2 × 16 tokens; 80 AdamW steps at lr 1e-2 must take the loss from
    // ln(64) ≈ 4.16 below 0.5.
    let c = mor("expert_choice", "recursion_wise");
    let m = MorModel::new(&c).unwrap();
    let mut opt = adamw(&m, 0.0);
    let x = ids(2, 16, 11);
    let y = ids(2, 16, 12);
    let mut first = 0.0;
    let mut last = 0.0;
    for step in 0..80 {
        let out = m.forward(&x, RouteMode::Train).unwrap();
        let ce = MorModel::cross_entropy(&out.logits, &y).unwrap();
        let loss = match &out.router.loss {
            Some(r) => (&ce + r).unwrap(),
            None => ce.clone(),
        };
        let v = ce.to_scalar::<f32>().unwrap();
        if step == 0 {
            first = v;
        }
        last = v;
        opt.step(&loss.backward().unwrap(), 1e-2).unwrap();
    }
    assert!((first - (64f32).ln()).abs() < 0.3, "initial loss {first}");
    assert!(last < 0.5, "loss after 80 steps: {last} (from {first})");
}
