//! The `cuda` backend with `precision = "bf16"`, on CPU tensors (its host emulation, the
//! same code path as on a GPU: the same ops, dtype conversions and autograd graph, with
//! candle's CPU matmul standing in for cuBLAS's bf16 GEMM).
//!
//! - Every op with products (linear, attention, the attention and feed-forward halves of a
//!   layer, LM head + cross-entropy), output and input gradients, against the same backend
//!   in f32 within the normwise bf16 tolerance of the `cpu` backend's bf16 tests (2e-2: a
//!   bf16 operand is off by up to 2⁻⁹ relative, a product term by 4e-3, and the ops chain
//!   up to four products), and different from f32 (more than 1e-5), so bf16 cannot be
//!   silently f32.
//! - Exact references: on inputs whose f32 sums are exact (few significant bits, bounded
//!   exponents) a bf16 product equals `round_bf16(Σ round_bf16(a)·round_bf16(b))` bit for
//!   bit, forward and backward, and differs from the f32 product; attention equals naive
//!   f64 attention of the rounded `q, k, v`; the chunked cross-entropy equals the naive
//!   cross-entropy of the bf16 logits.

use candle_core::{DType, Tensor, Var};
use mor_core::config::Precision;
use mor_core::rng::Rng;
use mor_kernels::cpu::round_bf16;
use mor_kernels::cuda::{self, CudaBackend};
use mor_kernels::testing::randn;
use mor_kernels::{build_backend, AttentionWeights, Backend, BackendCtx, PAD_POS};

use common::bf16::{bf16_cases_match_f32, f64s, BF16_NORM_RTOL, CPU};
mod common;

fn f32_be() -> CudaBackend {
    CudaBackend::host_emulation()
}

fn bf16_be() -> CudaBackend {
    CudaBackend::host_emulation().with_precision(Precision::Bf16)
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn ops_in_bf16_match_f32_at_bf16_tolerance_and_differ_from_it() {
    let (b, t, dh, vocab) = (2, 40, 16, 70u32);
    // Row 1 has gapped positions and two padded tokens (recursion-wise selection).
    let pos_v: Vec<u32> = (0..b * t)
        .map(|i| {
            let (r, j) = (i / t, (i % t) as u32);
            match (r, j) {
                (0, _) => j,
                (_, 5 | 17) => PAD_POS,
                _ => 2 * j,
            }
        })
        .collect();
    let pos = Tensor::from_vec(pos_v, (b, t), &CPU).unwrap();
    let (cos, sin) = mor_kernels::rope_tables(2 * t, dh, 1e4, &CPU).unwrap();
    let tg: Vec<u32> = (0..b * t).map(|i| (i as u32 * 7 + 3) % vocab).collect();
    let targets = Tensor::from_vec(tg, (b, t), &CPU).unwrap();
    let (f32_be, bf16_be) = (f32_be(), bf16_be());
    assert_eq!(bf16_be.precision(), Precision::Bf16);
    assert_eq!(f32_be.precision(), Precision::F32);
    bf16_cases_match_f32(&f32_be, &bf16_be, &pos, &cos, &sin, &targets);
}

/// `rows × cols` values `±k/2^(8+shift)` with `k` in `256..1024`: ten significant bits, so
/// bf16 (eight) rounds most of them, and products of rounded values sum exactly in f32.
fn ten_bit(rng: &mut Rng, rows: usize, cols: usize, shift: i32) -> Tensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let k = 256 + (rng.next_u64() % 768) as i32;
            let s = if rng.next_u64().is_multiple_of(2) {
                1.0
            } else {
                -1.0
            };
            s * k as f32 * 2f32.powi(-8 - shift)
        })
        .collect();
    Tensor::from_vec(v, (rows, cols), &CPU).unwrap()
}

/// `Σ_k a[r, k]·b[c, k]` in f64 (exact for [`ten_bit`] inputs), `[rows(a), rows(b)]`.
fn naive_abt(a: &[f32], b: &[f32], k: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for ar in a.chunks_exact(k) {
        for br in b.chunks_exact(k) {
            out.push(ar.iter().zip(br).map(|(x, y)| *x as f64 * *y as f64).sum());
        }
    }
    out
}

fn rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| round_bf16(x)).collect()
}

fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| v[r * cols + c]))
        .collect()
}

