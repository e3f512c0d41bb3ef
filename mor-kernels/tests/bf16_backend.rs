//! The `cpu` backend with `precision = "bf16"` against the same backend in f32: every fused
//! op's output and input gradients, at bf16 tolerances.
//!
//! Tolerance: a bf16 operand carries a relative rounding error of at most 2⁻⁹ ≈ 2e-3, so
//! each product term `a·b` is off by up to 4e-3 of `|a||b|`. Over sums of random-sign terms
//! these errors average like the terms themselves, so the normwise relative error of one
//! product is a few 1e-3; the fused ops chain up to four products (attention block
//! backward: projection, scores, values, projection), so the normwise bound is 2e-2, and
//! the test also asserts that bf16 did change the result (more than 1e-5), i.e. that the
//! products really ran in bf16.

use candle_core::{DType, Device, Tensor, Var};
use mor_core::config::Precision;
use mor_kernels::cpu::CpuBackend;
use mor_kernels::testing::randn;
use mor_kernels::{build_backend, AttentionWeights, Backend, BackendCtx};

const CPU: Device = Device::Cpu;
/// Normwise relative tolerance of a bf16 result against f32 (see the module comment).
const BF16_NORM_RTOL: f64 = 2e-2;

/// Output and input gradients of `f` under a fixed random weighting of the output.
fn run(f: &dyn Fn(&[&Tensor]) -> Tensor, inputs: &[Tensor]) -> Vec<Vec<f64>> {
    let vs: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<&Tensor> = vs.iter().map(|v| v.as_tensor()).collect();
    let out = f(&ts);
    let r = randn(77, out.shape(), out.dtype(), &CPU).unwrap();
    let grads = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut all = vec![out];
    all.extend(vs.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()));
    all.iter()
        .map(|t| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

/// `‖got − want‖ / ‖want‖`.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

type Op<'a> = Box<dyn Fn(&dyn Backend, &[&Tensor]) -> Tensor + 'a>;

/// Every fused op with products, on f32 inputs of modest size (`k` up to 96).
fn cases<'a>(
    pos: &'a Tensor,
    cos: &'a Tensor,
    sin: &'a Tensor,
    targets: &'a Tensor,
) -> Vec<(&'static str, Op<'a>, Vec<Tensor>)> {
    let f32s = |seed, shape: &[usize], scale: f64| {
        (randn(seed, shape.to_vec(), DType::F32, &CPU).unwrap() * scale).unwrap()
    };
    let (b, t, d, hq, hkv, dh, ff, vocab) = (2, 40, 48, 4, 2, 16, 96, 70);
    let ws = 1.0 / (d as f64).sqrt();
    vec![
        (
            "linear",
            Box::new(|be: &dyn Backend, x: &[&Tensor]| be.linear(x[0], x[1]).unwrap()),
            vec![f32s(1, &[b, t, d], 1.0), f32s(2, &[ff, d], ws)],
        ),
        (
            "attention",
            Box::new(|be: &dyn Backend, x: &[&Tensor]| {
                be.attention(x[0], x[1], x[2], pos, pos).unwrap()
            }),
            vec![
                f32s(3, &[b, hq, t, dh], 1.0),
                f32s(4, &[b, hkv, t, dh], 1.0),
                f32s(5, &[b, hkv, t, dh], 1.0),
            ],
        ),
        (
            "attention_block",
            Box::new(move |be: &dyn Backend, x: &[&Tensor]| {
                let w = AttentionWeights {
                    norm: x[1],
                    eps: 1e-5,
                    q: x[2],
                    k: x[3],
                    v: x[4],
                    o: x[5],
                    heads: hq,
                    kv_heads: hkv,
                };
                be.attention_block(x[0], &w, pos, cos, sin).unwrap()
            }),
            vec![
                f32s(6, &[b, t, d], 1.0),
                (f32s(7, &[d], 0.1) + 1.0).unwrap(),
                f32s(8, &[hq * dh, d], ws),
                f32s(9, &[hkv * dh, d], ws),
                f32s(10, &[hkv * dh, d], ws),
                f32s(11, &[d, hq * dh], 1.0 / ((hq * dh) as f64).sqrt()),
            ],
        ),
        (
            "mlp_block",
            Box::new(|be: &dyn Backend, x: &[&Tensor]| {
                be.mlp_block(x[0], x[1], 1e-5, x[2], x[3], x[4]).unwrap()
            }),
            vec![
                f32s(12, &[b, t, d], 1.0),
                (f32s(13, &[d], 0.1) + 1.0).unwrap(),
                f32s(14, &[ff, d], ws),
                f32s(15, &[ff, d], ws),
                f32s(16, &[d, ff], 1.0 / (ff as f64).sqrt()),
            ],
        ),
        (
            "linear_cross_entropy",
            Box::new(|be: &dyn Backend, x: &[&Tensor]| {
                be.linear_cross_entropy(x[0], x[1], targets).unwrap()
            }),
            vec![f32s(17, &[b, t, d], 1.0), f32s(18, &[vocab, d], ws)],
        ),
    ]
}

