//! Tests of the `reference` and `cpu` backends: analytic gradients against f64 central finite
//! differences, `cpu` against `reference` on random shapes (forward and backward), closed-form
//! values, edge cases and input validation.

use candle_core::{DType, Device, Tensor, Var};
use mor_core::rng::Rng;
use mor_kernels::testing::{assert_close, assert_fd, closeness, randn, F32_ATOL, F32_RTOL};
use mor_kernels::{
    build_backend, rope_tables, AttentionWeights, Backend, BackendCtx, Result, PAD_POS,
};
use proptest::prelude::*;
use std::sync::Arc;

const CPU: Device = Device::Cpu;

/// Finite-difference step and tolerance of the f64 gradient checks (TOOLCHAIN.md §3).
const FD_EPS: f64 = 1e-5;
const FD_TOL: f64 = 1e-6;

fn backend(name: &str) -> Arc<dyn Backend> {
    build_backend(name, &toml::Table::new(), &BackendCtx::new(CPU)).expect("backend builds")
}

fn both() -> [Arc<dyn Backend>; 2] {
    [backend("reference"), backend("cpu")]
}

/// An op under test: the backend and the float inputs (as tensors), returning the output.
type Op<'a> = dyn Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> + 'a;

fn vars(inputs: &[Tensor]) -> Vec<Var> {
    inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect()
}

/// The largest difference between the f32 gradients of two backward passes through the same
/// graph of `loss`, over every variable of `vs` (NaN if any difference is NaN).
fn repeated_backward_diff(loss: &Tensor, vs: &[Var]) -> f32 {
    let (g1, g2) = (loss.backward().unwrap(), loss.backward().unwrap());
    vs.iter()
        .map(|v| {
            let (a, b) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        // NaN wins, so that a NaN gradient fails the callers' assertions.
        .fold(0.0, |m, d| if d.is_nan() || d > m { d } else { m })
}

/// `Σ op(inputs) ⊙ r` for a fixed random `r`, so that every output element has its own weight.
fn weighted_loss(out: &Tensor, seed: u64) -> Result<Tensor> {
    let r = randn(seed, out.shape(), out.dtype(), &CPU)?;
    Ok((out * r)?.sum_all()?)
}

/// Checks the analytic gradient of `op` on `backend` against f64 central differences.
fn fd_op(be: &dyn Backend, inputs: &[Tensor], op: &Op<'_>) -> f64 {
    let inputs: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F64).unwrap())
        .collect();
    let vs = vars(&inputs);
    let refs: Vec<&Var> = vs.iter().collect();
    let f = || {
        let ts: Vec<&Tensor> = vs.iter().map(|v| v.as_tensor()).collect();
        weighted_loss(&op(be, &ts)?, 99)
    };
    assert_fd(&refs, f, FD_EPS, FD_TOL).worst
}

/// The output of `op` on `be` and the gradients of `Σ out ⊙ r` with respect to every input
/// (zeros for an input that gets none), with `r = randn(5)` of the output's shape in f32
/// (converted to the inputs' dtype, so that f32 and f64 runs weigh by the same numbers) unless
/// `r` is given.
fn quantities(
    be: &dyn Backend,
    inputs: &[Tensor],
    op: &Op<'_>,
    r: Option<&Tensor>,
) -> Result<Vec<Tensor>> {
    let vs = vars(inputs);
    let ts: Vec<&Tensor> = vs.iter().map(|v| v.as_tensor()).collect();
    let out = op(be, &ts)?;
    let r = match r {
        Some(r) => r.clone(),
        None => randn(5, out.shape(), DType::F32, &CPU)?.to_dtype(out.dtype())?,
    };
    let grads = (&out * &r)?.sum_all()?.backward()?;
    let mut q = vec![out];
    for v in &vs {
        q.push(match grads.get(v.as_tensor()) {
            Some(g) => g.clone(),
            None => v.zeros_like()?,
        });
    }
    Ok(q)
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Unit roundoff of f32, 2⁻²⁴.
const F32_U: f64 = 1.0 / 16_777_216.0;

/// Inputs (with the output weights) up to which [`compare`] computes the conditioning of a
/// comparison that fails the plain tolerance; beyond, the plain tolerance decides alone.
const CONDITIONING_MAX_INPUTS: usize = 20_000;

/// The first-order conditioning of every compared quantity of `op` (its output and its input
/// gradients, as in [`quantities`]) with respect to relative perturbations of the inputs and
/// of the output weights `r`: `S_i = Σ_j |∂Q_i/∂x_j| |x_j|`, from central differences of the
/// `reference` backend in f64 with relative steps 1e-6.
///
/// `S_i` is the sum of the magnitudes that enter the computation of `Q_i`: `Σ |x_j w_j|`
/// (twice) for a dot product, `|w g|/rms + |x̂| Σ|x̂ w g|/(d rms)`-like sums for the RMSNorm
/// backward, whatever the result's size after cancellation. A backward-stable computation
/// in f32 (each input perturbed relatively by at most `γ_n = n u`, `n` the longest sum)
/// errs by at most about `γ_n S_i` (Higham, *Accuracy and Stability of Numerical
/// Algorithms*, §3.1).
fn conditioning(inputs: &[Tensor], op: &Op<'_>) -> Vec<Vec<f64>> {
    let reference = backend("reference");
    let f64s: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F64).unwrap())
        .collect();
    let out = quantities(reference.as_ref(), &f64s, op, None).unwrap();
    let r = randn(5, out[0].shape(), DType::F32, &CPU)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let mut all = f64s;
    all.push(r);
    let n_in = inputs.len();
    let eval = |all: &[Tensor]| -> Vec<Vec<f64>> {
        quantities(reference.as_ref(), &all[..n_in], op, Some(&all[n_in]))
            .unwrap()
            .iter()
            .map(flat)
            .collect()
    };
    let mut s: Vec<Vec<f64>> = out.iter().map(|t| vec![0.0; t.elem_count()]).collect();
    const DELTA: f64 = 1e-6;
    for k in 0..all.len() {
        let base = flat(&all[k]);
        for (j, &v) in base.iter().enumerate() {
            if v == 0.0 {
                continue; // a zero input has no rounding to perturb
            }
            let mut p = base.clone();
            let mut at = |x: f64| {
                p[j] = x;
                let mut moved = all.clone();
                moved[k] = Tensor::from_slice(&p, all[k].shape(), &CPU).unwrap();
                eval(&moved)
            };
            let (plus, minus) = (at(v * (1.0 + DELTA)), at(v * (1.0 - DELTA)));
            for (sq, (qp, qm)) in s.iter_mut().zip(plus.iter().zip(&minus)) {
                for (si, (a, b)) in sq.iter_mut().zip(qp.iter().zip(qm)) {
                    *si += ((a - b) / (2.0 * DELTA)).abs();
                }
            }
        }
    }
    s
}

/// An upper bound on the length of the longest sum an op over `inputs` computes: the
/// largest of each input's last dimension and of its number of rows (elements over the last
/// dimension); every reduction of the ops here runs over one of those.
fn longest_sum(inputs: &[Tensor]) -> usize {
    inputs
        .iter()
        .map(|t| {
            let last = t.dims().last().copied().unwrap_or(1).max(1);
            last.max(t.elem_count() / last)
        })
        .max()
        .unwrap_or(1)
}

