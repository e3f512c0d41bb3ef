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

use candle_core::{DType, Tensor};
use mor_core::config::Precision;
use mor_kernels::cpu::CpuBackend;
use mor_kernels::testing::randn;
use mor_kernels::{build_backend, Backend, BackendCtx};

use common::bf16::{bf16_cases_match_f32, CPU};
mod common;

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
    bf16_cases_match_f32(&f32_be, &bf16_be, &pos, &cos, &sin, &targets);
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
