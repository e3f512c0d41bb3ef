//! Expert-choice router: selection against a naive reference, causal independence,
//! gradients of gates and losses, warm-up, the aux BCE factor, ranking by logit and bad
//! input.

use crate::common::*;
use candle_core::{DType, Device, Tensor, Var};
use mor_core::rng::Rng;
use mor_router::expert_choice::{tokens_kept, warmup_capacity};
use mor_router::{ExpertChoiceRouter, RouteMode, Router, RouterPlugin, RoutingState, Update};
use proptest::prelude::*;

/// What a naive, loop-by-loop expert-choice forward (spec §3.1 pseudocode) produces.
struct Naive {
    /// Per step, per row: the ascending kept positions.
    selected: Vec<Vec<Vec<u32>>>,
    /// Per step: the gates of the kept tokens, row-major.
    gates: Vec<Vec<f64>>,
    /// `Σ_r mean_{candidates} BCE(z, 1[kept])`.
    bce: f64,
    /// Candidates whose `σ(z) ≥ 0.5` agreed with the target, and the candidate count.
    correct: u64,
    total: u64,
}

/// The reference forward of a linear router with sigmoid, in plain loops.
fn naive_expert(h: &[Vec<Vec<f64>>], w: &[Vec<f64>], caps: &[f64], alpha: f64, temp: f64) -> Naive {
    let (b, l) = (h.len(), h[0].len());
    let mut out = Naive {
        selected: Vec::new(),
        gates: Vec::new(),
        bce: 0.0,
        correct: 0,
        total: 0,
    };
    let mut active: Vec<Vec<u32>> = vec![(0..l as u32).collect(); b];
    for (r, wr) in w.iter().enumerate() {
        let k = ((caps[r] * l as f64).floor() as usize).max(1);
        let mut sel_rows = Vec::new();
        let mut gates = Vec::new();
        let (mut bce_sum, mut n) = (0.0, 0usize);
        for bi in 0..b {
            let z: Vec<f64> = active[bi]
                .iter()
                .map(|&t| {
                    h[bi][t as usize]
                        .iter()
                        .zip(wr)
                        .map(|(x, w)| x / temp * w)
                        .sum()
                })
                .collect();
            let g: Vec<f64> = z.iter().map(|&z| alpha * sigmoid(z)).collect();
            let mut order: Vec<usize> = (0..z.len()).collect();
            order.sort_by(|&a, &c| z[c].partial_cmp(&z[a]).unwrap().then(a.cmp(&c)));
            let mut keep: Vec<usize> = order.into_iter().take(k).collect();
            keep.sort();
            for (i, &zi) in z.iter().enumerate() {
                let t = if keep.contains(&i) { 1.0 } else { 0.0 };
                let p = sigmoid(zi);
                bce_sum += -(t * p.ln() + (1.0 - t) * (1.0 - p).ln());
                n += 1;
                out.correct += ((p >= 0.5) == (t == 1.0)) as u64;
                out.total += 1;
            }
            gates.extend(keep.iter().map(|&i| g[i]));
            sel_rows.push(keep.iter().map(|&i| active[bi][i]).collect::<Vec<u32>>());
        }
        if n > 0 {
            out.bce += bce_sum / n as f64;
        }
        active = sel_rows.clone();
        out.selected.push(sel_rows);
        out.gates.push(gates);
    }
    out
}