/// Runs `op` on `cpu` and `reference` in f32 and compares outputs and the gradients of every
/// input; returns a description of the first mismatch.
///
/// An element passes when `|c - r| <= atol + rtol |r|` (the `torch.testing` form) or, for
/// results of a cancellation, when `|c - r| <= 2 (4n + 16) u S` with `S` the element's
/// [`conditioning`] (the magnitudes that entered the computation), `u` the f32 unit
/// roundoff and `n` the [`longest_sum`]: each backend errs by at most about `γ_m S`, `m` the
/// total length of the sums chained on the way to the element, which for the blocks here
/// (a norm, a projection, the scores and the weighted values or the MLP's two products,
/// forward and backward) stays below `4n + 16`. The conditioning is computed only for
/// comparisons that fail the first test, so the common case stays cheap.
///
/// The conditioning covers rounding that a perturbation of the inputs can mimic. An
/// algorithm that cancels two terms which are the *same* function of the inputs is not
/// covered: the RMSNorm input gradient over a single feature (`d = 1`), whose two terms
/// `w g / rms` and `x̂ (x̂ w g) / rms` agree up to `eps / x²`; the proptests draw `d >= 2`
/// for the ops with a norm and [`rms_norm_of_one_feature_matches_its_closed_form`] checks
/// `d = 1` against its closed form with a tolerance on the terms' size. Nor is the softmax
/// backward `dS = P ⊙ (dP − D)` with the cpu kernel's `D = dO · O` (FlashAttention's
/// identity, equal to `Σ_j P_j dP_j` only in exact arithmetic): for a query with a single
/// visible key the exact `dS` is 0 whatever the inputs (`S = 0` for the gradients of its
/// query and of `q`'s weight), while both terms have the size of `dO · v`. Such errors
/// carry the magnitudes of the other gradients of the op, so a gradient element also passes
/// within `2 (4n + 16) u` times the largest `S` over all the op's input gradients: a
/// normwise bound (Higham §1.6, §3.5), still far below a wrong kernel's errors.
fn compare(
    inputs: &[Tensor],
    op: &Op<'_>,
    rtol: f64,
    atol: f64,
) -> std::result::Result<(), String> {
    let mut results = Vec::new();
    for be in both() {
        let q =
            quantities(be.as_ref(), inputs, op, None).map_err(|e| format!("{}: {e}", be.name()))?;
        results.push(q);
    }
    let (r, c) = (&results[0], &results[1]);
    let what = |i: usize| {
        if i == 0 {
            "forward".to_string()
        } else {
            format!("gradient of input {}", i - 1)
        }
    };
    let mut cond: Option<Vec<Vec<f64>>> = None;
    let n = longest_sum(inputs) as f64;
    for (i, (ct, rt)) in c.iter().zip(r).enumerate() {
        let cl = closeness(ct, rt, rtol, atol).map_err(|e| e.to_string())?;
        if cl.ratio <= 1.0 {
            continue;
        }
        let total: usize = inputs.iter().map(|t| t.elem_count()).sum::<usize>() + r[0].elem_count();
        if total > CONDITIONING_MAX_INPUTS {
            return Err(format!("{} differs: {cl:?}", what(i)));
        }
        let s = cond.get_or_insert_with(|| conditioning(inputs, op));
        // Gradients are also judged normwise, against the largest conditioning of any input
        // gradient of the op (see the doc comment).
        let grad_norm = if i == 0 {
            0.0
        } else {
            s[1..].iter().flatten().fold(0.0f64, |m, &v| m.max(v))
        };
        let (cv, rv) = (flat(ct), flat(rt));
        for (j, (&a, &e)) in cv.iter().zip(&rv).enumerate() {
            if a == e || (a.is_nan() && e.is_nan()) {
                continue;
            }
            let bound =
                (atol + rtol * e.abs()).max((8.0 * n + 32.0) * F32_U * s[i][j].max(grad_norm));
            let diff = (a - e).abs();
            if diff.is_nan() || diff > bound {
                return Err(format!(
                    "{} differs at element {j}: {a} vs {e} (|diff| {:e}, conditioning S {:e}, \
                     bound {bound:e})",
                    what(i),
                    diff,
                    s[i][j]
                ));
            }
        }
    }
    Ok(())
}

fn u32s(v: Vec<u32>, shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v, shape, &CPU).unwrap()
}

// ---------------------------------------------------------------------------------------
// Ops as closures over their non-differentiable arguments.

fn rms_op(eps: f64) -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    move |be, t| be.rms_norm(t[0], t[1], eps)
}

fn rope_op(
    pos: Tensor,
    max_pos: usize,
    dh: usize,
) -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    let (cos, sin) = rope_tables(max_pos, dh, 10_000.0, &CPU).unwrap();
    move |be, t| be.rope(t[0], &pos, &cos, &sin)
}

/// RoPE whose tables are inputs too (`t[1]`, `t[2]`), to check their gradients.
fn rope_tables_op(pos: Tensor) -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    move |be, t| be.rope(t[0], &pos, t[1], t[2])
}

fn attn_op(q_pos: Tensor, k_pos: Tensor) -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    move |be, t| be.attention(t[0], t[1], t[2], &q_pos, &k_pos)
}

fn swiglu_op() -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    |be, t| be.swiglu(t[0], t[1])
}

/// `attention_block` on `(h, norm, q, k, v, o)` with `heads`/`kv_heads`, positions `pos`
/// and tables for `max_pos` positions.
fn attn_block_op(
    pos: Tensor,
    (heads, kv_heads): (usize, usize),
    max_pos: usize,
    dh: usize,
) -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    let (cos, sin) = rope_tables(max_pos, dh, 10_000.0, &CPU).unwrap();
    move |be, t| {
        let w = AttentionWeights {
            norm: t[1],
            eps: 1e-5,
            q: t[2],
            k: t[3],
            v: t[4],
            o: t[5],
            heads,
            kv_heads,
        };
        be.attention_block(t[0], &w, &pos, &cos, &sin)
    }
}

/// Inputs of `attention_block`: `h: [b, t, d]`, `norm: [d]` around 1, `q: [hq·dh, d]`,
/// `k`, `v: [hkv·dh, d]`, `o: [d, hq·dh]`, weights scaled by `1/sqrt(fan_in)`.
fn attn_block_inputs(
    seed: u64,
    (b, t, d): (usize, usize, usize),
    (hq, hkv, dh): (usize, usize, usize),
    dtype: DType,
) -> Vec<Tensor> {
    let scaled = |s: u64, shape: (usize, usize)| {
        let r = randn(s, shape, dtype, &CPU).unwrap();
        r.affine(1.0 / (shape.1 as f64).sqrt(), 0.0).unwrap()
    };
    vec![
        randn(seed, (b, t, d), dtype, &CPU).unwrap(),
        randn(seed + 1, d, dtype, &CPU)
            .unwrap()
            .affine(0.3, 1.0)
            .unwrap(),
        scaled(seed + 2, (hq * dh, d)),
        scaled(seed + 3, (hkv * dh, d)),
        scaled(seed + 4, (hkv * dh, d)),
        scaled(seed + 5, (d, hq * dh)),
    ]
}

/// Sorted positions per row drawn from `0..3t`, some replaced by `PAD_POS`.
fn block_positions(seed: u64, b: usize, t: usize) -> Tensor {
    let mut rng = Rng::new(seed);
    let mut pos = Vec::new();
    for _ in 0..b {
        for p in sorted_sample(&mut rng, t, 3 * t) {
            pos.push(if rng.below(7) == 0 { PAD_POS } else { p });
        }
    }
    u32s(pos, (b, t))
}

/// `mlp_block` on `(h, norm_w, gate, up, down)`.
fn mlp_op(eps: f64) -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    move |be, t| be.mlp_block(t[0], t[1], eps, t[2], t[3], t[4])
}

/// Inputs of `mlp_block`: `h: [b, t, d]`, `norm_w: [d]` around 1, `gate`/`up: [ff, d]`,
/// `down: [d, ff]`, the weights scaled by `1/sqrt(fan_in)` so that activations stay O(1)
/// (unscaled weights make outputs of size `d·ff` whose f32 rounding swamps the comparison).
fn mlp_inputs(seed: u64, (b, t, d, ff): (usize, usize, usize, usize), dtype: DType) -> Vec<Tensor> {
    let scaled = |s: u64, shape: (usize, usize), fan_in: usize| {
        let r = randn(s, shape, dtype, &CPU).unwrap();
        r.affine(1.0 / (fan_in as f64).sqrt(), 0.0).unwrap()
    };
    vec![
        randn(seed, (b, t, d), dtype, &CPU).unwrap(),
        randn(seed + 1, d, dtype, &CPU)
            .unwrap()
            .affine(0.3, 1.0)
            .unwrap(),
        scaled(seed + 2, (ff, d), d),
        scaled(seed + 3, (ff, d), d),
        scaled(seed + 4, (d, ff), ff),
    ]
}

fn gather_op(idx: Tensor) -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    move |be, t| be.gather_tokens(t[0], &idx)
}

fn scatter_op(idx: Tensor, weighted: bool) -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    move |be, t| be.scatter_add_tokens(t[0], &idx, t[1], weighted.then(|| t[2]))
}

// ---------------------------------------------------------------------------------------
// Random attention cases.

/// How queries relate to keys.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Queries are the keys (a compacted subsequence with gaps), some slots padded.
    Compacted,
    /// Keys are the full context `0..s` (some padded), queries a sorted subset (KV sharing).
    Shared,
    /// Unsorted positions on both sides, with padding.
    Shuffled,
}

#[derive(Debug, Clone)]
struct AttnCase {
    b: usize,
    hq: usize,
    hkv: usize,
    t: usize,
    s: usize,
    dh: usize,
    q_pos: Vec<u32>,
    k_pos: Vec<u32>,
}

