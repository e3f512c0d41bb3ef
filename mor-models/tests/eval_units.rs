//! `evaluate_nll`, `evaluate_mc` and `depth_trace` against values computed independently:
//! the NLL from the forward's logits with a naive f64 log-softmax, closed forms for a model
//! whose LM head is zero (every token has probability 1/V), multiple-choice items whose
//! `acc` and `acc_norm` differ by construction, and depth traces against the forward's
//! depths and causality.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{Micro, MOR_RECURSION};
use mor_core::config::ResolvedConfig;
use mor_models::eval::{depth_trace, evaluate_mc, evaluate_nll, EvalBatch, McItem};
use mor_models::model::MorModel;
use mor_router::RouteMode;

const V: usize = 32;
const SEQ: usize = 12;

fn config(router: &str) -> ResolvedConfig {
    Micro {
        runtime: &common::runtime("cpu", 5),
        tables: &format!("{MOR_RECURSION}\n[router]\nkind = \"{router}\""),
        ..common::micro(V, 16, 5, SEQ)
    }
    .resolve()
}

fn model(router: &str) -> MorModel {
    MorModel::new(&config(router)).unwrap()
}

fn ids(n: usize, seed: u64) -> Vec<u32> {
    common::random_ids(n, V, seed)
}

fn batch(b: usize, t: usize, seed: u64, bytes: u64, labels: bool) -> EvalBatch {
    let difficulty = labels.then(|| {
        let mut r = mor_core::rng::Rng::new(seed + 100);
        (0..b * t).map(|_| r.below(3) as u8).collect()
    });
    EvalBatch {
        inputs: ids(b * t, seed),
        targets: ids(b * t, seed + 1),
        b,
        t,
        bytes,
        difficulty,
    }
}

/// Sets every weight of `v` to zero.
fn zero(v: &Var) {
    v.set(&v.as_tensor().zeros_like().unwrap()).unwrap();
}

/// Per-token NLL of one batch from the forward's logits, with a naive f64 log-softmax.
fn naive_nll(m: &MorModel, b: &EvalBatch, mode: RouteMode) -> (Vec<f64>, Vec<Vec<u8>>) {
    let x = Tensor::from_vec(b.inputs.clone(), (b.b, b.t), &Device::Cpu).unwrap();
    let out = m.forward(&x, mode).unwrap();
    let logits = out.logits.to_dtype(candle_core::DType::F64).unwrap();
    let logits = logits.to_vec3::<f64>().unwrap();
    let mut nll = Vec::new();
    for (r, row) in logits.iter().enumerate() {
        for (i, l) in row.iter().enumerate() {
            let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + l.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            nll.push(lse - l[b.targets[r * b.t + i] as usize]);
        }
    }
    (nll, out.depths)
}

#[test]
fn evaluate_nll_is_the_token_mean_of_a_naive_log_softmax() {
    for router in ["expert_choice", "token_choice"] {
        let m = model(router);
        // Two batches of different sizes: the mean is over tokens, not over batches.
        let batches = [batch(2, 12, 1, 100, true), batch(1, 5, 7, 23, true)];
        for mode in [RouteMode::Causal, RouteMode::FullSequence] {
            let r = evaluate_nll(&m, &batches, mode).unwrap();
            let mut all = Vec::new();
            let mut hist = [0u64; 3];
            let mut by_label = [(0f64, 0u64); 3];
            for b in &batches {
                let (nll, depths) = naive_nll(&m, b, mode);
                all.extend(nll);
                for (row, ds) in depths.iter().enumerate() {
                    for (i, &d) in ds.iter().enumerate() {
                        assert!((1..=3).contains(&d), "{router}: depth {d}");
                        hist[d as usize - 1] += 1;
                        let lab = b.difficulty.as_ref().unwrap()[row * b.t + i] as usize;
                        by_label[lab].0 += d as f64;
                        by_label[lab].1 += 1;
                    }
                }
            }
            let what = format!("{router}/{mode:?}");
            assert_eq!(r.tokens, 29, "{what}");
            let total: f64 = all.iter().sum();
            let mean = total / 29.0;
            // f32 logits: the per-token NLLs are rounded to f32 in one path only.
            assert!(
                (r.nll - mean).abs() < 1e-5 * mean,
                "{what}: {} vs {mean}",
                r.nll
            );
            let bpb = total / std::f64::consts::LN_2 / 123.0;
            let got = r.bits_per_byte.unwrap();
            assert!((got - bpb).abs() < 1e-5 * bpb, "{what}: {got} vs {bpb}");
            let want: Vec<f64> = hist.iter().map(|&c| c as f64 / 29.0).collect();
            assert_eq!(r.depth_fractions, want, "{what}");
            assert_eq!(r.depth_by_difficulty.len(), 3, "{what}");
            for (lab, &(sum, n)) in by_label.iter().enumerate() {
                let (mean_depth, count) = r.depth_by_difficulty[lab];
                assert_eq!(count, n, "{what}: label {lab}");
                assert!(
                    (mean_depth - sum / n as f64).abs() < 1e-12,
                    "{what}: label {lab}: {mean_depth} vs {}",
                    sum / n as f64
                );
            }
            assert!(r.router_stats.is_some(), "{what}");
        }
    }
}

