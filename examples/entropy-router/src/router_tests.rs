//! Contract tests of `entropy_router`: selections against a naive loop-by-loop reference,
//! the causal rule, the entropy's closed form, gradients against finite differences, the
//! auxiliary loss and bad input.

use super::*;
use candle_core::Device;
use mor_core::rng::Rng;
use mor_router::expert_choice::Capacity;
use proptest::prelude::*;
use std::sync::Arc;

fn backend() -> Arc<dyn mor_kernels::Backend> {
    mor_kernels::build_backend(
        "reference",
        &toml::Table::new(),
        &mor_kernels::BackendCtx::new(Device::Cpu),
    )
    .expect("the reference backend builds")
}

/// An f64 context; `init_std` is large so that entropies differ between tokens.
fn ctx(d: usize, nr: usize, l: usize, seed: u64) -> RouterCtx {
    let mut c = RouterCtx::new(d, nr, l, Device::Cpu, backend());
    c.init_std = 0.7;
    c.seed = seed;
    c.dtype = DType::F64;
    c
}

fn hidden(b: usize, l: usize, d: usize, seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let v: Vec<f64> = (0..b * l * d).map(|_| r.normal()).collect();
    Tensor::from_vec(v, (b, l, d), &Device::Cpu).unwrap()
}

/// `begin`, `route` for steps 1..=N_r (each step's `active` is the previous selection, the
/// hidden states stay fixed) and `finish`.
fn forward(
    router: &EntropyRouter,
    h: &Tensor,
    mode: RouteMode,
) -> Result<(Vec<Vec<Vec<u32>>>, Vec<StepRouting>, RouterOutput)> {
    let (b, l, _) = h.dims3()?;
    let mut st = router.begin(h, mode)?;
    let mut active: Vec<Vec<u32>> = vec![(0..l as u32).collect(); b];
    let (mut actives, mut steps) = (Vec::new(), Vec::new());
    for step in 1..=router.capacities().len() {
        let s = router.route(step, h, &active, &mut st, mode)?;
        actives.push(active.clone());
        active = s.selected.clone();
        steps.push(s);
    }
    Ok((actives, steps, router.finish(st)?))
}

/// `u = H(softmax(h·W)) / ln C` in plain f64 loops.
fn naive_score(h: &[f64], w: &[Vec<f64>]) -> f64 {
    let c = w[0].len();
    let z: Vec<f64> = (0..c)
        .map(|j| h.iter().zip(w).map(|(x, row)| x * row[j]).sum())
        .collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = z.iter().map(|z| (z - m).exp()).sum();
    let ent: f64 = z
        .iter()
        .map(|z| {
            let p = (z - m).exp() / s;
            -p * p.ln()
        })
        .sum();
    ent / (c as f64).ln()
}

fn heads(r: &EntropyRouter) -> Vec<Vec<Vec<f64>>> {
    r.vars()
        .iter()
        .map(|(_, v)| v.as_tensor().to_vec2::<f64>().unwrap())
        .collect()
}

fn build(params: EntropyParams, c: &RouterCtx) -> EntropyRouter {
    EntropyRouter::build(params, c).expect("router builds")
}