fn sorted_sample(rng: &mut Rng, n: usize, below: usize) -> Vec<u32> {
    let mut all: Vec<u32> = (0..below as u32).collect();
    rng.shuffle(&mut all);
    let mut v = all[..n].to_vec();
    v.sort_unstable();
    v
}

fn attn_case(
    b: usize,
    hkv: usize,
    ratio: usize,
    dh: usize,
    t: usize,
    s: usize,
    mode: Mode,
    seed: u64,
) -> AttnCase {
    let mut rng = Rng::new(seed);
    let (mut q_pos, mut k_pos) = (Vec::new(), Vec::new());
    let (t, s) = match mode {
        Mode::Compacted => (t, t),
        Mode::Shared => (t.min(s), s),
        Mode::Shuffled => (t, s),
    };
    for _ in 0..b {
        match mode {
            Mode::Compacted => {
                let mut p = sorted_sample(&mut rng, t, 3 * t);
                let mut kp = p.clone();
                for i in 0..t {
                    match rng.below(8) {
                        0 => (p[i], kp[i]) = (PAD_POS, PAD_POS), // a padded slot
                        1 => kp[i] = PAD_POS,                    // a padded key only
                        _ => {}
                    }
                }
                q_pos.extend(p);
                k_pos.extend(kp);
            }
            Mode::Shared => {
                k_pos.extend((0..s as u32).map(|p| if rng.below(10) == 0 { PAD_POS } else { p }));
                q_pos.extend(sorted_sample(&mut rng, t, s));
            }
            Mode::Shuffled => {
                let pick = |rng: &mut Rng| {
                    if rng.below(6) == 0 {
                        PAD_POS
                    } else {
                        rng.below(2 * s) as u32
                    }
                };
                for _ in 0..s {
                    k_pos.push(pick(&mut rng));
                }
                for _ in 0..t {
                    q_pos.push(pick(&mut rng));
                }
            }
        }
    }
    AttnCase {
        b,
        hq: hkv * ratio,
        hkv,
        t,
        s,
        dh,
        q_pos,
        k_pos,
    }
}

impl AttnCase {
    fn inputs(&self, seed: u64, dtype: DType) -> Vec<Tensor> {
        vec![
            randn(seed, (self.b, self.hq, self.t, self.dh), dtype, &CPU).unwrap(),
            randn(seed + 1, (self.b, self.hkv, self.s, self.dh), dtype, &CPU).unwrap(),
            randn(seed + 2, (self.b, self.hkv, self.s, self.dh), dtype, &CPU).unwrap(),
        ]
    }

    fn op(&self) -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
        attn_op(
            u32s(self.q_pos.clone(), (self.b, self.t)),
            u32s(self.k_pos.clone(), (self.b, self.s)),
        )
    }
}

fn mode_strategy() -> impl Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::Compacted),
        Just(Mode::Shared),
        Just(Mode::Shuffled)
    ]
}

// ---------------------------------------------------------------------------------------
// Registry.

#[test]
fn backends_are_registered_and_reject_unknown_params() {
    let names = mor_core::registry::names(mor_core::Family::Backend);
    for name in ["cpu", "reference"] {
        assert!(
            names.iter().any(|n| n == name),
            "`{name}` missing from {names:?}"
        );
        assert_eq!(backend(name).name(), name);
        let mut bad = toml::Table::new();
        bad.insert("threads".into(), toml::Value::Integer(2));
        let err = build_backend(name, &bad, &BackendCtx::new(CPU)).unwrap_err();
        assert!(err.to_string().contains("threads"), "{err}");
    }
}

// ---------------------------------------------------------------------------------------
// Finite differences (f64), on both backends.

#[test]
fn rms_norm_gradients_match_finite_differences() {
    let x = randn(1, (3, 2, 11), DType::F64, &CPU).unwrap();
    let w = randn(2, 11, DType::F64, &CPU)
        .unwrap()
        .affine(0.5, 1.0)
        .unwrap();
    for be in both() {
        fd_op(be.as_ref(), &[x.clone(), w.clone()], &rms_op(1e-5));
    }
}

#[test]
fn rope_gradients_match_finite_differences() {
    let pos = u32s(vec![0, 3, 7, PAD_POS, 2, 2, 9, 1], (2, 4));
    let x = randn(3, (2, 3, 4, 6), DType::F64, &CPU).unwrap();
    let (cos, sin) = rope_tables(10, 6, 10_000.0, &CPU).unwrap();
    for be in both() {
        fd_op(
            be.as_ref(),
            std::slice::from_ref(&x),
            &rope_op(pos.clone(), 10, 6),
        );
        // The tables are floating-point inputs too: their gradients are checked as well.
        fd_op(
            be.as_ref(),
            &[x.clone(), cos.clone(), sin.clone()],
            &rope_tables_op(pos.clone()),
        );
    }
}

#[test]
fn attention_gradients_match_finite_differences() {
    for (i, mode) in [Mode::Compacted, Mode::Shared, Mode::Shuffled]
        .into_iter()
        .enumerate()
    {
        let case = attn_case(2, 2, 2, 4, 5, 7, mode, 40 + i as u64);
        for be in both() {
            fd_op(be.as_ref(), &case.inputs(10, DType::F64), &case.op());
        }
    }
    // Long enough head dimension to run the vector lanes of the kernels, GQA ratio 4.
    let case = attn_case(1, 1, 4, 18, 3, 3, Mode::Compacted, 7);
    fd_op(
        backend("cpu").as_ref(),
        &case.inputs(20, DType::F64),
        &case.op(),
    );
}

#[test]
fn swiglu_gradients_match_finite_differences() {
    let g = (randn(4, (3, 13), DType::F64, &CPU).unwrap() * 3.0).unwrap();
    let u = randn(5, (3, 13), DType::F64, &CPU).unwrap();
    for be in both() {
        fd_op(be.as_ref(), &[g.clone(), u.clone()], &swiglu_op());
    }
}

#[test]
fn token_routing_gradients_match_finite_differences() {
    let h = randn(6, (2, 5, 9), DType::F64, &CPU).unwrap();
    // Gather may repeat an index; its gradient must add up.
    let gidx = u32s(vec![4, 0, 0, 1, 2, 3], (2, 3));
    let sidx = u32s(vec![4, 0, 2, 1, 2, 3], (2, 3));
    let y = randn(7, (2, 3, 9), DType::F64, &CPU).unwrap();
    let w = randn(8, (2, 3), DType::F64, &CPU).unwrap();
    for be in both() {
        fd_op(
            be.as_ref(),
            std::slice::from_ref(&h),
            &gather_op(gidx.clone()),
        );
        fd_op(
            be.as_ref(),
            &[h.clone(), y.clone(), w.clone()],
            &scatter_op(sidx.clone(), true),
        );
        fd_op(
            be.as_ref(),
            &[h.clone(), y.clone()],
            &scatter_op(sidx.clone(), false),
        );
    }
}

/// The projection ops of a decoder layer: `linear`, `split_heads`, `merge_heads` and
/// `rope_heads` (their cpu versions are single fused nodes; the reference ones are the plain
/// candle chains).
fn linear_op() -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    |be, t| be.linear(t[0], t[1])
}

fn split_op(heads: usize) -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    move |be, t| be.split_heads(t[0], heads)
}

fn merge_op() -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    |be, t| be.merge_heads(t[0])
}

fn rope_heads_op(
    pos: Tensor,
    heads: usize,
    max_pos: usize,
    dh: usize,
) -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    let (cos, sin) = rope_tables(max_pos, dh, 10_000.0, &CPU).unwrap();
    move |be, t| be.rope_heads(t[0], heads, &pos, &cos, &sin)
}

#[test]
fn projection_gradients_match_finite_differences() {
    let x = randn(21, (2, 3, 5), DType::F64, &CPU).unwrap();
    let w = randn(22, (4, 5), DType::F64, &CPU).unwrap();
    let p = randn(23, (2, 4, 6), DType::F64, &CPU).unwrap(); // 3 heads of 2, or 2 of 3
    let hm = randn(24, (2, 3, 4, 2), DType::F64, &CPU).unwrap();
    let pos = u32s(vec![0, 3, 7, PAD_POS, 2, 2, 9, 1], (2, 4));
    let r = randn(25, (2, 4, 12), DType::F64, &CPU).unwrap(); // 2 heads of 6
    for be in both() {
        fd_op(be.as_ref(), &[x.clone(), w.clone()], &linear_op());
        fd_op(be.as_ref(), std::slice::from_ref(&p), &split_op(3));
        fd_op(be.as_ref(), std::slice::from_ref(&hm), &merge_op());
        fd_op(
            be.as_ref(),
            std::slice::from_ref(&r),
            &rope_heads_op(pos.clone(), 2, 10, 6),
        );
    }
}

