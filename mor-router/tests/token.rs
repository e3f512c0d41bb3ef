//! Token-choice router: depths, gates and losses against naive references, gradients,
//! loss-free bias dynamics, balancing warm-up and buffers.

use crate::common::*;
use candle_core::{Device, Tensor, Var};
use mor_core::rng::Rng;
use mor_router::token_choice::BIAS_BUFFER;
use mor_router::{RouteMode, Router, RouterStats, RoutingKind, Update};
use proptest::prelude::*;

/// Naive token-choice forward: per token, `p = α·G(hW/temp)`, depth `argmax p + 1`, gate
/// `p[argmax]`, and the losses `Σ_i f_i·P_i` and `mean (logsumexp z)²`.
struct Naive {
    depth: Vec<usize>,
    gate: Vec<f64>,
    balance: f64,
    z: f64,
    mean_p: Vec<f64>,
}

fn naive_token(
    h: &[Vec<Vec<f64>>],
    w: &[Vec<f64>],
    nr: usize,
    alpha: f64,
    temp: f64,
    softmax: bool,
) -> Naive {
    let mut out = Naive {
        depth: Vec::new(),
        gate: Vec::new(),
        balance: 0.0,
        z: 0.0,
        mean_p: vec![0.0; nr],
    };
    let mut counts = vec![0.0; nr];
    let mut n = 0.0;
    for row in h {
        for x in row {
            let z: Vec<f64> = (0..nr)
                .map(|j| x.iter().zip(w).map(|(xi, wi)| xi / temp * wi[j]).sum())
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let se: f64 = z.iter().map(|v| (v - m).exp()).sum();
            let p: Vec<f64> = if softmax {
                z.iter().map(|v| alpha * (v - m).exp() / se).collect()
            } else {
                z.iter().map(|&v| alpha * sigmoid(v)).collect()
            };
            let mut i = 0;
            for j in 1..nr {
                if p[j] > p[i] {
                    i = j;
                }
            }
            out.depth.push(i + 1);
            out.gate.push(p[i]);
            counts[i] += 1.0;
            for j in 0..nr {
                out.mean_p[j] += p[j];
            }
            out.z += (m + se.ln()).powi(2);
            n += 1.0;
        }
    }
    out.mean_p.iter_mut().for_each(|v| *v /= n);
    out.z /= n;
    out.balance = (0..nr)
        .map(|i| nr as f64 * counts[i] / n * out.mean_p[i])
        .sum();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Depths lie in [1, N_r]; step r selects exactly the active tokens of depth ≥ r
    /// (nested, ascending); finishing flags, gates and losses equal the naive reference;
    /// causal mode routes identically.
    #[test]
    fn token_choice_matches_naive_reference(
        b in 1usize..4, l in 1usize..20, nr in 1usize..5, d in 1usize..5, seed in any::<u64>(),
        softmax in any::<bool>(), temp in prop_oneof![Just(1.0f64), Just(2.0)],
    ) {
        let (func, alpha) = if softmax { ("softmax", 1.0) } else { ("sigmoid", 0.1) };
        let c = ctx(d, nr, l, 1.0, seed);
        let router = build(
            "token_choice",
            &format!("router_func = \"{func}\"\nalpha = {alpha:?}\ntemperature = {temp:?}\nz_coeff = 0.01"),
            &c,
        );
        let h = hidden(b, l, d, seed ^ 3);
        let w = host2(&var(router.as_ref(), "router.w1"));
        let naive = naive_token(&host3(&h), &w, nr, alpha, temp, softmax);
        let (actives, steps, out) = forward(router.as_ref(), &h, nr, RouteMode::Train).unwrap();
        prop_assert!(naive.depth.iter().all(|&x| (1..=nr).contains(&x)));
        for (r, s) in steps.iter().enumerate() {
            let step = r + 1;
            let mut want_gate = Vec::new();
            let mut want_fin = Vec::new();
            for bi in 0..b {
                let want: Vec<u32> = actives[r][bi]
                    .iter()
                    .copied()
                    .filter(|&t| naive.depth[bi * l + t as usize] >= step)
                    .collect();
                prop_assert_eq!(&s.selected[bi], &want, "step {} row {}", step, bi);
                prop_assert!(s.selected[bi].iter().all(|t| actives[r][bi].contains(t)));
                for &t in &want {
                    want_gate.push(naive.gate[bi * l + t as usize]);
                    want_fin.push(naive.depth[bi * l + t as usize] == step);
                }
            }
            match &s.update {
                Update::TokenChoice { finishing, gate_intermediate } => {
                    prop_assert_eq!(finishing, &want_fin);
                    prop_assert!(!gate_intermediate);
                }
                other => prop_assert!(false, "unexpected update {:?}", other),
            }
            let g = s.gate.as_ref().unwrap().to_vec1::<f64>().unwrap();
            prop_assert_eq!(g.len(), want_gate.len());
            for (a, e) in g.iter().zip(&want_gate) {
                prop_assert!((a - e).abs() < 1e-12, "gate {} vs {}", a, e);
            }
        }
        let loss = out.loss.unwrap().to_scalar::<f64>().unwrap();
        let want = 0.1 * naive.balance + 0.01 * naive.z;
        prop_assert!((loss - want).abs() < 1e-10 * (1.0 + want.abs()), "loss {} vs {}", loss, want);
        for dd in 1..=nr {
            prop_assert_eq!(out.stats.tokens_per_depth[dd - 1], naive.depth.iter().filter(|&&x| x == dd).count() as u64);
        }
        let total: f64 = naive.mean_p.iter().sum();
        let want_h = -naive.mean_p.iter().map(|p| p / total).map(|p| p * p.ln()).sum::<f64>();
        prop_assert!((out.stats.entropy().unwrap() - want_h).abs() < 1e-9);
        let (_, csteps, _) = forward(router.as_ref(), &h, nr, RouteMode::Causal).unwrap();
        for (a, e) in csteps.iter().zip(&steps) {
            prop_assert_eq!(&a.selected, &e.selected);
        }
    }
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
fn gate_balance_and_z_gradients_match_finite_differences() {
    let (b, l, d, nr) = (2, 5, 3, 3);
    for (arch, func) in [
        ("linear", "softmax"),
        ("mlp", "softmax"),
        ("linear", "sigmoid"),
    ] {
        let c = ctx(d, nr, l, 0.8, 21);
        let router = build(
            "token_choice",
            &format!("router_arch = \"{arch}\"\nrouter_func = \"{func}\"\ntemperature = 1.5\nz_coeff = 0.05"),
            &c,
        );
        let h = Var::from_tensor(&hidden(b, l, d, 22)).unwrap();
        let (_, steps, out) =
            forward(router.as_ref(), h.as_tensor(), nr, RouteMode::Train).unwrap();
        let names: Vec<&str> = out.terms.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["balance", "z"]);
        let mut rng = Rng::new(23);
        let coeffs: Vec<Tensor> = steps
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
            .collect();
        let vars = router.vars();
        let mut all: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
        all.push(&h);
        fd_check(
            &all,
            &|| gate_loss(router.as_ref(), h.as_tensor(), nr, &coeffs),
            1e-5,
            1e-6,
        );
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

/// A router whose logits favour depth 1 strongly and depth 3 weakly: `z = [2 + x_0, x_1, −1]`.
fn skewed(u: f64, warmup: usize) -> (Box<dyn Router>, Tensor) {
    let (d, nr, l) = (3, 3, 64);
    let c = ctx(d, nr, l, 0.0, 31);
    let r = build(
        "token_choice",
        &format!("balancing = \"loss_free\"\nbias_update_u = {u:?}\nbal_warmup_steps = {warmup}"),
        &c,
    );
    // Column j of w maps h to z_j; the last input coordinate is a constant 1.
    let w = Tensor::new(
        &[[1.0f64, 0.0, 0.0], [0.0, 1.0, 0.0], [2.0, 0.0, -1.0]],
        &Device::Cpu,
    )
    .unwrap();
    var(r.as_ref(), "router.w1").set(&w).unwrap();
    let mut rng = Rng::new(32);
    let mut v = Vec::new();
    for _ in 0..2 * l {
        v.extend([rng.normal(), rng.normal(), 1.0]);
    }
    (r, Tensor::from_vec(v, (2, l, d), &Device::Cpu).unwrap())
}

#[test]
fn loss_free_bias_moves_loads_toward_the_mean() {
    let (r, h) = skewed(0.05, 0);
    assert_eq!(
        (r.kind(), r.name()),
        (RoutingKind::TokenChoice, "token_choice")
    );
    let (_, _, out0) = forward(r.as_ref(), &h, 3, RouteMode::Train).unwrap();
    let v0 = out0.stats.max_vio().unwrap();
    let loads = out0.stats.loads();
    assert!(
        loads[0] > 0.6,
        "the input is skewed towards depth 1: {loads:?}"
    );
    assert!(out0.loss.is_some(), "z-loss still applies");
    assert_eq!(out0.terms[0].0, "z", "no balancing loss in loss-free mode");
    // One update from two micro-batches: the bias moves by ±u against each depth's load.
    let (_, _, out0b) = forward(r.as_ref(), &h, 3, RouteMode::Train).unwrap();
    r.after_optimizer_step(&[out0.stats.clone(), out0b.stats], 0)
        .unwrap();
    let b = bias_of(r.as_ref());
    let mean = 1.0 / 3.0;
    for i in 0..3 {
        let want = if loads[i] > mean { -0.05 } else { 0.05 };
        assert!(
            (b[i] - want).abs() < 1e-12,
            "bias {b:?} for loads {loads:?}"
        );
    }
    let mut vio = vec![v0];
    for step in 1..40 {
        let (_, _, out) = forward(r.as_ref(), &h, 3, RouteMode::Train).unwrap();
        vio.push(out.stats.max_vio().unwrap());
        r.after_optimizer_step(&[out.stats], step).unwrap();
    }
    // The sign update first lowers the imbalance at every step, then settles into a ±u
    // limit cycle around balance.
    assert!(
        vio[..8].windows(2).all(|w| w[1] < w[0]),
        "MaxVio falls at every early step: {vio:?}"
    );
    let tail = &vio[20..];
    let (lo, hi) = tail
        .iter()
        .fold((f64::INFINITY, 0f64), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(
        hi < 0.4 * v0 && lo < 0.2 * v0,
        "MaxVio {v0} → [{lo}, {hi}]: {vio:?}"
    );
}

fn bias_of(r: &dyn Router) -> Vec<f64> {
    let bufs = r.buffers();
    assert_eq!(bufs.len(), 1);
    assert_eq!(bufs[0].0, BIAS_BUFFER);
    bufs[0].1.to_vec1::<f64>().unwrap()
}

#[test]
fn balancing_warmup_forces_full_depth_and_holds_the_bias_at_zero() {
    let (r, h) = skewed(0.05, 2);
    r.set_train_step(0);
    let (_, steps, out) = forward(r.as_ref(), &h, 3, RouteMode::Train).unwrap();
    assert_eq!(out.stats.tokens_per_depth, vec![0, 0, 128]);
    assert!(steps.iter().all(|s| s.num_selected() == 128));
    let (_, _, causal) = forward(r.as_ref(), &h, 3, RouteMode::Causal).unwrap();
    assert_ne!(
        causal.stats.tokens_per_depth,
        vec![0, 0, 128],
        "evaluation is not forced"
    );
    r.load_buffers(&[(
        BIAS_BUFFER.to_string(),
        Tensor::new(&[0.3f64, 0.0, -0.1], &Device::Cpu).unwrap(),
    )])
    .unwrap();
    r.after_optimizer_step(std::slice::from_ref(&causal.stats), 0)
        .unwrap();
    assert_eq!(bias_of(r.as_ref()), vec![0.0; 3], "reset during warm-up");
    r.after_optimizer_step(std::slice::from_ref(&causal.stats), 1)
        .unwrap();
    assert_eq!(bias_of(r.as_ref()), vec![0.0; 3]);
    r.after_optimizer_step(&[causal.stats], 2).unwrap();
    assert_ne!(
        bias_of(r.as_ref()),
        vec![0.0; 3],
        "updates resume after warm-up"
    );
    let (_, _, out) = forward(r.as_ref(), &h, 3, RouteMode::Train).unwrap();
    assert_ne!(out.stats.tokens_per_depth, vec![0, 0, 128]);
}

#[test]
fn bias_buffer_roundtrips_and_rejects_bad_shapes() {
    let (r, h) = skewed(0.01, 0);
    let bias = Tensor::new(&[0.25f64, -0.5, 0.125], &Device::Cpu).unwrap();
    r.load_buffers(&[("other".into(), bias.clone()), (BIAS_BUFFER.into(), bias)])
        .unwrap();
    assert_eq!(bias_of(r.as_ref()), vec![0.25, -0.5, 0.125]);
    let bad = Tensor::new(&[0.0f64, 1.0], &Device::Cpu).unwrap();
    let e = r
        .load_buffers(&[(BIAS_BUFFER.into(), bad)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 entries") && e.contains("3 depths"), "{e}");
    let wrong = RouterStats {
        tokens_per_depth: vec![1, 2],
        ..Default::default()
    };
    assert!(r.after_optimizer_step(&[wrong], 0).is_err());
    assert!(
        r.after_optimizer_step(&[], 0).is_ok(),
        "no stats: nothing to do"
    );
    // The bias enters the selection but not the gates.
    let big = Tensor::new(&[0.0f64, 0.0, 5.0], &Device::Cpu).unwrap();
    r.load_buffers(&[(BIAS_BUFFER.into(), big)]).unwrap();
    let (_, steps, out) = forward(r.as_ref(), &h, 3, RouteMode::Train).unwrap();
    assert_eq!(out.stats.tokens_per_depth, vec![0, 0, 128]);
    let g = steps[2].gate.as_ref().unwrap().to_vec1::<f64>().unwrap();
    assert!(
        g.iter().all(|&x| x < 0.5),
        "g = p_{{t,3}} stays the unbiased probability"
    );
}

#[test]
fn gate_intermediate_and_random_router() {
    let (b, l, d, nr) = (2, 16, 3, 3);
    let c = ctx(d, nr, l, 0.5, 41);
    let h = hidden(b, l, d, 42);
    let r = build("token_choice", "gate_intermediate = true", &c);
    let (_, steps, _) = forward(r.as_ref(), &h, nr, RouteMode::Train).unwrap();
    assert!(matches!(
        steps[0].update,
        Update::TokenChoice {
            gate_intermediate: true,
            ..
        }
    ));
    let rnd = build("token_choice", "rand_router = true", &c);
    assert!(rnd.vars().is_empty());
    let (_, steps, out) = forward(rnd.as_ref(), &h, nr, RouteMode::Train).unwrap();
    assert!(out.loss.is_none());
    assert_eq!(steps[0].num_selected(), b * l);
    assert_eq!(
        out.stats.tokens_per_depth.iter().sum::<u64>(),
        (b * l) as u64
    );
    assert!(
        out.stats.entropy().unwrap() > 0.9 * 3f64.ln(),
        "random logits in [0, 1) give a near-uniform mean"
    );
}