/// A bf16 product rounds its inputs and its result, forward and backward, bit for bit as
/// cuBLAS's bf16 GEMM: `y = bf16(Σ bf16(x)·bf16(w))`, `dx = bf16(Σ bf16(dy)·bf16(w))`,
/// `dw = bf16(Σ bf16(dy)·bf16(x))`, and each differs from the f32 product.
#[test]
fn bf16_linear_equals_the_rounded_naive_product_forward_and_backward() {
    let mut rng = Rng::new(11);
    let (rows, k, out) = (5, 24, 6);
    let x = ten_bit(&mut rng, rows, k, 0);
    let w = ten_bit(&mut rng, out, k, 0);
    let (xv, wv) = (f32s(&x), f32s(&w));
    let round = |v: Vec<f64>| -> Vec<f32> { v.iter().map(|&s| round_bf16(s as f32)).collect() };
    let want_y = round(naive_abt(&rounded(&xv), &rounded(&wv), k));
    // y.sum() backward: dy = 1 (exact in bf16), so dx[r, k] = bf16(Σ_j bf16(w[j, k])) and
    // dw[j, k] = bf16(Σ_r bf16(x[r, k])).
    let ones_rows = |n: usize| vec![1f32; n];
    let want_dx: Vec<f32> = round(naive_abt(
        &ones_rows(out),
        &transpose(&rounded(&wv), out, k),
        out,
    ))
    .repeat(rows);
    let want_dw: Vec<f32> = round(naive_abt(
        &ones_rows(rows),
        &transpose(&rounded(&xv), rows, k),
        rows,
    ))
    .repeat(out);
    let grads = |be: &CudaBackend| {
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let y = be.linear(xv.as_tensor(), wv.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        (
            f32s(&y),
            f32s(g.get(xv.as_tensor()).unwrap()),
            f32s(g.get(wv.as_tensor()).unwrap()),
        )
    };
    let (y, dx, dw) = grads(&bf16_be());
    assert_eq!(y, want_y, "forward");
    assert_eq!(dx, want_dx, "dx");
    assert_eq!(dw, want_dw, "dw");
    let (y32, dx32, dw32) = grads(&f32_be());
    assert_ne!(y32, want_y, "the data must be sensitive to bf16 rounding");
    assert_ne!(dx32, want_dx);
    assert_ne!(dw32, want_dw);
    // The public product is the same function.
    assert_eq!(
        f32s(&cuda::bf16_matmul(&x, &w.t().unwrap()).unwrap()),
        want_y
    );
}

/// Naive causal attention by positions in f64 (`[b, hq, t, dh]` row-major values).
#[allow(clippy::too_many_arguments)]
fn naive_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    q_pos: &[u32],
    k_pos: &[u32],
    (b, hq, hkv, t, s, dh): (usize, usize, usize, usize, usize, usize),
) -> Vec<f64> {
    let mut out = vec![0f64; b * hq * t * dh];
    let scale = 1.0 / (dh as f64).sqrt();
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / (hq / hkv);
            for i in 0..t {
                let qp = q_pos[bi * t + i];
                let qrow = &q[((bi * hq + h) * t + i) * dh..][..dh];
                let mut scores = Vec::new();
                for j in 0..s {
                    let kp = k_pos[bi * s + j];
                    if qp == PAD_POS || kp == PAD_POS || kp > qp {
                        continue;
                    }
                    let krow = &k[((bi * hkv + kh) * s + j) * dh..][..dh];
                    let dot: f64 = qrow
                        .iter()
                        .zip(krow)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    scores.push((j, dot * scale));
                }
                if scores.is_empty() {
                    continue;
                }
                let m = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s.1 - m).exp()).sum();
                let o = &mut out[((bi * hq + h) * t + i) * dh..][..dh];
                for (j, sc) in scores {
                    let p = (sc - m).exp() / z;
                    let vrow = &v[((bi * hkv + kh) * s + j) * dh..][..dh];
                    for (o, x) in o.iter_mut().zip(vrow) {
                        *o += p * *x as f64;
                    }
                }
            }
        }
    }
    out
}