#[test]
fn attention_block_gradients_match_finite_differences() {
    // GQA (4 query heads over 2 key/value heads), a padded query and key, a gap in positions.
    let pos = u32s(vec![0, 1, 4, 5, 2, PAD_POS, 3, 6], (2, 4));
    let inputs = attn_block_inputs(61, (2, 4, 6), (4, 2, 2), DType::F64);
    for be in both() {
        fd_op(
            be.as_ref(),
            &inputs,
            &attn_block_op(pos.clone(), (4, 2), 8, 2),
        );
    }
}

/// Shapes big enough for the threaded paths, against `reference` (f64 to rounding, f32 within
/// the tolerance of sums over hundreds of terms); a second backward pass through the same
/// graph gives the same gradients; trainable RoPE tables get their gradients (the cpu
/// backend then composes the half from its single ops).
#[test]
fn attention_block_threaded_paths_match_reference() {
    let (b, t, d) = (2, 96, 64);
    let heads = (4, 2, 16);
    let pos = block_positions(71, b, t);
    let op = attn_block_op(pos.clone(), (4, 2), 3 * t, 16);
    let r = compare(
        &attn_block_inputs(71, (b, t, d), heads, DType::F64),
        &op,
        1e-10,
        1e-10,
    );
    assert!(r.is_ok(), "f64: {}", r.unwrap_err());
    let inputs = attn_block_inputs(71, (b, t, d), heads, DType::F32);
    let r = compare(&inputs, &op, 1e-4, 1e-4);
    assert!(r.is_ok(), "f32: {}", r.unwrap_err());

    let be = backend("cpu");
    let vs = vars(&inputs);
    let ts: Vec<&Tensor> = vs.iter().map(|v| v.as_tensor()).collect();
    let loss = weighted_loss(&op(be.as_ref(), &ts).unwrap(), 3).unwrap();
    assert_eq!(repeated_backward_diff(&loss, &vs), 0.0);

    let small = attn_block_inputs(81, (1, 3, 4), (2, 1, 2), DType::F64);
    let pos = u32s(vec![0, 2, 3], (1, 3));
    let (cos, sin) = rope_tables(5, 2, 10_000.0, &CPU).unwrap();
    let tables = [
        cos.to_dtype(DType::F64).unwrap(),
        sin.to_dtype(DType::F64).unwrap(),
    ];
    let with_tables = move |be: &dyn Backend, t: &[&Tensor]| {
        let w = AttentionWeights {
            norm: t[1],
            eps: 1e-5,
            q: t[2],
            k: t[3],
            v: t[4],
            o: t[5],
            heads: 2,
            kv_heads: 1,
        };
        be.attention_block(t[0], &w, &pos, t[6], t[7])
    };
    let mut all = small;
    all.extend(tables);
    for be in both() {
        fd_op(be.as_ref(), &all, &with_tables);
    }
}

#[test]
fn attention_block_rejects_bad_input() {
    let ok = attn_block_inputs(91, (1, 3, 8), (2, 1, 4), DType::F32);
    let pos = u32s(vec![0, 1, 2], (1, 3));
    let bad = |i: usize, t: Tensor| {
        let mut v = ok.clone();
        v[i] = t;
        v
    };
    let r = |s: u64, shape: (usize, usize)| randn(s, shape, DType::F32, &CPU).unwrap();
    let cases = [
        (
            bad(0, randn(1, (3, 8), DType::F32, &CPU).unwrap()),
            "`h` must be [b, t, d]",
        ),
        (
            bad(1, randn(1, 5, DType::F32, &CPU).unwrap()),
            "`norm` must have shape [8]",
        ),
        (bad(2, r(1, (6, 8))), "even dh"),
        (bad(3, r(1, (8, 8))), "`k` [8, 8] must be [4, 8]"),
        (bad(4, r(1, (4, 7))), "`v` [4, 7] must be [4, 8]"),
        (bad(5, r(1, (8, 4))), "`o` [8, 4] must be [8, 8]"),
        (
            bad(5, randn(1, (8, 8), DType::F64, &CPU).unwrap()),
            "`o` is F64",
        ),
    ];
    for be in both() {
        for (inputs, want) in &cases {
            let ts: Vec<&Tensor> = inputs.iter().collect();
            let e = attn_block_op(pos.clone(), (2, 1), 4, 4)(be.as_ref(), &ts)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("attention_block") && e.contains(want),
                "{}: {e}",
                be.name()
            );
        }
        let ts: Vec<&Tensor> = ok.iter().collect();
        let far = u32s(vec![0, 1, 9], (1, 3));
        let e = attn_block_op(far, (2, 1), 4, 4)(be.as_ref(), &ts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("position 9 is outside"), "{e}");
        let e = attn_block_op(pos.clone(), (3, 1), 4, 4)(be.as_ref(), &ts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("heads"), "{e}");
    }
}

fn lce_op(targets: Tensor) -> impl Fn(&dyn Backend, &[&Tensor]) -> Result<Tensor> {
    move |be, t| be.linear_cross_entropy(t[0], t[1], &targets)
}

#[test]
fn linear_cross_entropy_matches_finite_differences_and_closed_form() {
    let x = randn(101, (2, 3, 4), DType::F64, &CPU).unwrap();
    let w = randn(102, (7, 4), DType::F64, &CPU).unwrap();
    let tg = u32s(vec![0, 6, 3, 3, 1, 5], (2, 3));
    for be in both() {
        fd_op(be.as_ref(), &[x.clone(), w.clone()], &lce_op(tg.clone()));
        // All-zero head weights: uniform logits, loss ln V exactly.
        let zero = Tensor::zeros((7, 4), DType::F32, &CPU).unwrap();
        let l = be
            .linear_cross_entropy(&x.to_dtype(DType::F32).unwrap(), &zero, &tg)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l as f64 - 7f64.ln()).abs() < 1e-6, "{}: {l}", be.name());
    }
}

/// Threaded shapes against `reference`; a second backward pass through the same graph (the
/// cpu op hands its kept exponentials to the first one) recomputes and agrees.
#[test]
fn linear_cross_entropy_threaded_paths_match_reference() {
    let (n, d, v) = (300, 48, 1000);
    let x = randn(111, (n, d), DType::F32, &CPU).unwrap();
    let w = randn(112, (v, d), DType::F32, &CPU)
        .unwrap()
        .affine(0.2, 0.0)
        .unwrap();
    let mut rng = Rng::new(7);
    let tg = Tensor::from_vec(
        (0..n).map(|_| rng.below(v) as u32).collect::<Vec<_>>(),
        n,
        &CPU,
    )
    .unwrap();
    let r = compare(&[x.clone(), w.clone()], &lce_op(tg.clone()), 1e-5, 1e-6);
    assert!(r.is_ok(), "{}", r.unwrap_err());
    let be = backend("cpu");
    let vs = vars(&[x, w]);
    let loss = be
        .linear_cross_entropy(vs[0].as_tensor(), vs[1].as_tensor(), &tg)
        .unwrap();
    assert!(repeated_backward_diff(&loss, &vs) < 1e-7);
}