fn case() -> impl Strategy<Value = (usize, usize, usize, usize, usize, u64)> {
    // (batch, seq, hidden, N_r, codes, seed)
    (
        1usize..4,
        1usize..14,
        1usize..5,
        1usize..5,
        2usize..6,
        0u64..1000,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Train and FullSequence keep exactly `min(|active|, max(1, floor(cap_r·L)))` tokens
    /// per row: the top-k by the naive entropy score, ascending, nested across steps, with
    /// gates `α·u`.
    #[test]
    fn top_k_selection_matches_a_naive_reference((b, l, d, nr, c, seed) in case()) {
        let params = EntropyParams { num_codes: c, ..Default::default() };
        let r = build(params, &ctx(d, nr, l, seed));
        let h = hidden(b, l, d, seed + 1);
        let hh = h.to_vec3::<f64>().unwrap();
        let w = heads(&r);
        let caps = auto_capacities(nr);
        for mode in [RouteMode::Train, RouteMode::FullSequence] {
            let (actives, steps, out) = forward(&r, &h, mode).unwrap();
            let mut prev: Vec<Vec<u32>> = vec![(0..l as u32).collect(); b];
            for (si, s) in steps.iter().enumerate() {
                prop_assert_eq!(&actives[si], &prev);
                let k = ((caps[si] * l as f64).floor() as usize).max(1);
                let mut want_gates = Vec::new();
                for bi in 0..b {
                    let u: Vec<f64> = prev[bi].iter().map(|&t| naive_score(&hh[bi][t as usize], &w[si])).collect();
                    let mut order: Vec<usize> = (0..u.len()).collect();
                    order.sort_by(|&x, &y| u[y].partial_cmp(&u[x]).unwrap().then(x.cmp(&y)));
                    let mut keep: Vec<usize> = order.into_iter().take(k).collect();
                    keep.sort();
                    let want: Vec<u32> = keep.iter().map(|&i| prev[bi][i]).collect();
                    prop_assert_eq!(s.selected[bi].len(), k.min(prev[bi].len()));
                    prop_assert!(s.selected[bi].windows(2).all(|p| p[0] < p[1]), "not ascending");
                    prop_assert!(s.selected[bi].iter().all(|t| prev[bi].contains(t)), "not nested");
                    prop_assert_eq!(&s.selected[bi], &want);
                    want_gates.extend(keep.iter().map(|&i| 0.1 * u[i]));
                }
                let gates = s.gate.as_ref().unwrap().to_vec1::<f64>().unwrap();
                prop_assert_eq!(gates.len(), want_gates.len());
                for (g, w) in gates.iter().zip(&want_gates) {
                    prop_assert!((g - w).abs() < 1e-12, "gate {} vs {}", g, w);
                }
                prop_assert!(matches!(s.update, Update::Residual));
                prev = s.selected.clone();
            }
            // Every token is counted once at its final depth.
            let st = &out.stats;
            prop_assert_eq!(st.tokens_per_depth.iter().sum::<u64>() + st.tokens_depth_zero, (b * l) as u64);
            let selected: Vec<u64> = steps.iter().map(|s| s.num_selected() as u64).collect();
            prop_assert_eq!(&st.selected_per_step, &selected);
            prop_assert_eq!(st.sequences, b as u64);
        }
    }

    /// Causal mode keeps every token at a capacity-1 step and otherwise exactly the active
    /// tokens with `u ≥ threshold`; a token's decisions do not change when every other
    /// token's hidden state does.
    #[test]
    fn causal_rule_depends_on_the_token_alone(
        (b, l, d, nr, c, seed) in case(),
        threshold in 0.05f64..0.95,
        pick in 0usize..1000,
    ) {
        let params = EntropyParams { num_codes: c, threshold, ..Default::default() };
        let r = build(params, &ctx(d, nr, l, seed));
        let h = hidden(b, l, d, seed + 1);
        let hh = h.to_vec3::<f64>().unwrap();
        let w = heads(&r);
        let caps = auto_capacities(nr);
        let (_, steps, _) = forward(&r, &h, RouteMode::Causal).unwrap();
        let mut prev: Vec<Vec<u32>> = vec![(0..l as u32).collect(); b];
        for (si, s) in steps.iter().enumerate() {
            for bi in 0..b {
                let want: Vec<u32> = prev[bi]
                    .iter()
                    .copied()
                    .filter(|&t| caps[si] >= 1.0 || naive_score(&hh[bi][t as usize], &w[si]) >= threshold)
                    .collect();
                prop_assert_eq!(&s.selected[bi], &want);
            }
            prev = s.selected.clone();
        }
        // Replace every row except (bi, t) and route again.
        let (bi, t) = (pick % b, pick / b % l);
        let mut other = hidden(b, l, d, seed + 99).to_vec3::<f64>().unwrap();
        other[bi][t] = hh[bi][t].clone();
        let flat: Vec<f64> = other.into_iter().flatten().flatten().collect();
        let h2 = Tensor::from_vec(flat, (b, l, d), &Device::Cpu).unwrap();
        let (_, steps2, _) = forward(&r, &h2, RouteMode::Causal).unwrap();
        let depth = |steps: &[StepRouting]| steps.iter().filter(|s| s.selected[bi].contains(&(t as u32))).count();
        prop_assert_eq!(depth(&steps), depth(&steps2));
    }
}

#[test]
fn score_has_the_closed_form_of_the_entropy() -> Result<()> {
    let r = build(
        EntropyParams {
            num_codes: 2,
            ..Default::default()
        },
        &ctx(1, 1, 1, 0),
    );
    let w = &r.vars()[0].1;
    // z = (ln 3, 0): p = (3/4, 1/4), H = 0.5623351446188083 nats = 0.8112781244591328 bits.
    w.set(&Tensor::new(&[[3f64.ln(), 0.0]], &Device::Cpu)?)?;
    let x = Tensor::new(&[[1f64], [0.0], [-1e4]], &Device::Cpu)?;
    let u = r.scores(1, &x)?.to_vec1::<f64>()?;
    assert!((u[0] - 0.811_278_124_459_132_8).abs() < 1e-14, "{u:?}");
    // Equal logits: the uniform distribution, u = 1; a huge logit gap: u = 0.
    assert!((u[1] - 1.0).abs() < 1e-15, "{u:?}");
    assert!(u[2].abs() < 1e-12, "{u:?}");
    Ok(())
}

/// The gates and the auxiliary loss are differentiable with respect to every head, and the
/// gradient matches central finite differences (f64, eps 1e-5).
#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let (b, l, d, nr) = (2, 7, 3, 3);
    let params = EntropyParams {
        num_codes: 3,
        aux_coeff: 0.5,
        ..Default::default()
    };
    let r = build(params, &ctx(d, nr, l, 11));
    let h = hidden(b, l, d, 12);
    // Fix the selections once, so the finite differences do not cross a top-k boundary.
    let (actives, _, _) = forward(&r, &h, RouteMode::Train)?;
    let mut coeff = Rng::new(5);
    let weights: Vec<f64> = (0..b * l).map(|_| coeff.normal()).collect();
    let f = || -> Tensor {
        let mut st = r.begin(&h, RouteMode::Train).unwrap();
        let mut total = Tensor::new(0f64, &Device::Cpu).unwrap();
        for (si, active) in actives.iter().enumerate() {
            let s = r
                .route(si + 1, &h, active, &mut st, RouteMode::Train)
                .unwrap();
            let g = s.gate.unwrap();
            let n = g.dim(0).unwrap();
            let c = Tensor::from_vec(weights[..n].to_vec(), n, &Device::Cpu).unwrap();
            total = (total + (g * c).unwrap().sum_all().unwrap()).unwrap();
        }
        let out = r.finish(st).unwrap();
        (total + out.loss.unwrap()).unwrap()
    };
    let vars = r.vars();
    let grads = f().backward()?;
    let eps = 1e-5;
    let mut worst = 0f64;
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} received no gradient"))
            .flatten_all()?
            .to_vec1::<f64>()?;
        assert!(g.iter().any(|&x| x != 0.0), "{name}: all-zero gradient");
        let base = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        for i in 0..base.len() {
            let mut p = base.clone();
            p[i] += eps;
            v.set(&Tensor::from_vec(p.clone(), v.shape(), &Device::Cpu)?)?;
            let lp = f().to_scalar::<f64>()?;
            p[i] -= 2.0 * eps;
            v.set(&Tensor::from_vec(p, v.shape(), &Device::Cpu)?)?;
            let lm = f().to_scalar::<f64>()?;
            v.set(&Tensor::from_vec(base.clone(), v.shape(), &Device::Cpu)?)?;
            let num = (lp - lm) / (2.0 * eps);
            let err = (num - g[i]).abs() / num.abs().max(g[i].abs()).max(1e-3);
            worst = worst.max(err);
            assert!(err < 1e-6, "{name}[{i}]: analytic {} numeric {num}", g[i]);
        }
    }
    assert!(worst < 1e-6);
    Ok(())
}