#[test]
fn fused_ops_in_bf16_match_f32_at_bf16_tolerance() {
    let (b, t, dh, vocab) = (2, 40, 16, 70u32);
    let pos_v: Vec<u32> = (0..b * t).map(|i| (i % t) as u32).collect();
    let pos = Tensor::from_vec(pos_v, (b, t), &CPU).unwrap();
    let (cos, sin) = mor_kernels::rope_tables(t, dh, 1e4, &CPU).unwrap();
    let tg: Vec<u32> = (0..b * t).map(|i| (i as u32 * 7 + 3) % vocab).collect();
    let targets = Tensor::from_vec(tg, (b, t), &CPU).unwrap();
    let (f32_be, bf16_be) = (
        CpuBackend::new(),
        CpuBackend::with_precision(Precision::Bf16),
    );
    assert_eq!(bf16_be.precision(), Precision::Bf16);
    for (name, op, inputs) in cases(&pos, &cos, &sin, &targets) {
        let want = run(&|x| op(&f32_be, x), &inputs);
        let got = run(&|x| op(&bf16_be, x), &inputs);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = rel_err(g, w);
            println!("{name} tensor {i}: relative error {e:.2e}");
            assert!(
                e <= BF16_NORM_RTOL && e > 1e-5,
                "{name}, tensor {i} (0 = output, then input gradients): relative error {e:e}"
            );
        }
    }
}

/// Norms stay f32 in bf16 mode (bit for bit), and f64 tensors are never rounded to bf16, so
/// finite differences on f64 see the exact f64 ops.
#[test]
fn bf16_leaves_norms_and_f64_products_alone() {
    let bf16_be = CpuBackend::with_precision(Precision::Bf16);
    let f32_be = CpuBackend::new();
    let x = randn(1, (5, 37), DType::F32, &CPU).unwrap();
    let w = randn(2, 37, DType::F32, &CPU).unwrap();
    let a = bf16_be
        .rms_norm(&x, &w, 1e-5)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b = f32_be
        .rms_norm(&x, &w, 1e-5)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(a, b);
    let x = randn(3, (7, 33), DType::F64, &CPU).unwrap();
    let w = randn(4, (9, 33), DType::F64, &CPU).unwrap();
    let a = bf16_be.linear(&x, &w).unwrap().to_vec2::<f64>().unwrap();
    let b = f32_be.linear(&x, &w).unwrap().to_vec2::<f64>().unwrap();
    assert_eq!(a, b);
}

/// `train.precision = "bf16"` builds the cpu backend (it used to be refused), with its
/// products in bf16: `linear` of values that bf16 cannot hold differs from f32 by the
/// rounding, and equals the product of the rounded values.
#[test]
fn the_registry_builds_a_bf16_cpu_backend() {
    let ctx = BackendCtx::new(CPU).with_precision(Precision::Bf16);
    let be = build_backend("cpu", &toml::Table::new(), &ctx).unwrap();
    // 1 + 2^-10 rounds to 1 in bf16; 3 is exact.
    let x = Tensor::new(&[[1.0f32 + 2f32.powi(-10), 3.0]], &CPU).unwrap();
    let w = Tensor::new(&[[1.0f32 + 2f32.powi(-10)], [0.5]], &CPU)
        .unwrap()
        .reshape((1, 2))
        .unwrap();
    let y = be.linear(&x, &w).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(y, [[1.0 + 1.5]]);
    let f32_ctx = BackendCtx::new(CPU);
    let be = build_backend("cpu", &toml::Table::new(), &f32_ctx).unwrap();
    let y = be.linear(&x, &w).unwrap().to_vec2::<f32>().unwrap();
    let e = 1.0f32 + 2f32.powi(-10);
    assert_eq!(y, [[e * e + 1.5]]);
}

/// The `reference` backend refuses bf16 with one message naming the setting and both
/// ways out: f32, or a backend that does bf16.
#[test]
fn the_reference_backend_refuses_bf16_naming_the_alternatives() {
    let ctx = BackendCtx::new(CPU).with_precision(Precision::Bf16);
    let msg = build_backend("reference", &toml::Table::new(), &ctx)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("train.precision = \"bf16\"")
            && msg.contains("`reference`")
            && msg.contains("train.precision = \"f32\"")
            && msg.contains("backend.kind = \"cpu\" or \"cuda\""),
        "{msg}"
    );
    build_backend("reference", &toml::Table::new(), &BackendCtx::new(CPU)).unwrap();
}