/// bf16 attention is the attention of the bf16-rounded `q, k, v` in f32 arithmetic: equal
/// to naive f64 attention of the rounded values within f32 rounding, and off the f32
/// backend's result by far more than that.
#[test]
fn bf16_attention_is_the_attention_of_the_rounded_inputs() {
    let (b, hq, hkv, t, dh) = (1, 4, 2, 9, 16);
    let q = randn(21, (b, hq, t, dh), DType::F32, &CPU).unwrap();
    let k = randn(22, (b, hkv, t, dh), DType::F32, &CPU).unwrap();
    let v = randn(23, (b, hkv, t, dh), DType::F32, &CPU).unwrap();
    let pos_v = vec![0u32, 2, 3, 7, 8, PAD_POS, 11, 12, 20];
    let pos = Tensor::from_vec(pos_v.clone(), (b, t), &CPU).unwrap();
    let want = naive_attention(
        &rounded(&f32s(&q)),
        &rounded(&f32s(&k)),
        &rounded(&f32s(&v)),
        &pos_v,
        &pos_v,
        (b, hq, hkv, t, t, dh),
    );
    let got = f64s(&bf16_be().attention(&q, &k, &v, &pos, &pos).unwrap());
    let f32_out = f64s(&f32_be().attention(&q, &k, &v, &pos, &pos).unwrap());
    let max_diff = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f64, f64::max)
    };
    let e = max_diff(&got, &want);
    assert!(e < 2e-6, "bf16 attention vs the rounded reference: {e:e}");
    let e32 = max_diff(&f32_out, &want);
    assert!(e32 > 1e-4, "f32 attention is not rounded: {e32:e}");
    // The padded query row is zero in both.
    assert!(got[5 * dh..6 * dh].iter().all(|&x| x == 0.0));
}

/// The chunked cross-entropy in bf16 is the exact cross-entropy of the bf16 logits
/// `bf16(Σ bf16(x)·bf16(w))`, for one chunk and for chunks that do not divide the
/// vocabulary; the f32 loss differs from it.
#[test]
fn bf16_cross_entropy_is_the_loss_of_the_rounded_logits() {
    let mut rng = Rng::new(5);
    let (rows, d, vocab) = (10, 24, 37);
    let x = ten_bit(&mut rng, rows, d, 3);
    let w = ten_bit(&mut rng, vocab, d, 3);
    let tg: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 11 + 2) % vocab as u32)
        .collect();
    let targets = Tensor::from_vec(tg.clone(), rows, &CPU).unwrap();
    let logits: Vec<f64> = naive_abt(&rounded(&f32s(&x)), &rounded(&f32s(&w)), d)
        .iter()
        .map(|&s| round_bf16(s as f32) as f64)
        .collect();
    let want: f64 = logits
        .chunks_exact(vocab)
        .zip(&tg)
        .map(|(row, &t)| {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
            lse - row[t as usize]
        })
        .sum::<f64>()
        / rows as f64;
    for cols in [None, Some(8), Some(1)] {
        let loss =
            cuda::linear_cross_entropy_with(&x, &w, &targets, cols, Precision::Bf16).unwrap();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (got - want).abs() <= 2e-6 * want.abs(),
            "chunks {cols:?}: {got} vs {want}"
        );
    }
    let f32_loss = cuda::linear_cross_entropy_with(&x, &w, &targets, None, Precision::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(
        (f32_loss - want).abs() > 1e-5,
        "f32 {f32_loss} vs bf16 {want}"
    );
    // Through the backend (its default chunks).
    let be = bf16_be().linear_cross_entropy(&x, &w, &targets).unwrap();
    assert!((be.to_scalar::<f32>().unwrap() as f64 - want).abs() <= 2e-6 * want.abs());
}

/// Norms stay f32 in bf16 mode (bit for bit), and f64 tensors are never rounded, so finite
/// differences on f64 see the exact f64 ops.
#[test]
fn bf16_leaves_norms_and_f64_alone() {
    let x = randn(1, (5, 37), DType::F32, &CPU).unwrap();
    let w = randn(2, 37, DType::F32, &CPU).unwrap();
    let a = f32s(&bf16_be().rms_norm(&x, &w, 1e-5).unwrap());
    let b = f32s(&f32_be().rms_norm(&x, &w, 1e-5).unwrap());
    assert_eq!(a, b);
    let x = randn(3, (7, 33), DType::F64, &CPU).unwrap();
    let w = randn(4, (9, 33), DType::F64, &CPU).unwrap();
    let a = bf16_be().linear(&x, &w).unwrap();
    assert_eq!(a.dtype(), DType::F64);
    let b = f32_be().linear(&x, &w).unwrap();
    assert_eq!(f64s(&a), f64s(&b));
    let q = randn(5, (1, 2, 6, 8), DType::F64, &CPU).unwrap();
    let pos = Tensor::new(&[[0u32, 1, 2, 3, 4, 5]], &CPU).unwrap();
    let a = bf16_be().attention(&q, &q, &q, &pos, &pos).unwrap();
    let b = f32_be().attention(&q, &q, &q, &pos, &pos).unwrap();
    assert_eq!(f64s(&a), f64s(&b));
}