/// `loss = aux_coeff · Σ_r mean_t BCEWithLogits(s·(u − τ), 1[kept])`, and the sampling
/// accuracy counts `(u ≥ τ) == kept`.
#[test]
fn auxiliary_loss_and_sampling_accuracy_match_closed_forms() -> Result<()> {
    let (b, l, d, nr) = (2, 9, 4, 3);
    let params = EntropyParams {
        num_codes: 3,
        aux_coeff: 0.25,
        sharpness: 7.0,
        threshold: 0.8,
        ..Default::default()
    };
    let r = build(params.clone(), &ctx(d, nr, l, 3));
    let h = hidden(b, l, d, 4);
    let hh = h.to_vec3::<f64>()?;
    let w = heads(&r);
    let (actives, steps, out) = forward(&r, &h, RouteMode::Train)?;
    let (mut bce, mut correct, mut total) = (0.0, 0u64, 0u64);
    for (si, s) in steps.iter().enumerate() {
        let (mut sum, mut n) = (0.0, 0usize);
        for bi in 0..b {
            for &t in &actives[si][bi] {
                let u = naive_score(&hh[bi][t as usize], &w[si]);
                let y = if s.selected[bi].contains(&t) {
                    1.0
                } else {
                    0.0
                };
                let p = 1.0 / (1.0 + (-(7.0 * (u - 0.8))).exp());
                sum += -(y * p.ln() + (1.0 - y) * (1.0 - p).ln());
                n += 1;
                correct += u64::from((u >= 0.8) == (y == 1.0));
                total += 1;
            }
        }
        bce += sum / n as f64;
    }
    let loss = out.loss.expect("aux loss").to_scalar::<f64>()?;
    assert!(
        (loss - 0.25 * bce).abs() < 1e-12,
        "{loss} vs {}",
        0.25 * bce
    );
    assert_eq!(out.terms.len(), 1);
    assert!((out.terms[0].1 - bce).abs() < 1e-12);
    let acc = out.stats.sampling_accuracy().unwrap();
    assert!((acc - correct as f64 / total as f64).abs() < 1e-15);

    // Without the auxiliary loss the router adds no loss term.
    let r = build(
        EntropyParams {
            aux_coeff: 0.0,
            ..params
        },
        &ctx(d, nr, l, 3),
    );
    let (_, _, out) = forward(&r, &h, RouteMode::Train)?;
    assert!(out.loss.is_none() && out.terms.is_empty());
    Ok(())
}