/// With a zero LM head every logit is 0: each token costs exactly ln V nats, and the bits
/// per byte are `tokens log2 V / bytes`.
#[test]
fn evaluate_nll_of_uniform_logits_is_ln_v() {
    let m = model("expert_choice");
    zero(m.lm_head_weight());
    let batches = [batch(2, 12, 3, 48, false), batch(1, 7, 9, 0, false)];
    let r = evaluate_nll(&m, &batches, RouteMode::Causal).unwrap();
    assert_eq!(r.tokens, 31);
    let ln_v = (V as f64).ln();
    assert!((r.nll - ln_v).abs() < 1e-6, "{} vs {ln_v}", r.nll);
    let bpb = 31.0 * (V as f64).log2() / 48.0;
    let got = r.bits_per_byte.unwrap();
    assert!((got - bpb).abs() < 1e-6 * bpb, "{got} vs {bpb}");
    assert!(r.depth_by_difficulty.is_empty());
    let none = evaluate_nll(&m, &[batch(1, 4, 2, 0, false)], RouteMode::Causal).unwrap();
    assert_eq!(none.bits_per_byte, None, "no byte counts, no bits per byte");
}

/// Uniform logits: a choice of `n` tokens scores `-n ln V`, so `acc` picks the shortest
/// choice and `acc_norm` the one with the fewest tokens per byte. The items are built so
/// that the two disagree.
#[test]
fn evaluate_mc_scores_acc_and_acc_norm_by_their_definitions() {
    let m = model("expert_choice");
    zero(m.lm_head_weight());
    let choices = vec![vec![3u32], vec![4, 5, 6]];
    // Scores -ln V and -3 ln V; per byte -ln V / 1 and -3 ln V / 30 = -0.1 ln V.
    let item = |gold: usize| McItem {
        context: vec![1, 2, 7],
        choices: choices.clone(),
        choice_bytes: vec![1, 30],
        gold,
    };
    // acc right for gold 0 only, acc_norm for gold 1 only.
    let r = evaluate_mc(&m, &[item(0), item(1), item(1)]).unwrap();
    assert_eq!(r.items, 3);
    assert!((r.acc - 1.0 / 3.0).abs() < 1e-12, "{r:?}");
    assert!((r.acc_norm - 2.0 / 3.0).abs() < 1e-12, "{r:?}");
}

/// On a trained-from-init model: the summed log-likelihood of each choice given the
/// context, from a naive log-softmax over the causal forward of `context ++ choice`.
#[test]
fn evaluate_mc_agrees_with_naive_choice_likelihoods() {
    let m = model("expert_choice");
    let mut items = Vec::new();
    for s in 0..6u64 {
        let choices: Vec<Vec<u32>> = (0..3)
            .map(|c| ids(1 + c + (s as usize % 2), 50 + 7 * s + c as u64))
            .collect();
        items.push(McItem {
            context: ids(4 + s as usize, 10 + s),
            choice_bytes: choices.iter().map(|c| 2 + 5 * c.len() % 7).collect(),
            choices,
            gold: (s % 3) as usize,
        });
    }
    let (mut acc, mut accn) = (0usize, 0usize);
    for it in &items {
        let mut ll = Vec::new();
        for ch in &it.choices {
            let seq: Vec<u32> = it.context.iter().chain(ch).copied().collect();
            let b = EvalBatch {
                inputs: seq[..seq.len() - 1].to_vec(),
                targets: seq[1..].to_vec(),
                b: 1,
                t: seq.len() - 1,
                bytes: 0,
                difficulty: None,
            };
            let (nll, _) = naive_nll(&m, &b, RouteMode::Causal);
            ll.push(-nll[nll.len() - ch.len()..].iter().sum::<f64>());
        }
        let best = |v: &[f64]| {
            let mut i = 0;
            for j in 1..v.len() {
                if v[j] > v[i] {
                    i = j;
                }
            }
            // No near-ties: the f32 forward and this f64 sum pick the same choice.
            for j in 0..v.len() {
                assert!(j == i || (v[i] - v[j]).abs() > 1e-4, "near tie {v:?}");
            }
            i
        };
        let normed: Vec<f64> = ll
            .iter()
            .zip(&it.choice_bytes)
            .map(|(l, &nb)| l / nb as f64)
            .collect();
        acc += (best(&ll) == it.gold) as usize;
        accn += (best(&normed) == it.gold) as usize;
    }
    let r = evaluate_mc(&m, &items).unwrap();
    assert_eq!(r.items, 6);
    assert_eq!(r.acc, acc as f64 / 6.0, "{r:?}");
    assert_eq!(r.acc_norm, accn as f64 / 6.0, "{r:?}");
}

/// `depth_trace` is the causal forward's depth row, truncated to the context; causal
/// routing gives each prefix the trace's prefix.
#[test]
fn depth_trace_is_the_causal_forwards_depths() {
    for router in ["expert_choice", "token_choice"] {
        let m = model(router);
        let row = ids(SEQ, 21);
        let trace = depth_trace(&m, &row).unwrap();
        let x = Tensor::from_vec(row.clone(), (1, SEQ), &Device::Cpu).unwrap();
        let depths = m.forward(&x, RouteMode::Causal).unwrap().depths;
        assert_eq!(trace, depths[0], "{router}");
        assert!(
            trace.iter().all(|d| (1..=3).contains(d)),
            "{router}: {trace:?}"
        );
        assert!(
            trace.iter().any(|&d| d != trace[0]),
            "{router}: routing gives every token the same depth {trace:?}"
        );
        // Longer than the context: the first SEQ tokens only.
        let mut long = row.clone();
        long.extend(ids(5, 22));
        assert_eq!(depth_trace(&m, &long).unwrap(), trace, "{router}");
        // Causal: a prefix's trace is the trace's prefix.
        for k in [1, 4, 9] {
            assert_eq!(
                depth_trace(&m, &row[..k]).unwrap(),
                trace[..k],
                "{router}: prefix {k}"
            );
        }
    }
}