/// `train.precision = "bf16"` is no longer refused by the `cuda` backend: without the
/// feature the error is the missing feature; with it and no device, the device error.
#[test]
fn the_registry_does_not_refuse_bf16_for_cuda() {
    let ctx = BackendCtx::new(CPU).with_precision(Precision::Bf16);
    match build_backend("cuda", &toml::Table::new(), &ctx) {
        Ok(be) => assert_eq!(be.name(), "cuda"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains("train.precision"), "{msg}");
            if !cuda::COMPILED {
                assert!(
                    matches!(e, mor_kernels::Error::NotCompiledWithCuda),
                    "{msg}"
                );
            }
        }
    }
}

/// A tiny decoder layer trained for a few SGD steps through the backend (attention half,
/// feed-forward half, LM head + cross-entropy): in bf16 the f32 parameters stay f32, get
/// f32 gradients, the loss falls as in f32, and the two loss curves agree within the bf16
/// tolerance without being equal.
#[test]
fn a_layer_trains_in_bf16_like_in_f32_with_f32_master_weights() {
    let (b, t, d, hq, hkv, dh, ff, vocab) = (2, 24, 32, 4, 2, 8, 64, 50usize);
    let pos_v: Vec<u32> = (0..b * t).map(|i| (i % t) as u32).collect();
    let pos = Tensor::from_vec(pos_v, (b, t), &CPU).unwrap();
    let (cos, sin) = mor_kernels::rope_tables(t, dh, 1e4, &CPU).unwrap();
    let tg: Vec<u32> = (0..b * t)
        .map(|i| ((i * 7 + i / 5) % vocab) as u32)
        .collect();
    let targets = Tensor::from_vec(tg, (b, t), &CPU).unwrap();
    let init = |seed, shape: &[usize], scale: f64| {
        (randn(seed, shape.to_vec(), DType::F32, &CPU).unwrap() * scale).unwrap()
    };
    let ws = 1.0 / (d as f64).sqrt();
    let params0 = vec![
        init(1, &[b, t, d], 1.0), // the input activations, trained like a weight
        (init(2, &[d], 0.1) + 1.0).unwrap(),
        init(3, &[hq * dh, d], ws),
        init(4, &[hkv * dh, d], ws),
        init(5, &[hkv * dh, d], ws),
        init(6, &[d, hq * dh], ws),
        (init(7, &[d], 0.1) + 1.0).unwrap(),
        init(8, &[ff, d], ws),
        init(9, &[ff, d], ws),
        init(10, &[d, ff], 1.0 / (ff as f64).sqrt()),
        init(11, &[vocab, d], ws),
    ];
    let train = |be: &CudaBackend| -> Vec<f64> {
        let vars: Vec<Var> = params0
            .iter()
            .map(|p| Var::from_tensor(p).unwrap())
            .collect();
        let mut losses = Vec::new();
        for _ in 0..6 {
            let p: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            let w = AttentionWeights {
                norm: p[1],
                eps: 1e-5,
                q: p[2],
                k: p[3],
                v: p[4],
                o: p[5],
                heads: hq,
                kv_heads: hkv,
            };
            let h = be.attention_block(p[0], &w, &pos, &cos, &sin).unwrap();
            let h = be.mlp_block(&h, p[6], 1e-5, p[7], p[8], p[9]).unwrap();
            let loss = be.linear_cross_entropy(&h, p[10], &targets).unwrap();
            assert_eq!(loss.dtype(), DType::F32);
            losses.push(loss.to_scalar::<f32>().unwrap() as f64);
            let grads = loss.backward().unwrap();
            for v in &vars {
                let g = grads.get(v.as_tensor()).unwrap();
                assert_eq!(g.dtype(), DType::F32);
                v.set(&(v.as_tensor() - (g * 0.5).unwrap()).unwrap())
                    .unwrap();
                assert_eq!(v.dtype(), DType::F32);
            }
        }
        losses
    };
    let l32 = train(&f32_be());
    let l16 = train(&bf16_be());
    println!("f32 {l32:?}\nbf16 {l16:?}");
    assert!(
        l16[5] < l16[0] - 0.1,
        "bf16 training lowers the loss: {l16:?}"
    );
    let worst = l32
        .iter()
        .zip(&l16)
        .map(|(a, b)| (a - b).abs() / a.abs())
        .fold(0f64, f64::max);
    assert!(worst <= BF16_NORM_RTOL && worst > 1e-6, "{worst:e}");
}