#[test]
fn explicit_capacities_and_accounting() {
    let params = EntropyParams {
        capacity: Capacity::List(vec![1.0, 0.5, 0.25]),
        ..Default::default()
    };
    let r = build(params.clone(), &ctx(2, 3, 8, 0));
    let (_, steps, _) = forward(&r, &hidden(1, 8, 2, 1), RouteMode::Train).unwrap();
    let kept: Vec<usize> = steps.iter().map(|s| s.num_selected()).collect();
    assert_eq!(kept, [8, 4, 2]);
    let ctx = CheckCtx {
        num_recursions: 3,
        ..Default::default()
    };
    assert_eq!(
        EntropyRouter::accounting(&params, &ctx).capacities,
        Some(vec![1.0, 0.5, 0.25])
    );
    assert_eq!(
        EntropyRouter::accounting(&EntropyParams::default(), &ctx).capacities,
        Some(vec![1.0, 2.0 / 3.0, 1.0 / 3.0])
    );
}

#[test]
fn bad_parameters_are_reported_per_field() {
    let bad = EntropyParams {
        num_codes: 1,
        alpha: -1.0,
        capacity: Capacity::List(vec![0.5, 1.0]),
        threshold: 1.0,
        aux_coeff: f64::NAN,
        sharpness: 0.0,
    };
    let fields: Vec<String> = bad.problems(3).into_iter().map(|p| p.field).collect();
    assert_eq!(
        fields,
        [
            "capacity",
            "num_codes",
            "alpha",
            "threshold",
            "aux_coeff",
            "sharpness"
        ]
    );
    let err = EntropyRouter::build(bad, &ctx(2, 3, 4, 0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`num_codes` = 1") && err.contains("entropy_router"),
        "{err}"
    );
    let mut c = ctx(2, 3, 4, 0);
    c.dtype = DType::U32;
    assert!(EntropyRouter::build(EntropyParams::default(), &c).is_err());
    c = ctx(2, 0, 4, 0);
    assert!(EntropyRouter::build(EntropyParams::default(), &c).is_err());
}

#[test]
fn bad_input_is_an_error_not_a_panic() -> Result<()> {
    let r = build(EntropyParams::default(), &ctx(3, 2, 5, 0));
    let h = hidden(2, 5, 3, 1);
    let all: Vec<Vec<u32>> = vec![(0..5).collect(); 2];
    let err = |res: Result<StepRouting>| res.unwrap_err().to_string();

    assert!(r.begin(&hidden(2, 5, 4, 1), RouteMode::Train).is_err());
    let mut st = r.begin(&h, RouteMode::Train)?;
    assert!(err(r.route(2, &h, &all, &mut st, RouteMode::Train)).contains("out of order"));
    assert!(err(r.route(1, &h, &all, &mut st, RouteMode::Causal)).contains("mode"));
    assert!(
        err(r.route(1, &hidden(2, 4, 3, 1), &all, &mut st, RouteMode::Train)).contains("began")
    );
    assert!(err(r.route(1, &h, &all[..1], &mut st, RouteMode::Train)).contains("rows"));
    let unsorted = vec![vec![1, 0], vec![0]];
    assert!(err(r.route(1, &h, &unsorted, &mut st, RouteMode::Train)).contains("ascending"));
    let outside = vec![vec![0, 5], vec![0]];
    assert!(err(r.route(1, &h, &outside, &mut st, RouteMode::Train)).contains("< 5"));
    r.route(1, &h, &all, &mut st, RouteMode::Train)?;
    r.route(2, &h, &all, &mut st, RouteMode::Train)?;
    assert!(err(r.route(3, &h, &all, &mut st, RouteMode::Train)).contains("1..=2"));

    let mut foreign = RoutingState::default();
    assert!(r
        .route(1, &h, &all, &mut foreign, RouteMode::Train)
        .is_err());
    assert!(r.finish(RoutingState::default()).is_err());
    assert!(r
        .scores(0, &Tensor::zeros((1, 3), DType::F64, &Device::Cpu)?)
        .is_err());
    assert!(r
        .scores(1, &Tensor::zeros((1, 2), DType::F64, &Device::Cpu)?)
        .is_err());

    // Empty candidate rows are fine: nothing is selected.
    let mut st = r.begin(&h, RouteMode::Train)?;
    let s = r.route(1, &h, &[vec![], vec![]], &mut st, RouteMode::Train)?;
    assert_eq!(s.num_selected(), 0);
    assert_eq!(s.gate.unwrap().dims(), [0]);
    Ok(())
}

/// f32 parameters with f32 hidden states give f32 gates equal to the f64 ones within f32
/// precision.
#[test]
fn f32_matches_f64() -> Result<()> {
    let c64 = ctx(4, 2, 6, 9);
    let mut c32 = c64.clone();
    c32.dtype = DType::F32;
    let r64 = build(EntropyParams::default(), &c64);
    let r32 = build(EntropyParams::default(), &c32);
    let h = hidden(2, 6, 4, 10);
    let (_, s64, _) = forward(&r64, &h, RouteMode::Train)?;
    let (_, s32, _) = forward(&r32, &h.to_dtype(DType::F32)?, RouteMode::Train)?;
    for (a, b) in s64.iter().zip(&s32) {
        assert_eq!(a.selected, b.selected);
        let ga = a.gate.as_ref().unwrap().to_vec1::<f64>()?;
        let gb = b
            .gate
            .as_ref()
            .unwrap()
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        for (x, y) in ga.iter().zip(&gb) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }
    Ok(())
}