#[test]
fn linear_cross_entropy_rejects_bad_targets() {
    let x = randn(121, (2, 4), DType::F32, &CPU).unwrap();
    let w = randn(122, (5, 4), DType::F32, &CPU).unwrap();
    for be in both() {
        let e = be
            .linear_cross_entropy(&x, &w, &u32s(vec![0, 5], (1, 2)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("linear_cross_entropy") && e.contains("target 5 is outside"),
            "{e}"
        );
        let e = be
            .linear_cross_entropy(&x, &w, &u32s(vec![0, 1, 2], (1, 3)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 targets for 2 rows"), "{e}");
        let f = Tensor::new(&[0f32, 1.0], &CPU).unwrap();
        let e = be.linear_cross_entropy(&x, &w, &f).unwrap_err().to_string();
        assert!(e.contains("`targets` must be u32"), "{e}");
        let w3 = randn(123, (5, 3), DType::F32, &CPU).unwrap();
        let e = be
            .linear_cross_entropy(&x, &w3, &u32s(vec![0, 1], (1, 2)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`w` [5, 3] does not match"), "{e}");
    }
}

#[test]
fn mlp_block_gradients_match_finite_differences() {
    let inputs = mlp_inputs(31, (2, 3, 5, 7), DType::F64);
    for be in both() {
        fd_op(be.as_ref(), &inputs, &mlp_op(1e-5));
    }
}

/// Shapes big enough for the threaded paths of the fused op (row blocks over rayon, threaded
/// products), against `reference`; and a second backward pass through the same graph gives
/// the same gradients (the op keeps its intermediates rather than consuming them).
#[test]
fn mlp_block_threaded_paths_match_reference_and_backward_repeats() {
    // In f64 the two backends agree to rounding; in f32 the norm weight's gradient sums 400
    // rows and the products sum up to 320 terms, in another order than candle's ops.
    let shape = (2, 200, 96, 160);
    let r = compare(
        &mlp_inputs(41, shape, DType::F64),
        &mlp_op(1e-5),
        1e-10,
        1e-10,
    );
    assert!(r.is_ok(), "f64: {}", r.unwrap_err());
    let inputs = mlp_inputs(41, shape, DType::F32);
    let r = compare(&inputs, &mlp_op(1e-5), 1e-4, 1e-4);
    assert!(r.is_ok(), "f32: {}", r.unwrap_err());
    let be = backend("cpu");
    let vs = vars(&inputs);
    let ts: Vec<&Tensor> = vs.iter().map(|v| v.as_tensor()).collect();
    let loss = weighted_loss(&mlp_op(1e-5)(be.as_ref(), &ts).unwrap(), 3).unwrap();
    assert_eq!(repeated_backward_diff(&loss, &vs), 0.0);
}

#[test]
fn mlp_block_rejects_bad_shapes() {
    let ok = mlp_inputs(51, (1, 2, 4, 3), DType::F32);
    let bad = |i: usize, t: Tensor| {
        let mut v = ok.clone();
        v[i] = t;
        v
    };
    let cases = [
        (
            bad(1, randn(1, 5, DType::F32, &CPU).unwrap()),
            "`norm_w` must have shape [4]",
        ),
        (
            bad(2, randn(1, (3, 5), DType::F32, &CPU).unwrap()),
            "`gate` [3, 5] must be [ff, 4]",
        ),
        (
            bad(3, randn(1, (2, 4), DType::F32, &CPU).unwrap()),
            "`up` [2, 4]",
        ),
        (
            bad(4, randn(1, (3, 4), DType::F32, &CPU).unwrap()),
            "`down` [3, 4] must be [4, 3]",
        ),
        (
            bad(4, randn(1, (4, 3), DType::F64, &CPU).unwrap()),
            "`down` is F64",
        ),
    ];
    for be in both() {
        for (inputs, want) in &cases {
            let ts: Vec<&Tensor> = inputs.iter().collect();
            let e = mlp_op(1e-5)(be.as_ref(), &ts).unwrap_err().to_string();
            assert!(
                e.contains("mlp_block") && e.contains(want),
                "{}: {e}",
                be.name()
            );
        }
        let ts: Vec<&Tensor> = ok.iter().collect();
        let e = mlp_op(-1.0)(be.as_ref(), &ts).unwrap_err().to_string();
        assert!(e.contains("eps"), "{e}");
    }
}

#[test]
fn head_layouts_are_exact_permutations() {
    // [b=1, t=2, h=2, dh=2] numbered 0..8: split puts head 0 of both tokens first.
    let x = Tensor::arange(0f32, 8.0, &CPU)
        .unwrap()
        .reshape((1, 2, 4))
        .unwrap();
    for be in both() {
        let s = be.split_heads(&x, 2).unwrap();
        assert_eq!(
            s.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0],
            "{}",
            be.name()
        );
        let m = be.merge_heads(&s).unwrap();
        assert_eq!(
            m.to_vec3::<f32>().unwrap(),
            x.to_vec3::<f32>().unwrap(),
            "{}",
            be.name()
        );
        // y = x wᵀ with w = [[1, 0, 0, 0], [1, 1, 1, 1]]: first column, then row sums.
        let w = Tensor::new(&[[1f32, 0., 0., 0.], [1., 1., 1., 1.]], &CPU).unwrap();
        let y = be.linear(&x, &w).unwrap();
        assert_eq!(y.to_vec3::<f32>().unwrap(), [[[0.0, 6.0], [4.0, 22.0]]]);
    }
}

#[test]
fn projection_ops_reject_bad_shapes() {
    let x = randn(1, (2, 3, 6), DType::F32, &CPU).unwrap();
    let (cos, sin) = rope_tables(8, 2, 10_000.0, &CPU).unwrap();
    let pos = u32s(vec![0, 1, 2, 0, 1, 2], (2, 3));
    for be in both() {
        let w = randn(2, (4, 5), DType::F32, &CPU).unwrap();
        let e = be.linear(&x, &w).unwrap_err().to_string();
        assert!(e.contains("linear") && e.contains("[4, 5]"), "{e}");
        let e = be.split_heads(&x, 4).unwrap_err().to_string();
        assert!(e.contains("multiple of heads (4)"), "{e}");
        let e = be.split_heads(&x, 0).unwrap_err().to_string();
        assert!(e.contains("heads (0)"), "{e}");
        let e = be.merge_heads(&x).unwrap_err().to_string();
        assert!(e.contains("merge_heads"), "{e}");
        // 3 heads of 2 with tables for head_dim 2 work; a position beyond the table fails.
        assert!(be.rope_heads(&x, 3, &pos, &cos, &sin).is_ok());
        let far = u32s(vec![0, 1, 9, 0, 1, 2], (2, 3));
        assert!(be.rope_heads(&x, 3, &far, &cos, &sin).is_err());
    }
}

// ---------------------------------------------------------------------------------------
// cpu against reference (f32), random shapes.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn attention_cpu_matches_reference(
        b in 1usize..3,
        hkv in 1usize..3,
        ratio in prop_oneof![Just(1usize), Just(2), Just(4)],
        half in 1usize..9,
        t in 1usize..25,
        s in 1usize..25,
        mode in mode_strategy(),
        seed in 0u64..1_000_000,
    ) {
        let case = attn_case(b, hkv, ratio, 2 * half, t, s, mode, seed);
        let r = compare(&case.inputs(seed, DType::F32), &case.op(), F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "{case:?}: {}", r.unwrap_err());
    }

    #[test]
    fn elementwise_ops_cpu_match_reference(
        rows in 1usize..6,
        d in 1usize..40,
        seed in 0u64..1_000_000,
    ) {
        // The norm over d >= 2 (see `compare` on d = 1); swiglu is elementwise, any d.
        let dn = d.max(2);
        let xn = randn(seed, (rows, 2, dn), DType::F32, &CPU).unwrap();
        let w = randn(seed + 1, dn, DType::F32, &CPU).unwrap();
        let r = compare(&[xn, w], &rms_op(1e-5), F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "rms_norm rows {rows} d {dn}: {}", r.unwrap_err());
        let x = randn(seed, (rows, 2, d), DType::F32, &CPU).unwrap();
        let u = randn(seed + 2, (rows, 2, d), DType::F32, &CPU).unwrap();
        let g = (x * 4.0).unwrap();
        let r = compare(&[g, u], &swiglu_op(), F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "swiglu rows {rows} d {d}: {}", r.unwrap_err());
    }

    #[test]
    fn projection_ops_cpu_match_reference(
        b in 1usize..3,
        t in 1usize..9,
        h in 1usize..4,
        half in 1usize..6,
        out in 1usize..20,
        seed in 0u64..1_000_000,
    ) {
        let dh = 2 * half;
        let x = randn(seed, (b, t, h * dh), DType::F32, &CPU).unwrap();
        let w = randn(seed + 1, (out, h * dh), DType::F32, &CPU).unwrap();
        let r = compare(&[x.clone(), w], &linear_op(), F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "linear: {}", r.unwrap_err());
        let r = compare(std::slice::from_ref(&x), &split_op(h), F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "split_heads: {}", r.unwrap_err());
        let hm = randn(seed + 2, (b, h, t, dh), DType::F32, &CPU).unwrap();
        let r = compare(&[hm], &merge_op(), F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "merge_heads: {}", r.unwrap_err());
        let mut rng = Rng::new(seed);
        let max_pos = 3 * t;
        let mut pos = Vec::new();
        for _ in 0..b {
            for p in sorted_sample(&mut rng, t, max_pos) {
                pos.push(if rng.below(7) == 0 { PAD_POS } else { p });
            }
        }
        let op = rope_heads_op(u32s(pos, (b, t)), h, max_pos, dh);
        let r = compare(&[x], &op, F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "rope_heads: {}", r.unwrap_err());
    }

    #[test]
    fn attention_block_cpu_matches_reference(
        b in 1usize..3,
        t in 1usize..9,
        hkv in 1usize..3,
        ratio in prop_oneof![Just(1usize), Just(2)],
        half in 1usize..4,
        // From 2: with d = 1 the RMSNorm output is ±1 whatever x, its input gradient is a
        // difference of two equal terms scaled by 1/|x| (see `compare`).
        d in 2usize..12,
        seed in 0u64..1_000_000,
    ) {
        let (hq, dh) = (hkv * ratio, 2 * half);
        let inputs = attn_block_inputs(seed, (b, t, d), (hq, hkv, dh), DType::F32);
        let op = attn_block_op(block_positions(seed, b, t), (hq, hkv), 3 * t, dh);
        let r = compare(&inputs, &op, F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "b {b} t {t} hq {hq} hkv {hkv} dh {dh} d {d} seed {seed}: {}", r.unwrap_err());
    }

    #[test]
    fn linear_cross_entropy_cpu_matches_reference(
        n in 1usize..12,
        d in 1usize..10,
        v in 1usize..40,
        seed in 0u64..1_000_000,
    ) {
        let x = randn(seed, (n, d), DType::F32, &CPU).unwrap();
        let w = randn(seed + 1, (v, d), DType::F32, &CPU).unwrap();
        let mut rng = Rng::new(seed);
        let tg: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
        let tg = Tensor::from_vec(tg, n, &CPU).unwrap();
        let r = compare(&[x, w], &lce_op(tg), F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "n {n} d {d} v {v}: {}", r.unwrap_err());
    }

    #[test]
    fn mlp_block_cpu_matches_reference(
        b in 1usize..3,
        t in 1usize..6,
        // From 2: the norm's input gradient over one feature (see `compare`).
        d in 2usize..24,
        ff in 1usize..20,
        seed in 0u64..1_000_000,
    ) {
        let inputs = mlp_inputs(seed, (b, t, d, ff), DType::F32);
        let r = compare(&inputs, &mlp_op(1e-5), F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "b {b} t {t} d {d} ff {ff}: {}", r.unwrap_err());
    }

    #[test]
    fn rope_cpu_matches_reference(
        b in 1usize..3,
        h in 1usize..4,
        t in 1usize..12,
        half in 1usize..9,
        seed in 0u64..1_000_000,
    ) {
        let mut rng = Rng::new(seed);
        let max_pos = 3 * t;
        let mut pos = Vec::new();
        for _ in 0..b {
            for p in sorted_sample(&mut rng, t, max_pos) {
                pos.push(if rng.below(7) == 0 { PAD_POS } else { p });
            }
        }
        let x = randn(seed, (b, h, t, 2 * half), DType::F32, &CPU).unwrap();
        let r = compare(&[x], &rope_op(u32s(pos, (b, t)), max_pos, 2 * half), F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    fn routing_cpu_matches_reference(
        b in 1usize..3,
        l in 1usize..20,
        d in 1usize..20,
        frac in 0.0f64..1.0,
        seed in 0u64..1_000_000,
    ) {
        let k = ((l as f64 * frac) as usize).max(1);
        let mut rng = Rng::new(seed);
        let mut idx = Vec::new();
        for _ in 0..b {
            idx.extend(sorted_sample(&mut rng, k, l));
        }
        let idx = u32s(idx, (b, k));
        let h = randn(seed, (b, l, d), DType::F32, &CPU).unwrap();
        let y = randn(seed + 1, (b, k, d), DType::F32, &CPU).unwrap();
        let w = randn(seed + 2, (b, k), DType::F32, &CPU).unwrap();
        let r = compare(std::slice::from_ref(&h), &gather_op(idx.clone()), F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "gather: {}", r.unwrap_err());
        let r = compare(&[h.clone(), y.clone(), w], &scatter_op(idx.clone(), true), F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "weighted scatter: {}", r.unwrap_err());
        let r = compare(&[h, y], &scatter_op(idx, false), F32_RTOL, F32_ATOL);
        prop_assert!(r.is_ok(), "scatter: {}", r.unwrap_err());
    }
}

/// Shapes large enough to take the multi-threaded paths of every op.
#[test]
fn large_shapes_cpu_match_reference() {
    let case = attn_case(2, 2, 2, 32, 64, 64, Mode::Compacted, 3);
    compare(&case.inputs(1, DType::F32), &case.op(), F32_RTOL, F32_ATOL).unwrap();
    let case = attn_case(2, 1, 4, 16, 48, 96, Mode::Shared, 4);
    compare(&case.inputs(2, DType::F32), &case.op(), F32_RTOL, F32_ATOL).unwrap();
    let x = randn(3, (300, 130), DType::F32, &CPU).unwrap();
    let w = randn(4, 130, DType::F32, &CPU).unwrap();
    compare(&[x.clone(), w], &rms_op(1e-5), F32_RTOL, F32_ATOL).unwrap();
    let u = randn(5, (300, 130), DType::F32, &CPU).unwrap();
    compare(&[(x * 3.0).unwrap(), u], &swiglu_op(), F32_RTOL, F32_ATOL).unwrap();
    let pos = u32s((0..2 * 64).map(|i| (i % 64) as u32 * 2).collect(), (2, 64));
    let x = randn(6, (2, 4, 64, 64), DType::F32, &CPU).unwrap();
    compare(&[x], &rope_op(pos, 128, 64), F32_RTOL, F32_ATOL).unwrap();
    let idx = u32s(
        (0..2 * 100).map(|i| (i % 100) as u32 * 3).collect(),
        (2, 100),
    );
    let h = randn(7, (2, 300, 200), DType::F32, &CPU).unwrap();
    let y = randn(8, (2, 100, 200), DType::F32, &CPU).unwrap();
    let w = randn(9, (2, 100), DType::F32, &CPU).unwrap();
    compare(
        std::slice::from_ref(&h),
        &gather_op(idx.clone()),
        F32_RTOL,
        F32_ATOL,
    )
    .unwrap();
    compare(&[h, y, w], &scatter_op(idx, true), F32_RTOL, F32_ATOL).unwrap();
}

/// Strided (non-contiguous) inputs give the results of their contiguous copies.
#[test]
fn strided_inputs_are_read_correctly() {
    let case = attn_case(2, 2, 2, 8, 6, 6, Mode::Compacted, 11);
    let op = case.op();
    // q built as [b, t, hq, dh] and transposed: not contiguous.
    let qt = randn(1, (2, 6, 4, 8), DType::F32, &CPU).unwrap();
    let q = qt.transpose(1, 2).unwrap();
    assert!(!q.is_contiguous());
    let k = randn(2, (2, 2, 6, 8), DType::F32, &CPU).unwrap();
    let v = randn(3, (2, 2, 6, 8), DType::F32, &CPU).unwrap();
    for be in both() {
        let a = op(be.as_ref(), &[&q, &k, &v]).unwrap();
        let b = op(be.as_ref(), &[&q.contiguous().unwrap(), &k, &v]).unwrap();
        assert_close(be.name(), &a, &b, 0.0, 0.0);
    }
    let x = randn(4, (7, 5), DType::F32, &CPU).unwrap().t().unwrap();
    let w = randn(5, 7, DType::F32, &CPU).unwrap();
    let cpu = backend("cpu");
    let a = cpu.rms_norm(&x, &w, 1e-5).unwrap();
    let b = cpu.rms_norm(&x.contiguous().unwrap(), &w, 1e-5).unwrap();
    assert_close("rms_norm", &a, &b, 0.0, 0.0);
}

// ---------------------------------------------------------------------------------------
// Closed forms.

#[test]
fn attention_with_zero_queries_averages_visible_values() {
    // q = 0: every visible key scores 0, so the output is the plain mean of the visible v.
    let q = Tensor::zeros((1, 2, 3, 2), DType::F32, &CPU).unwrap();
    let k = randn(1, (1, 1, 4, 2), DType::F32, &CPU).unwrap();
    let v = Tensor::new(&[[[[1f32, 10.], [2., 20.], [4., 40.], [8., 80.]]]], &CPU).unwrap();
    let q_pos = u32s(vec![5, 1, 9], (1, 3));
    let k_pos = u32s(vec![0, 5, PAD_POS, 7], (1, 4));
    // Query at 5 sees keys 0 and 5: mean (1.5, 15). Query at 1 sees key 0: (1, 10).
    // Query at 9 sees keys 0, 5 and 7 (the padded key never): (11/3, 110/3).
    let row = [[1.5f32, 15.], [1., 10.], [11. / 3., 110. / 3.]];
    let want = Tensor::new(&[[row, row]], &CPU).unwrap();
    for be in both() {
        let out = be.attention(&q, &k, &v, &q_pos, &k_pos).unwrap();
        assert_close(be.name(), &out, &want, F32_RTOL, F32_ATOL);
    }
}

#[test]
fn rope_rotates_by_position_angle_and_passes_padding() {
    // dh = 2: one frequency, theta^0 = 1, so position p rotates by p radians.
    let (cos, sin) = rope_tables(8, 2, 10_000.0, &CPU).unwrap();
    let x = Tensor::new(&[[[[1f32, 2.], [3., -1.], [0.5, 0.25]]]], &CPU).unwrap();
    let pos = u32s(vec![0, 3, PAD_POS], (1, 3));
    let (c, s) = (3f32.cos(), 3f32.sin());
    let want = Tensor::new(
        &[[[[1f32, 2.], [3. * c + s, -c + 3. * s], [0.5, 0.25]]]],
        &CPU,
    )
    .unwrap();
    for be in both() {
        let out = be.rope(&x, &pos, &cos, &sin).unwrap();
        assert_close(be.name(), &out, &want, F32_RTOL, F32_ATOL);
    }
}

#[test]
fn rms_norm_and_swiglu_closed_forms() {
    let x = Tensor::new(&[[3f32, 4.]], &CPU).unwrap();
    let w = Tensor::new(&[2f32, 0.5], &CPU).unwrap();
    let r = (12.5f64 + 1e-5).sqrt();
    let want = Tensor::new(&[[(3.0 / r * 2.0) as f32, (4.0 / r * 0.5) as f32]], &CPU).unwrap();
    let g = Tensor::new(&[0f32, 2., -30.], &CPU).unwrap();
    let u = Tensor::new(&[5f32, 3., 1.], &CPU).unwrap();
    let silu2 = 2.0 / (1.0 + (-2f32).exp());
    let want_sw = Tensor::new(&[0f32, 3.0 * silu2, -30.0 / (1.0 + 30f32.exp())], &CPU).unwrap();
    for be in both() {
        assert_close(
            be.name(),
            &be.rms_norm(&x, &w, 1e-5).unwrap(),
            &want,
            F32_RTOL,
            F32_ATOL,
        );
        assert_close(
            be.name(),
            &be.swiglu(&g, &u).unwrap(),
            &want_sw,
            F32_RTOL,
            F32_ATOL,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Edge cases.

#[test]
fn queries_with_no_visible_key_give_zeros_and_zero_gradient() {
    // Query 0 is padded; query 1 sits before every key; query 2 sees key 0.
    let q_pos = u32s(vec![PAD_POS, 1, 6], (1, 3));
    let k_pos = u32s(vec![5, PAD_POS, 2], (1, 3));
    let inputs = [
        randn(1, (1, 2, 3, 4), DType::F32, &CPU).unwrap(),
        randn(2, (1, 1, 3, 4), DType::F32, &CPU).unwrap(),
        randn(3, (1, 1, 3, 4), DType::F32, &CPU).unwrap(),
    ];
    for be in both() {
        let vs = vars(&inputs);
        let out = be
            .attention(
                vs[0].as_tensor(),
                vs[1].as_tensor(),
                vs[2].as_tensor(),
                &q_pos,
                &k_pos,
            )
            .unwrap();
        let dead = out.narrow(2, 0, 2).unwrap();
        assert_close(be.name(), &dead, &dead.zeros_like().unwrap(), 0.0, 0.0);
        let live = out
            .narrow(2, 2, 1)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            live > 0.0,
            "{}: the visible query must not be zero",
            be.name()
        );
        let grads = weighted_loss(&out, 3).unwrap().backward().unwrap();
        let dq = grads.get(vs[0].as_tensor()).expect("q has a gradient");
        let dead = dq.narrow(2, 0, 2).unwrap();
        assert_close(be.name(), &dead, &dead.zeros_like().unwrap(), 0.0, 0.0);
        // The padded key 1 is seen by no query: zero gradient for its k and v.
        for v in &vs[1..] {
            let dk = grads
                .get(v.as_tensor())
                .expect("k and v have gradients")
                .narrow(2, 1, 1)
                .unwrap();
            assert_close(be.name(), &dk, &dk.zeros_like().unwrap(), 0.0, 0.0);
        }
    }
}

#[test]
fn empty_selections_are_not_errors() {
    let h = Var::from_tensor(&randn(1, (2, 5, 3), DType::F32, &CPU).unwrap()).unwrap();
    let none = Tensor::zeros((2, 0), DType::U32, &CPU).unwrap();
    let y = Tensor::zeros((2, 0, 3), DType::F32, &CPU).unwrap();
    let w = Tensor::zeros((2, 0), DType::F32, &CPU).unwrap();
    for be in both() {
        let g = be.gather_tokens(h.as_tensor(), &none).unwrap();
        assert_eq!(g.dims(), &[2, 0, 3], "{}", be.name());
        let s = be
            .scatter_add_tokens(h.as_tensor(), &none, &y, Some(&w))
            .unwrap();
        assert_close(be.name(), &s, h.as_tensor(), 0.0, 0.0);
        let loss = (g.sum_all().unwrap() + s.sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let dh = grads.get(h.as_tensor()).expect("h has a gradient");
        assert_close(be.name(), dh, &h.ones_like().unwrap(), 0.0, 0.0);

        // No queries: an empty output. No keys: zeros.
        let q = randn(2, (1, 2, 0, 4), DType::F32, &CPU).unwrap();
        let k = randn(3, (1, 1, 2, 4), DType::F32, &CPU).unwrap();
        let out = be
            .attention(&q, &k, &k, &u32s(vec![], (1, 0)), &u32s(vec![0, 1], (1, 2)))
            .unwrap();
        assert_eq!(out.dims(), &[1, 2, 0, 4]);
        let q = Var::from_tensor(&randn(4, (1, 2, 3, 4), DType::F32, &CPU).unwrap()).unwrap();
        let k = Tensor::zeros((1, 1, 0, 4), DType::F32, &CPU).unwrap();
        let out = be
            .attention(
                q.as_tensor(),
                &k,
                &k,
                &u32s(vec![0, 1, 2], (1, 3)),
                &u32s(vec![], (1, 0)),
            )
            .unwrap();
        assert_close(be.name(), &out, &q.zeros_like().unwrap(), 0.0, 0.0);
        let grads = weighted_loss(&out, 1).unwrap().backward().unwrap();
        if let Some(dq) = grads.get(q.as_tensor()) {
            assert_close(be.name(), dq, &q.zeros_like().unwrap(), 0.0, 0.0);
        }
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let f = |seed, shape: &[usize]| randn(seed, shape.to_vec(), DType::F32, &CPU).unwrap();
    let x4 = f(1, &[1, 2, 3, 4]);
    let kv = f(2, &[1, 1, 3, 4]);
    let p3 = u32s(vec![0, 1, 2], (1, 3));
    let (cos, sin) = rope_tables(8, 4, 10_000.0, &CPU).unwrap();
    for be in both() {
        let n = be.name();
        let errs: Vec<(&str, Result<Tensor>)> = vec![
            ("rms w shape", be.rms_norm(&x4, &f(3, &[3]), 1e-5)),
            (
                "rms dtype",
                be.rms_norm(&x4, &f(3, &[4]).to_dtype(DType::F64).unwrap(), 1e-5),
            ),
            ("rms eps", be.rms_norm(&x4, &f(3, &[4]), -1.0)),
            (
                "rms f16",
                be.rms_norm(
                    &x4.to_dtype(DType::F16).unwrap(),
                    &f(3, &[4]).to_dtype(DType::F16).unwrap(),
                    1e-5,
                ),
            ),
            (
                "rope odd dh",
                be.rope(&f(4, &[1, 2, 3, 3]), &p3, &cos, &sin),
            ),
            (
                "rope table width",
                be.rope(&f(4, &[1, 2, 3, 6]), &p3, &cos, &sin),
            ),
            (
                "rope position",
                be.rope(&x4, &u32s(vec![0, 8, 1], (1, 3)), &cos, &sin),
            ),
            (
                "rope pos shape",
                be.rope(&x4, &u32s(vec![0, 1], (1, 2)), &cos, &sin),
            ),
            (
                "rope pos dtype",
                be.rope(&x4, &p3.to_dtype(DType::F32).unwrap(), &cos, &sin),
            ),
            (
                "attn heads",
                be.attention(
                    &f(5, &[1, 3, 3, 4]),
                    &f(6, &[1, 2, 3, 4]),
                    &f(6, &[1, 2, 3, 4]),
                    &p3,
                    &p3,
                ),
            ),
            (
                "attn v shape",
                be.attention(&x4, &kv, &f(7, &[1, 1, 2, 4]), &p3, &p3),
            ),
            (
                "attn dh",
                be.attention(&x4, &f(8, &[1, 1, 3, 2]), &f(8, &[1, 1, 3, 2]), &p3, &p3),
            ),
            (
                "attn batch",
                be.attention(&x4, &f(9, &[2, 1, 3, 4]), &f(9, &[2, 1, 3, 4]), &p3, &p3),
            ),
            (
                "attn k_pos",
                be.attention(&x4, &kv, &kv, &p3, &u32s(vec![0, 1], (1, 2))),
            ),
            (
                "attn rank",
                be.attention(&f(1, &[2, 3, 4]), &kv, &kv, &p3, &p3),
            ),
            ("swiglu shape", be.swiglu(&f(1, &[2, 3]), &f(2, &[3, 2]))),
            (
                "gather range",
                be.gather_tokens(&f(1, &[1, 3, 2]), &u32s(vec![0, 3], (1, 2))),
            ),
            (
                "gather batch",
                be.gather_tokens(&f(1, &[2, 3, 2]), &u32s(vec![0, 1], (1, 2))),
            ),
            (
                "gather rank",
                be.gather_tokens(&f(1, &[3, 2]), &u32s(vec![0, 1], (1, 2))),
            ),
            (
                "scatter y",
                be.scatter_add_tokens(
                    &f(1, &[1, 3, 2]),
                    &u32s(vec![0, 1], (1, 2)),
                    &f(2, &[1, 3, 2]),
                    None,
                ),
            ),
            (
                "scatter w",
                be.scatter_add_tokens(
                    &f(1, &[1, 3, 2]),
                    &u32s(vec![0, 1], (1, 2)),
                    &f(2, &[1, 2, 2]),
                    Some(&f(3, &[2])),
                ),
            ),
            (
                "scatter range",
                be.scatter_add_tokens(
                    &f(1, &[1, 3, 2]),
                    &u32s(vec![0, 7], (1, 2)),
                    &f(2, &[1, 2, 2]),
                    None,
                ),
            ),
        ];
        for (what, r) in errs {
            let e = r
                .err()
                .unwrap_or_else(|| panic!("{n}: `{what}` was accepted"));
            assert!(
                matches!(e, mor_kernels::Error::Invalid { .. }),
                "{n}: `{what}` gave {e}"
            );
        }
    }
}

#[test]
fn every_input_receives_a_gradient() {
    let case = attn_case(1, 1, 2, 4, 4, 4, Mode::Shared, 2);
    let x = randn(1, (2, 3, 8), DType::F32, &CPU).unwrap();
    let cpu = backend("cpu");
    let vs = vars(&case.inputs(3, DType::F32));
    let w = Var::from_tensor(&randn(2, 8, DType::F32, &CPU).unwrap()).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let ts: Vec<&Tensor> = vs.iter().map(|v| v.as_tensor()).collect();
    let a = case.op()(cpu.as_ref(), &ts).unwrap().sum_all().unwrap();
    let n = cpu.rms_norm(xv.as_tensor(), w.as_tensor(), 1e-5).unwrap();
    let loss = (a + weighted_loss(&n, 4).unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    for v in vs.iter().chain([&w, &xv]) {
        let g = grads.get(v.as_tensor()).expect("missing gradient");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0,
            "zero gradient for an input of shape {:?}",
            v.dims()
        );
    }
}

/// A case that the proptest below drew once (b 1, t 4, hq 1, hkv 1, dh 2, d 9, seed
/// 946111): the `q` weight's gradient element 9, -0.39735, differs between the backends by
/// 1.3e-5, 1.2 times the plain f32 tolerance. It results from a cancellation in the
/// softmax backward over terms much larger than itself, and its conditioning bounds the
/// difference: both backends are right.
#[test]
fn attention_block_regression_cancellation_in_q_gradient() {
    let (b, t, d, hq, hkv, dh, seed) = (1, 4, 9, 1, 1, 2, 946_111);
    let inputs = attn_block_inputs(seed, (b, t, d), (hq, hkv, dh), DType::F32);
    let op = attn_block_op(block_positions(seed, b, t), (hq, hkv), 3 * t, dh);
    let plain = quantities(backend("cpu").as_ref(), &inputs, &op, None).unwrap();
    let reference = quantities(backend("reference").as_ref(), &inputs, &op, None).unwrap();
    // How far past the plain tolerance the element lands depends on the product kernel's
    // rounding (1.2 times it with the `gemm` crate's AVX2 kernel, well inside it with the
    // AVX-512 kernel); the conditioning bound below holds for every kernel.
    let c = closeness(&plain[3], &reference[3], F32_RTOL, F32_ATOL).unwrap();
    let s = conditioning(&inputs, &op);
    let diff = (c.values.0 - c.values.1).abs();
    println!(
        "diff {diff:e} S {:e} diff/(uS) {}",
        s[3][9],
        diff / (F32_U * s[3][9])
    );
    let r = compare(&inputs, &op, F32_RTOL, F32_ATOL);
    assert!(r.is_ok(), "{}", r.unwrap_err());
}

/// RMSNorm over one feature: `y = w x / sqrt(x² + eps)`, whose input gradient
/// `g w eps / (x² + eps)^{3/2}` both backends compute as the difference of two terms of size
/// `|g w| / rms` that agree up to `eps / x²`; the f32 result is right to a few roundings of
/// those terms, whatever its own size.
#[test]
fn rms_norm_of_one_feature_matches_its_closed_form() {
    let eps = 1e-5;
    let xs = [0.003f32, -0.05, 0.4, -1.0, 2.5, 30.0];
    let x = Tensor::from_slice(&xs, (6, 1), &CPU).unwrap();
    let w = Tensor::new(&[1.7f32], &CPU).unwrap();
    let g = [0.9f64, -1.3, 0.4, 2.0, -0.7, 1.1];
    for be in both() {
        let xv = Var::from_tensor(&x).unwrap();
        let y = be.rms_norm(xv.as_tensor(), &w, eps).unwrap();
        let gt = Tensor::from_slice(&g, (6, 1), &CPU)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let grads = (y * gt).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = flat(grads.get(xv.as_tensor()).unwrap());
        for i in 0..6 {
            let (xi, wi) = (xs[i] as f64, 1.7f32 as f64);
            let gi = g[i] as f32 as f64;
            let ms = xi * xi + eps;
            let want = gi * wi * eps / ms.powf(1.5);
            let terms = (gi * wi).abs() / ms.sqrt();
            assert!(
                (dx[i] - want).abs() <= 16.0 * F32_U * terms,
                "{} x {xi}: {} vs {want} (terms {terms:e})",
                be.name(),
                dx[i]
            );
        }
    }
}

/// One query with one visible key: the softmax is 1 whatever the score, so the exact
/// gradients of the query and of the `q` weight are 0 (conditioning 0). The reference
/// computes `P (dP - P dP)` = 0 exactly; the cpu kernel's `dP - dO·O` leaves a rounding of
/// the size of `dO · v` (1.6e-5 here, 1.6 times the plain tolerance), which the normwise
/// bound over the op's gradients accepts.
#[test]
fn attention_block_regression_single_visible_key() {
    let (b, t, d, hq, hkv, dh, seed) = (1, 1, 8, 1, 1, 2, 16_941);
    let pos = block_positions(seed, b, t);
    assert_eq!(pos.to_vec2::<u32>().unwrap(), [[1]]);
    let inputs = attn_block_inputs(seed, (b, t, d), (hq, hkv, dh), DType::F32);
    let op = attn_block_op(pos, (hq, hkv), 3 * t, dh);
    let plain = quantities(backend("cpu").as_ref(), &inputs, &op, None).unwrap();
    let reference = quantities(backend("reference").as_ref(), &inputs, &op, None).unwrap();
    assert!(flat(&reference[3]).iter().all(|&g| g == 0.0));
    // The rounding left depends on the product kernel (1.6 times the plain tolerance with
    // the `gemm` crate's AVX2 kernel, none with the AVX-512 kernel); the normwise bound
    // below holds for every kernel.
    let c = closeness(&plain[3], &reference[3], F32_RTOL, F32_ATOL).unwrap();
    println!("{c:?}");
    assert!(conditioning(&inputs, &op)[3].iter().all(|&s| s == 0.0));
    let r = compare(&inputs, &op, F32_RTOL, F32_ATOL);
    assert!(r.is_ok(), "{}", r.unwrap_err());
}