fn ec_case() -> impl Strategy<Value = (usize, usize, usize, usize, u64, Option<Vec<f64>>, f64)> {
    (
        1usize..4,
        1usize..24,
        1usize..5,
        1usize..5,
        any::<u64>(),
        prop_oneof![Just(1.0f64), Just(0.5)],
    )
        .prop_flat_map(|(b, l, nr, d, seed, temp)| {
            let caps = proptest::option::of(proptest::collection::vec(0.01f64..=1.0, nr));
            (
                Just(b),
                Just(l),
                Just(nr),
                Just(d),
                Just(seed),
                caps,
                Just(temp),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Nested active sets, exactly `min(|active|, max(1, floor(cap_r·L)))` kept per row,
    /// ascending indices, and selection, gates, BCE and sampling accuracy equal to the
    /// naive reference.
    #[test]
    fn expert_choice_matches_naive_reference((b, l, nr, d, seed, caps, temp) in ec_case()) {
        let caps = caps.map(|mut c| { c.sort_by(|a, b| b.partial_cmp(a).unwrap()); c });
        let cap_toml = match &caps {
            Some(c) => format!("capacity = {c:?}"),
            None => "capacity = \"auto\"".to_string(),
        };
        let caps = caps.unwrap_or_else(|| mor_router::expert_choice::auto_capacities(nr));
        let c = ctx(d, nr, l, 1.0, seed);
        let router = build("expert_choice", &format!("{cap_toml}\ntemperature = {temp:?}\naux_coeff = 0.5"), &c);
        let h = hidden(b, l, d, seed ^ 1);
        let (actives, steps, out) = forward(router.as_ref(), &h, nr, RouteMode::Train).unwrap();
        let w: Vec<Vec<f64>> = (1..=nr)
            .map(|r| host2(&var(router.as_ref(), &format!("router.{r}.w1"))).iter().map(|x| x[0]).collect())
            .collect();
        let naive = naive_expert(&host3(&h), &w, &caps, 0.1, temp);
        let mut depth = vec![0usize; b * l];
        for (r, s) in steps.iter().enumerate() {
            prop_assert_eq!(s.selected.len(), b);
            for bi in 0..b {
                let sel = &s.selected[bi];
                let act = &actives[r][bi];
                let k = act.len().min(((caps[r] * l as f64).floor() as usize).max(1));
                prop_assert_eq!(sel.len(), k, "step {} row {}", r + 1, bi);
                prop_assert!(sel.windows(2).all(|x| x[0] < x[1]), "not ascending: {:?}", sel);
                prop_assert!(sel.iter().all(|t| act.contains(t)), "not nested: {:?} ⊄ {:?}", sel, act);
                for &t in sel { depth[bi * l + t as usize] += 1; }
            }
            prop_assert_eq!(&s.selected, &naive.selected[r], "step {}", r + 1);
            prop_assert!(matches!(s.update, Update::Residual));
            let g = s.gate.as_ref().unwrap().to_vec1::<f64>().unwrap();
            prop_assert_eq!(g.len(), s.num_selected());
            for (a, e) in g.iter().zip(&naive.gates[r]) {
                prop_assert!((a - e).abs() < 1e-12, "gate {} vs {}", a, e);
            }
        }
        let loss = out.loss.unwrap().to_scalar::<f64>().unwrap();
        prop_assert!((loss - 0.5 * naive.bce).abs() < 1e-9 * (1.0 + loss.abs()), "loss {} vs {}", loss, 0.5 * naive.bce);
        let acc = out.stats.sampling_accuracy().unwrap();
        prop_assert!((acc - naive.correct as f64 / naive.total as f64).abs() < 1e-12);
        for dd in 1..=nr {
            let n = depth.iter().filter(|&&x| x == dd).count() as u64;
            prop_assert_eq!(out.stats.tokens_per_depth[dd - 1], n);
        }
        prop_assert_eq!(out.stats.tokens_depth_zero, depth.iter().filter(|&&x| x == 0).count() as u64);
        let last = &naive.selected[nr - 1];
        for p in 0..l {
            let n = last.iter().filter(|row| row.contains(&(p as u32))).count() as u64;
            prop_assert_eq!(out.stats.last_step_selected_per_position[p], n);
        }
    }

    /// In causal mode a token's decisions depend only on its own hidden state: replacing
    /// every other token leaves its depth unchanged. With the threshold rule the depth is
    /// `1 + #(leading steps r ≥ 2 with σ(z_r) ≥ 0.5)` (step 1 has capacity 1).
    #[test]
    fn causal_decisions_ignore_other_tokens(
        b in 1usize..3, l in 2usize..16, nr in 2usize..5, d in 1usize..4, seed in any::<u64>(), rule in 0usize..3,
    ) {
        let params = match rule {
            0 => "infer_rule = \"threshold\"",
            1 => "sampling = \"aux_router\"\ninfer_rule = \"aux_router\"",
            _ => "rand_router = true",
        };
        let c = ctx(d, nr, l, 1.0, seed);
        let router = build("expert_choice", params, &c);
        let h = hidden(b, l, d, seed ^ 7);
        let depth_of = |h: &Tensor, bi: usize, t: u32| -> usize {
            let mut st = router.begin(h, RouteMode::Causal).unwrap();
            let mut active: Vec<Vec<u32>> = vec![(0..l as u32).collect(); b];
            let mut depth = 0;
            for step in 1..=nr {
                let s = router.route(step, h, &active, &mut st, RouteMode::Causal).unwrap();
                if step == 1 {
                    assert_eq!(s.selected, active, "step 1 (capacity 1) keeps every token");
                }
                if s.selected[bi].contains(&t) { depth = step; }
                active = s.selected;
            }
            depth
        };
        let t = (seed % l as u64) as u32;
        let bi = (seed as usize / 7) % b;
        let d0 = depth_of(&h, bi, t);
        if rule != 2 {
            // Replace every other token (a seeded stream per position, so only token t keeps its state).
            let mut hv = host3(&h);
            let other = host3(&hidden(b, l, d, seed ^ 99));
            for x in 0..b { for p in 0..l { if (x, p) != (bi, t as usize) { hv[x][p] = other[x][p].clone(); } } }
            let flat: Vec<f64> = hv.into_iter().flatten().flatten().collect();
            let h2 = Tensor::from_vec(flat, (b, l, d), &Device::Cpu).unwrap();
            prop_assert_eq!(depth_of(&h2, bi, t), d0);
        }
        if rule == 0 {
            let hv = host3(&h);
            let mut want = 1;
            for r in 2..=nr {
                let w = host2(&var(router.as_ref(), &format!("router.{r}.w1")));
                let z: f64 = hv[bi][t as usize].iter().zip(&w).map(|(x, w)| x * w[0]).sum();
                if sigmoid(z) >= 0.5 { want = r } else { break }
            }
            prop_assert_eq!(d0, want);
        }
    }
}

/// Random per-step coefficients for `Σ_r Σ_i gate_{r,i}·c_{r,i}`.
fn gate_coeffs(router: &dyn Router, h: &Tensor, nr: usize) -> Vec<Tensor> {
    let (_, steps, _) = forward(router, h, nr, RouteMode::Train).unwrap();
    let mut rng = Rng::new(5);
    steps
        .iter()
        .map(|s| {
            let n = s.num_selected();
            Tensor::from_vec(
                (0..n).map(|_| rng.normal()).collect::<Vec<f64>>(),
                n,
                &Device::Cpu,
            )
            .unwrap()
        })
        .collect()
}

fn gate_loss(router: &dyn Router, h: &Tensor, nr: usize, c: &[Tensor]) -> Tensor {
    let (_, steps, _) = forward(router, h, nr, RouteMode::Train).unwrap();
    let mut total = Tensor::new(0f64, &Device::Cpu).unwrap();
    for (s, c) in steps.iter().zip(c) {
        total = (total + (s.gate.as_ref().unwrap() * c).unwrap().sum_all().unwrap()).unwrap();
    }
    total
}

#[test]
fn gate_gradients_match_finite_differences() {
    for arch in ["linear", "mlp", "wide_mlp"] {
        let (b, l, d, nr) = (2, 6, 3, 3);
        let c = ctx(d, nr, l, 0.7, 11);
        let router = build(
            "expert_choice",
            &format!("router_arch = \"{arch}\"\ntemperature = 0.8\nwide_mult = 3"),
            &c,
        );
        let h = Var::from_tensor(&hidden(b, l, d, 3)).unwrap();
        let coeffs = gate_coeffs(router.as_ref(), h.as_tensor(), nr);
        let vars = router.vars();
        let expect = if arch == "linear" { nr } else { 2 * nr };
        assert_eq!(vars.len(), expect, "{arch}: one weight per layer per step");
        let mut all: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
        all.push(&h);
        let worst = fd_check(
            &all,
            &|| gate_loss(router.as_ref(), h.as_tensor(), nr, &coeffs),
            1e-5,
            1e-6,
        );
        assert!(worst < 1e-6, "{arch}: {worst}");
    }
}

#[test]
fn aux_bce_and_z_loss_gradients_match_finite_differences() {
    let (b, l, d, nr) = (2, 7, 3, 3);
    let c = ctx(d, nr, l, 0.7, 12);
    for arch in ["linear", "mlp"] {
        let router = build(
            "expert_choice",
            &format!("router_arch = \"{arch}\"\naux_coeff = 0.3\nz_loss = true\nz_coeff = 0.2"),
            &c,
        );
        let h = Var::from_tensor(&hidden(b, l, d, 4)).unwrap();
        let (_, _, out) = forward(router.as_ref(), h.as_tensor(), nr, RouteMode::Train).unwrap();
        let names: Vec<&str> = out.terms.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["bce", "z"]);
        let total = out.loss.unwrap().to_scalar::<f64>().unwrap();
        assert!((total - (0.3 * out.terms[0].1 + 0.2 * out.terms[1].1)).abs() < 1e-12);
        let vars = router.vars();
        let mut all: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
        all.push(&h);
        let f = || {
            forward(router.as_ref(), h.as_tensor(), nr, RouteMode::Train)
                .unwrap()
                .2
                .loss
                .unwrap()
        };
        fd_check(&all, &f, 1e-5, 1e-6);
    }
}

#[test]
fn aux_router_trains_on_detached_states_with_its_own_vars() {
    let (b, l, d, nr) = (2, 6, 3, 3);
    let c = ctx(d, nr, l, 0.7, 13);
    let router = build(
        "expert_choice",
        "sampling = \"aux_router\"\naux_router_lr_mult = 7.5",
        &c,
    );
    assert_eq!(router.aux_lr_mult(), 7.5);
    let names: Vec<String> = router.aux_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["aux_router.1.w1", "aux_router.2.w1", "aux_router.3.w1"]
    );
    let h = Var::from_tensor(&hidden(b, l, d, 5)).unwrap();
    let (actives, steps, out) =
        forward(router.as_ref(), h.as_tensor(), nr, RouteMode::Train).unwrap();
    assert!(
        out.loss.is_none(),
        "no aux BCE and no z-loss on the main router"
    );
    let aux = out.aux_router_loss.unwrap();
    // Reference value: Σ_r mean BCE(z_aux, 1[kept]) over the step's candidates.
    let hv = host3(h.as_tensor());
    let mut want = 0.0;
    for r in 0..nr {
        let w = host2(&var(router.as_ref(), &format!("aux_router.{}.w1", r + 1)));
        let (mut s, mut n) = (0.0, 0.0);
        for bi in 0..b {
            for &t in &actives[r][bi] {
                let z: f64 = hv[bi][t as usize]
                    .iter()
                    .zip(&w)
                    .map(|(x, w)| x * w[0])
                    .sum();
                let y = if steps[r].selected[bi].contains(&t) {
                    1.0
                } else {
                    0.0
                };
                s += -(y * sigmoid(z).ln() + (1.0 - y) * (1.0 - sigmoid(z)).ln());
                n += 1.0;
            }
        }
        want += s / n;
    }
    assert!((aux.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
    let grads = aux.backward().unwrap();
    assert!(
        grads.get(h.as_tensor()).is_none(),
        "the aux router must not reach the hidden states"
    );
    for (n, v) in router.vars() {
        assert!(
            grads.get(v.as_tensor()).is_none(),
            "main var {n} got a gradient from the aux router loss"
        );
    }
    let vars = router.aux_vars();
    let all: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
    let f = || {
        forward(router.as_ref(), h.as_tensor(), nr, RouteMode::Train)
            .unwrap()
            .2
            .aux_router_loss
            .unwrap()
    };
    fd_check(&all, &f, 1e-5, 1e-6);
}

#[test]
fn aux_bce_scale_multiplies_only_the_bce_term_and_ignores_grad_accum() {
    let (b, l, d, nr) = (1, 8, 3, 2);
    let c = ctx(d, nr, l, 0.7, 14);
    let h = hidden(b, l, d, 6);
    for scale in [1.0, 16.0] {
        let r = build(
            "expert_choice",
            &format!("aux_bce_scale = {scale:?}\nz_loss = true"),
            &c,
        );
        let base = forward(r.as_ref(), &h, nr, RouteMode::Train).unwrap().2;
        // The trainer's accumulation factor no longer enters the router's loss: the BCE
        // factor is the explicit parameter (spec §3.3).
        r.set_grad_accum(64);
        let out = forward(r.as_ref(), &h, nr, RouteMode::Train).unwrap().2;
        let (bce, z) = (base.terms[0].1, base.terms[1].1);
        let want = scale * 0.001 * bce + 1e-3 * z;
        for o in [&base, &out] {
            let got = o.loss.as_ref().unwrap().to_scalar::<f64>().unwrap();
            assert!((got - want).abs() < 1e-15, "scale {scale}: {got} vs {want}");
        }
    }
    let e = mor_router::build_router("expert_choice", &table("aux_bce_scale = -1.0"), &c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("aux_bce_scale") && e.contains("-1"), "{e}");
}

/// Ranking is by the logit z: once σ(z) saturates to 1.0 (f64 from z ≈ 37), every gate is
/// equal and a ranking by g = α·σ(z) would keep the earliest positions instead of the
/// largest scores.
#[test]
fn top_k_ranks_by_logit_not_by_saturated_gate() {
    let (l, d) = (4, 1);
    let c = ctx(d, 1, l, 0.7, 3);
    let r = build("expert_choice", "capacity = [0.5]", &c);
    var(r.as_ref(), "router.1.w1")
        .set(&Tensor::new(&[[1.0f64]], &Device::Cpu).unwrap())
        .unwrap();
    let h = Tensor::new(&[[[40.0f64], [60.0], [50.0], [70.0]]], &Device::Cpu).unwrap();
    assert_eq!(sigmoid(40.0), sigmoid(70.0), "the gates saturate");
    for mode in [RouteMode::Train, RouteMode::FullSequence] {
        let (_, steps, _) = forward(r.as_ref(), &h, 1, mode).unwrap();
        assert_eq!(steps[0].selected, vec![vec![1u32, 3]], "{mode:?}");
    }
}

#[test]
fn capacity_warmup_follows_the_cosine_schedule() {
    let c = ctx(3, 2, 8, 0.7, 15);
    let params: mor_router::ExpertChoiceParams =
        mor_core::registry::parse_params(&table("cap_warmup_steps = 10")).unwrap();
    let r = ExpertChoiceRouter::build(params, &c).unwrap();
    assert_eq!(r.capacities(), &[1.0, 0.5]);
    let h = hidden(1, 8, 3, 7);
    for (t, cap) in [(0usize, 1.0), (5, 0.75), (10, 0.5), (40, 0.5)] {
        r.set_train_step(t);
        assert!(
            (r.capacity_at(2, RouteMode::Train) - cap).abs() < 1e-12,
            "t = {t}"
        );
        assert!((warmup_capacity(0.5, t, 10) - cap).abs() < 1e-12);
        assert_eq!(
            r.capacity_at(2, RouteMode::FullSequence),
            0.5,
            "warm-up is for training only"
        );
        let (_, steps, _) = forward(&r, &h, 2, RouteMode::Train).unwrap();
        assert_eq!(steps[1].num_selected(), tokens_kept(cap, 8));
    }
    assert_eq!(
        [
            tokens_kept(1.0, 8),
            tokens_kept(0.75, 8),
            tokens_kept(0.5, 8)
        ],
        [8, 6, 4]
    );
    assert_eq!(
        [tokens_kept(2.0 / 3.0, 2048), tokens_kept(1.0 / 3.0, 2048)],
        [1365, 682]
    );
    assert_eq!(tokens_kept(0.01, 8), 1, "at least one token");
    r.after_optimizer_step(&[], 4).unwrap();
    assert!(
        (r.capacity_at(2, RouteMode::Train) - 0.75).abs() < 1e-12,
        "after step 4 comes step 5"
    );
}

#[test]
fn additive_gating_and_random_router() {
    let (b, l, d, nr) = (2, 9, 3, 3);
    let c = ctx(d, nr, l, 0.7, 16);
    let h = hidden(b, l, d, 8);
    let add = build("expert_choice", "gating = \"additive\"", &c);
    let (_, steps, _) = forward(add.as_ref(), &h, nr, RouteMode::Train).unwrap();
    assert!(steps.iter().all(|s| s.gate.is_none()));

    let r1 = build("expert_choice", "rand_router = true", &c);
    let r2 = build("expert_choice", "rand_router = true", &c);
    assert!(r1.vars().is_empty() && r1.aux_vars().is_empty());
    let (_, s1, o1) = forward(r1.as_ref(), &h, nr, RouteMode::Train).unwrap();
    let (_, s2, _) = forward(r2.as_ref(), &h, nr, RouteMode::Train).unwrap();
    let (_, s3, _) = forward(r1.as_ref(), &h, nr, RouteMode::Train).unwrap();
    assert!(o1.loss.is_none() && o1.stats.sampling_accuracy().is_none());
    let sel =
        |s: &[mor_router::StepRouting]| s.iter().map(|x| x.selected.clone()).collect::<Vec<_>>();
    assert_eq!(sel(&s1), sel(&s2), "same seed, same draws");
    assert_ne!(sel(&s1), sel(&s3), "a new forward draws new scores");
    assert_eq!(
        s1.iter().map(|s| s.num_selected()).collect::<Vec<_>>(),
        vec![18, 12, 6]
    );
}

#[test]
fn causal_mode_may_select_nobody_without_failing() {
    let (b, l, d, nr) = (2, 5, 3, 3);
    let c = ctx(d, nr, l, 1e-6, 17);
    let r = build("expert_choice", "threshold = 0.9", &c);
    let (_, steps, out) = forward(r.as_ref(), &hidden(b, l, d, 9), nr, RouteMode::Causal).unwrap();
    assert_eq!(steps[0].num_selected(), b * l);
    assert_eq!(steps[1].num_selected(), 0);
    assert_eq!(steps[2].num_selected(), 0);
    assert_eq!(steps[2].gate.as_ref().unwrap().dims(), &[0]);
    assert_eq!(out.stats.tokens_per_depth, vec![10, 0, 0]);
    assert_eq!(out.stats.dead_token_ratio(), Some(1.0));
    // Full-sequence evaluation keeps the training capacities.
    let (_, steps, _) =
        forward(r.as_ref(), &hidden(b, l, d, 9), nr, RouteMode::FullSequence).unwrap();
    assert_eq!(
        steps.iter().map(|s| s.num_selected()).collect::<Vec<_>>(),
        vec![10, 6, 2]
    );
}

#[test]
fn f32_router_on_f32_states() {
    let mut c = ctx(4, 2, 6, 0.02, 18);
    c.dtype = DType::F32;
    let r = build("expert_choice", "", &c);
    assert_eq!(r.vars()[0].1.dtype(), DType::F32);
    let h = hidden(2, 6, 4, 10).to_dtype(DType::F32).unwrap();
    let (_, steps, out) = forward(r.as_ref(), &h, 2, RouteMode::Train).unwrap();
    assert_eq!(steps[1].gate.as_ref().unwrap().dtype(), DType::F32);
    assert_eq!(steps[1].num_selected(), 6);
    let g = steps[0].gate.as_ref().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        g.iter().all(|&x| x > 0.0 && x < 0.1),
        "g = 0.1·σ(z) ∈ (0, 0.1)"
    );
    assert!(out.loss.is_some());
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let (b, l, d, nr) = (2, 5, 3, 2);
    let c = ctx(d, nr, l, 0.7, 19);
    let r = build("expert_choice", "", &c);
    let h = hidden(b, l, d, 11);
    let all: Vec<Vec<u32>> = vec![(0..l as u32).collect(); b];
    let err = |e: mor_router::Error| e.to_string();
    assert!(r.begin(&hidden(b, l, d + 1, 1), RouteMode::Train).is_err());
    let mut st = r.begin(&h, RouteMode::Train).unwrap();
    assert!(
        err(r.route(2, &h, &all, &mut st, RouteMode::Train).unwrap_err()).contains("out of order")
    );
    assert!(err(r
        .route(1, &h, &[vec![1, 0], vec![0]], &mut st, RouteMode::Train)
        .unwrap_err())
    .contains("ascending"));
    assert!(err(r
        .route(1, &h, &[vec![0, 9], vec![0]], &mut st, RouteMode::Train)
        .unwrap_err())
    .contains("position 9"));
    assert!(r
        .route(1, &h, &all[..1], &mut st, RouteMode::Train)
        .is_err());
    assert!(r.route(1, &h, &all, &mut st, RouteMode::Causal).is_err());
    assert!(r
        .route(1, &hidden(b, l + 1, d, 1), &all, &mut st, RouteMode::Train)
        .is_err());
    assert!(r
        .route(1, &h, &all, &mut RoutingState::default(), RouteMode::Train)
        .is_err());
    let tc = build("token_choice", "", &c);
    let foreign = tc.begin(&h, RouteMode::Train).unwrap();
    assert!(r.finish(foreign).is_err());
    r.route(1, &h, &all, &mut st, RouteMode::Train).unwrap();
    let s2 = r.route(2, &h, &all, &mut st, RouteMode::Train).unwrap();
    assert_eq!(s2.num_selected(), 2 * 2);
    assert!(
        r.route(3, &h, &all, &mut st, RouteMode::Train).is_err(),
        "only N_r steps"
    );
    r.finish(st).unwrap();
}

/// The random routers' draws depend on a counter of forwards; it is a checkpoint buffer, so
/// a router restored from another's buffers draws what the original draws next.
#[test]
fn random_router_draw_counter_is_a_buffer_and_resumes_bit_exactly() {
    let (b, l, d, nr) = (2, 9, 3, 3);
    let c = ctx(d, nr, l, 0.7, 16);
    let h = hidden(b, l, d, 8);
    for (name, params) in [
        ("expert_choice", "rand_router = true"),
        ("token_choice", "rand_router = true"),
    ] {
        let run = build(name, params, &c);
        for _ in 0..3 {
            forward(run.as_ref(), &h, nr, RouteMode::Train).unwrap();
        }
        let saved = run.buffers();
        let draws = saved
            .iter()
            .find(|(n, _)| n == mor_router::DRAWS_BUFFER)
            .unwrap_or_else(|| panic!("{name}: no draw counter in {saved:?}"));
        assert_eq!(draws.1.to_vec1::<i64>().unwrap(), [3], "{name}");
        let next = forward(run.as_ref(), &h, nr, RouteMode::Train).unwrap().1;

        let resumed = build(name, params, &c);
        resumed.load_buffers(&saved).unwrap();
        let again = forward(resumed.as_ref(), &h, nr, RouteMode::Train)
            .unwrap()
            .1;
        let sel = |s: &[mor_router::StepRouting]| {
            s.iter().map(|x| x.selected.clone()).collect::<Vec<_>>()
        };
        assert_eq!(sel(&next), sel(&again), "{name}: resumed draws differ");
        // A fresh router (counter 0) draws differently: the test can tell.
        let fresh = build(name, params, &c);
        let first = forward(fresh.as_ref(), &h, nr, RouteMode::Train).unwrap().1;
        assert_ne!(sel(&next), sel(&first), "{name}");
        // A learned router has no draw counter; a bad counter is an error.
        let bad = vec![(
            mor_router::DRAWS_BUFFER.to_string(),
            Tensor::new(&[-1i64], &Device::Cpu).unwrap(),
        )];
        assert!(resumed.load_buffers(&bad).is_err(), "{name}");
    }
    let learned = build("expert_choice", "", &c);
    assert!(learned.buffers().is_empty());
}
