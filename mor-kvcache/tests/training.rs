//! Training semantics of the three policies (spec §4): which K/V each step attends to, the
//! contract on `fresh`/`first`, and gradients through hybrid.

use crate::common::{flat, pos_tensor, step_kv};
use candle_core::{Device, Tensor, Var};
use mor_core::rng::Rng;
use mor_kernels::PAD_POS;
use mor_kvcache::{Error, Hybrid, KvPolicy, RecursionWise, RecursiveSharing, StepKv};

fn assert_same(a: &StepKv, b: &StepKv) {
    assert_eq!(flat(&a.k), flat(&b.k));
    assert_eq!(flat(&a.v), flat(&b.v));
    assert_eq!(
        a.pos.to_vec2::<u32>().unwrap(),
        b.pos.to_vec2::<u32>().unwrap()
    );
}

fn is_invalid<T: std::fmt::Debug>(r: mor_kvcache::Result<T>) -> String {
    match r {
        Err(Error::Invalid { msg, .. }) => msg,
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
}

/// Full-sequence positions `0..l` for `b` rows.
fn full(b: usize, l: usize) -> Vec<Vec<u32>> {
    vec![(0..l as u32).collect(); b]
}

#[test]
fn recursion_wise_attends_to_fresh_at_every_step() {
    let p = RecursionWise::new(3).unwrap();
    let mut rng = Rng::new(1);
    let sel = vec![vec![0u32, 2, 5], vec![1, 3, 4]];
    for step in 1..=3 {
        assert!(p.projects_kv(step));
        let fresh = step_kv(&mut rng, 2, 4, &sel);
        let out = p
            .training_kv(step, Some(&fresh), None, &pos_tensor(&sel))
            .unwrap();
        assert_same(&out, &fresh);
        // ... which is what `trains_on_fresh_kv` promises (and lets a model fuse the step).
        assert!(p.trains_on_fresh_kv(step));
    }
    assert!(!p.keeps_first_step());
    assert!(!p.trains_on_fresh_kv(0) && !p.trains_on_fresh_kv(4));
}

#[test]
fn only_recursion_wise_trains_on_fresh_kv_alone() {
    // Sharing reads step 1's K/V at later steps and hybrid mixes it in: neither may be fused
    // into a self-attention over the fresh K/V.
    let sharing = RecursiveSharing::new(3).unwrap();
    let hybrid = Hybrid::new(3).unwrap();
    for step in 0..=4 {
        assert!(!sharing.trains_on_fresh_kv(step), "sharing, step {step}");
        assert!(!hybrid.trains_on_fresh_kv(step), "hybrid, step {step}");
    }
}

#[test]
fn recursion_wise_rejects_contract_violations() {
    let p = RecursionWise::new(2).unwrap();
    let mut rng = Rng::new(2);
    let sel = vec![vec![0u32, 1]];
    let fresh = step_kv(&mut rng, 1, 2, &sel);
    let first = step_kv(&mut rng, 1, 2, &full(1, 4));
    let s = pos_tensor(&sel);
    is_invalid(p.training_kv(1, None, None, &s));
    is_invalid(p.training_kv(2, Some(&fresh), Some(&first), &s));
    is_invalid(p.training_kv(0, Some(&fresh), None, &s));
    is_invalid(p.training_kv(3, Some(&fresh), None, &s));
    // Queries and keys must be the same tokens.
    is_invalid(p.training_kv(1, Some(&fresh), None, &pos_tensor(&[vec![0u32, 1, 2]])));
    assert!(RecursionWise::new(0).is_err());
}

#[test]
fn sharing_projects_only_at_step_one_and_reuses_it() {
    let p = RecursiveSharing::new(3).unwrap();
    assert!(p.projects_kv(1));
    assert!(!p.projects_kv(2));
    assert!(!p.projects_kv(3));
    assert!(p.keeps_first_step());
    let mut rng = Rng::new(3);
    let l = 6;
    let first = step_kv(&mut rng, 2, 3, &full(2, l));
    // Step 1: every token, fresh.
    let out = p
        .training_kv(1, Some(&first), None, &pos_tensor(&full(2, l)))
        .unwrap();
    assert_same(&out, &first);
    // Steps 2 and 3: the selected queries attend to the full step-1 context.
    for (step, sel) in [
        (2, vec![vec![0u32, 2, 5], vec![1, 3, 4]]),
        (3, vec![vec![5u32], vec![1]]),
    ] {
        let out = p
            .training_kv(step, None, Some(&first), &pos_tensor(&sel))
            .unwrap();
        assert_same(&out, &first);
        assert_eq!(out.pos.to_vec2::<u32>().unwrap(), full(2, l));
    }
}

#[test]
fn kv_reuse_never_reads_a_step_that_was_never_written() {
    let mut rng = Rng::new(4);
    let l = 4;
    let first = step_kv(&mut rng, 1, 2, &full(1, l));
    let sel = vec![vec![1u32, 3]];
    let fresh = step_kv(&mut rng, 1, 2, &sel);
    let all = pos_tensor(&full(1, l));
    let s = pos_tensor(&sel);
    let sharing = RecursiveSharing::new(2).unwrap();
    let hybrid = Hybrid::new(2).unwrap();
    // Step 1 has no earlier step: `first` must not be passed.
    is_invalid(sharing.training_kv(1, Some(&first), Some(&first), &all));
    is_invalid(hybrid.training_kv(1, Some(&first), Some(&first), &all));
    // A later step needs the step-1 K/V.
    is_invalid(sharing.training_kv(2, None, None, &s));
    is_invalid(hybrid.training_kv(2, Some(&fresh), None, &s));
    // Sharing projects nothing at step 2; hybrid needs its fresh K/V.
    is_invalid(sharing.training_kv(2, Some(&fresh), Some(&first), &s));
    is_invalid(hybrid.training_kv(2, None, Some(&first), &s));
    // A selected position that step 1 never stored (first skips position 3).
    let gappy = step_kv(&mut rng, 1, 2, &[vec![0u32, 1, 2, 4]]);
    let msg = is_invalid(hybrid.training_kv(2, Some(&fresh), Some(&gappy), &s));
    assert!(msg.contains("never written"), "{msg}");
}

#[test]
fn hybrid_is_first_with_selected_positions_overwritten() {
    let p = Hybrid::new(3).unwrap();
    assert!(p.projects_kv(1) && p.projects_kv(2) && p.projects_kv(3));
    assert!(p.keeps_first_step());
    let mut rng = Rng::new(5);
    let (b, h, l, dh) = (2, 2, 6, 3);
    let first = step_kv(&mut rng, h, dh, &full(b, l));
    // Row 1 is padded: its last entry overwrites nothing.
    let sel = vec![vec![1u32, 3, 4], vec![0, 5, PAD_POS]];
    let n = sel[0].len();
    let fresh = step_kv(&mut rng, h, dh, &sel);
    let out = p
        .training_kv(2, Some(&fresh), Some(&first), &pos_tensor(&sel))
        .unwrap();
    assert_eq!(out.k.dims(), &[b, h, l, dh]);
    assert_eq!(out.pos.to_vec2::<u32>().unwrap(), full(b, l));
    for (o, f1, fr) in [
        (flat(&out.k), flat(&first.k), flat(&fresh.k)),
        (flat(&out.v), flat(&first.v), flat(&fresh.v)),
    ] {
        for bi in 0..b {
            for hi in 0..h {
                for j in 0..l {
                    let src = match sel[bi].iter().position(|&p| p == j as u32) {
                        Some(i) => &fr[((bi * h + hi) * n + i) * dh..][..dh],
                        None => &f1[((bi * h + hi) * l + j) * dh..][..dh],
                    };
                    assert_eq!(
                        &o[((bi * h + hi) * l + j) * dh..][..dh],
                        src,
                        "row {bi} head {hi} pos {j}"
                    );
                }
            }
        }
    }
    // Step 1 returns the fresh full-sequence K/V.
    let out1 = p
        .training_kv(1, Some(&first), None, &pos_tensor(&full(b, l)))
        .unwrap();
    assert_same(&out1, &first);
}

#[test]
fn hybrid_rejects_mismatched_fresh_and_unsorted_selection() {
    let p = Hybrid::new(2).unwrap();
    let mut rng = Rng::new(6);
    let first = step_kv(&mut rng, 1, 2, &full(1, 5));
    let fresh = step_kv(&mut rng, 1, 2, &[vec![1u32, 3]]);
    // fresh holds positions 1, 3 but the queries are 1, 4.
    is_invalid(p.training_kv(2, Some(&fresh), Some(&first), &pos_tensor(&[vec![1u32, 4]])));
    let unsorted = step_kv(&mut rng, 1, 2, &[vec![3u32, 1]]);
    is_invalid(p.training_kv(
        2,
        Some(&unsorted),
        Some(&first),
        &pos_tensor(&[vec![3u32, 1]]),
    ));
}

/// Gradients of `loss = Σ out.k · wk + Σ out.v · wv` reach `fresh` at the selected
/// positions and `first` everywhere else, exactly (the map is a row selection).
#[test]
fn hybrid_gradients_flow_to_fresh_and_first() {
    let p = Hybrid::new(2).unwrap();
    let mut rng = Rng::new(7);
    let (b, h, l, dh) = (2, 2, 5, 3);
    let sel = vec![vec![0u32, 3], vec![2, 4]];
    let n = 2;
    let dev = Device::Cpu;
    let f1 = step_kv(&mut rng, h, dh, &full(b, l));
    let fr = step_kv(&mut rng, h, dh, &sel);
    let (f1k, f1v) = (
        Var::from_tensor(&f1.k).unwrap(),
        Var::from_tensor(&f1.v).unwrap(),
    );
    let (frk, frv) = (
        Var::from_tensor(&fr.k).unwrap(),
        Var::from_tensor(&fr.v).unwrap(),
    );
    let first = StepKv {
        k: f1k.as_tensor().clone(),
        v: f1v.as_tensor().clone(),
        pos: f1.pos.clone(),
    };
    let fresh = StepKv {
        k: frk.as_tensor().clone(),
        v: frv.as_tensor().clone(),
        pos: fr.pos.clone(),
    };
    let wk_data = crate::common::uniform(&mut rng, b * h * l * dh);
    let wv_data = crate::common::uniform(&mut rng, b * h * l * dh);
    let wk = Tensor::from_vec(wk_data.clone(), (b, h, l, dh), &dev).unwrap();
    let wv = Tensor::from_vec(wv_data.clone(), (b, h, l, dh), &dev).unwrap();
    let out = p
        .training_kv(2, Some(&fresh), Some(&first), &pos_tensor(&sel))
        .unwrap();
    let loss = ((&out.k * &wk).unwrap().sum_all().unwrap()
        + (&out.v * &wv).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    for (first_var, fresh_var, w) in [(&f1k, &frk, &wk_data), (&f1v, &frv, &wv_data)] {
        let g1 = flat(
            grads
                .get(first_var.as_tensor())
                .expect("no gradient for first"),
        );
        let gf = flat(
            grads
                .get(fresh_var.as_tensor())
                .expect("no gradient for fresh"),
        );
        for bi in 0..b {
            for hi in 0..h {
                for j in 0..l {
                    let at = ((bi * h + hi) * l + j) * dh;
                    let selected = sel[bi].contains(&(j as u32));
                    let want: Vec<f64> = if selected {
                        vec![0.0; dh]
                    } else {
                        w[at..at + dh].to_vec()
                    };
                    assert_eq!(
                        &g1[at..at + dh],
                        &want[..],
                        "first grad row {bi} head {hi} pos {j}"
                    );
                }
                for i in 0..n {
                    let j = sel[bi][i] as usize;
                    let want = &w[((bi * h + hi) * l + j) * dh..][..dh];
                    assert_eq!(
                        &gf[((bi * h + hi) * n + i) * dh..][..dh],
                        want,
                        "fresh grad row {bi} head {hi} token {i}"
                    );
                }
            }
        }
    }
}
