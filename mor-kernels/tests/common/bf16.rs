//! Shared by the bf16 tests of the `cpu` and `cuda` backends: output and input gradients
//! of an op, the normwise error, and the fused ops with products as test cases.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use mor_kernels::testing::randn;
use mor_kernels::{AttentionWeights, Backend};

pub const CPU: Device = Device::Cpu;
/// Normwise relative tolerance of a bf16 result against f32: a bf16 operand is off by up
/// to 2⁻⁹ relative, a product term by 4e-3, and the ops chain up to four products.
pub const BF16_NORM_RTOL: f64 = 2e-2;

/// Output and input gradients of `f` under a fixed random weighting of the output.
pub fn run(f: &dyn Fn(&[&Tensor]) -> Tensor, inputs: &[Tensor]) -> Vec<Vec<f64>> {
    let vs: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<&Tensor> = vs.iter().map(|v| v.as_tensor()).collect();
    let out = f(&ts);
    assert_eq!(out.dtype(), DType::F32, "bf16 mode returns f32");
    let r = randn(77, out.shape(), out.dtype(), &CPU).unwrap();
    let grads = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut all = vec![out];
    for v in &vs {
        let g = grads.get(v.as_tensor()).unwrap().clone();
        assert_eq!(g.dtype(), DType::F32, "gradients reach f32 tensors in f32");
        all.push(g);
    }
    all.iter().map(f64s).collect()
}

pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `‖got − want‖ / ‖want‖`.
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

pub type Op<'a> = Box<dyn Fn(&dyn Backend, &[&Tensor]) -> Tensor + 'a>;

/// Every fused op with products, on f32 inputs of modest size (`k` up to 96; `dh = 16`
/// takes the `cuda` backend's flash-attention kernels' path).
pub fn cases<'a>(
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

/// Every case of [`cases`], output and input gradients, in `bf16_be` against `f32_be`:
/// within [`BF16_NORM_RTOL`] normwise, and more than 1e-5 away (bf16 is not silently f32).
pub fn bf16_cases_match_f32(
    f32_be: &dyn Backend,
    bf16_be: &dyn Backend,
    pos: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    targets: &Tensor,
) {
    for (name, op, inputs) in cases(pos, cos, sin, targets) {
        let want = run(&|x| op(f32_be, x), &inputs);
        let got = run(&|x| op(bf16_be, x), &inputs);
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
