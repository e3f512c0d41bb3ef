//! The packed product kernels of the `cpu` backend (f32 AVX-512, bf16 with AVX512_BF16, the
//! portable bf16 emulation) against a separately written naive f64 product, every kernel
//! this CPU can run in one process (whatever `MOR_CPU_TIER` says, which only lowers the
//! kernels the backend picks).

use mor_kernels::cpu::{bf16_bits, bf16_value, matmul_with, round_bf16, Kernel};
use proptest::prelude::*;

/// A deterministic value in about [-1, 1] (a splitmix64 hash of `seed` and `i`).
fn val(seed: u64, i: usize) -> f32 {
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(i as u64 + 1);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
}

/// A strided operand: `rows × cols`, stored row-major with `pad` extra columns, or
/// transposed (column-major, `pad` extra rows).
struct Operand {
    data: Vec<f32>,
    rs: usize,
    cs: usize,
}

impl Operand {
    fn new(seed: u64, rows: usize, cols: usize, transposed: bool, pad: usize) -> Self {
        let (rs, cs, len) = if transposed {
            (1, rows + pad, cols * (rows + pad))
        } else {
            (cols + pad, 1, rows * (cols + pad))
        };
        let data = (0..len).map(|i| val(seed, i)).collect();
        Operand { data, rs, cs }
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// One case: checks `kernel` on `m × k · k × n` with the given layouts against the naive
/// product of the (bf16-rounded, for a bf16 kernel) inputs, in f64.
///
/// Tolerance: each output is a sum of `k` products accumulated in f32 (bf16 products are
/// exact in f32; f32 products round once), so the error is at most about
/// `k · eps_f32 · Σ |a||b|` (a standard bound for recursive summation), plus one rounding
/// of `|dst|` for the scale and the accumulation into `dst`.
#[allow(clippy::too_many_arguments)]
fn check(
    kernel: Kernel,
    (m, n, k): (usize, usize, usize),
    (ta, tb): (bool, bool),
    (pa, pb, pd): (usize, usize, usize),
    accumulate: bool,
    scale: f32,
    seed: u64,
) {
    let a = Operand::new(seed, m, k, ta, pa);
    let b = Operand::new(seed + 1, k, n, tb, pb);
    let dst_rs = n + pd;
    let init: Vec<f32> = (0..m * dst_rs).map(|i| val(seed + 2, i)).collect();
    let mut dst = init.clone();
    matmul_with(
        kernel,
        (m, n, k),
        (&a.data, a.rs, a.cs),
        (&b.data, b.rs, b.cs),
        (&mut dst, dst_rs),
        accumulate,
        scale,
    )
    .unwrap();
    let round = |x: f32| {
        if kernel.is_bf16() {
            round_bf16(x)
        } else {
            x
        }
    };
    let eps = f32::EPSILON as f64;
    for i in 0..m {
        for j in 0..n {
            let (mut sum, mut abs) = (0f64, 0f64);
            for p in 0..k {
                let prod = round(a.at(i, p)) as f64 * round(b.at(p, j)) as f64;
                sum += prod;
                abs += prod.abs();
            }
            let old = init[i * dst_rs + j] as f64;
            let want = scale as f64 * sum + if accumulate { old } else { 0.0 };
            let got = dst[i * dst_rs + j] as f64;
            let tol = (k as f64 + 2.0) * eps * (scale as f64).abs() * abs
                + 2.0 * eps * want.abs()
                + 1e-30;
            assert!(
                (got - want).abs() <= tol,
                "{kernel:?} {m}x{n}x{k} (ta {ta}, tb {tb}, acc {accumulate}) at ({i}, {j}): \
                 got {got}, want {want}, tol {tol}"
            );
        }
        // Padding columns of `dst` are untouched.
        for j in n..dst_rs {
            assert_eq!(dst[i * dst_rs + j], init[i * dst_rs + j]);
        }
    }
}

#[test]
fn bf16_rounding_is_nearest_even() {
    assert_eq!(bf16_bits(1.0), 0x3f80);
    assert_eq!(bf16_bits(-2.0), 0xc000);
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
    assert_eq!(bf16_value(bf16_bits(1.0 + 2f32.powi(-8))), 1.0);
    // 1 + 2^-7 + 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
    assert_eq!(
        bf16_value(bf16_bits(1.0 + 2f32.powi(-7) + 2f32.powi(-8))),
        1.0 + 2f32.powi(-6)
    );
    // Just above the halfway point rounds up.
    assert_eq!(
        bf16_value(bf16_bits(1.0 + 2f32.powi(-8) + 2f32.powi(-20))),
        1.0 + 2f32.powi(-7)
    );
    // Overflow rounds to infinity, subnormals flush to signed zero, NaN stays NaN.
    assert_eq!(bf16_value(bf16_bits(f32::MAX)), f32::INFINITY);
    assert_eq!(bf16_bits(-1e-40), 0x8000);
    assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
    assert_eq!(round_bf16(3.0), 3.0);
}

#[test]
fn every_available_kernel_is_listed() {
    let avail = Kernel::available();
    assert!(avail.contains(&Kernel::Bf16Portable));
    for k in Kernel::ALL {
        if !avail.contains(&k) {
            let mut d = [0f32; 1];
            assert!(matmul_with(
                k,
                (1, 1, 1),
                (&[1.0], 1, 1),
                (&[1.0], 1, 1),
                (&mut d, 1),
                false,
                1.0
            )
            .is_err());
        }
    }
}

/// Blocks larger than one packed block of `k` (256) and of `n` (1024), ragged edges.
#[test]
fn products_across_blocks() {
    for kernel in Kernel::available() {
        check(
            kernel,
            (13, 1030, 517),
            (false, true),
            (0, 3, 2),
            true,
            0.5,
            11,
        );
        check(
            kernel,
            (25, 33, 257),
            (true, false),
            (1, 0, 0),
            false,
            1.0,
            12,
        );
    }
}

#[test]
fn operands_too_short_are_refused() {
    let mut d = [0f32; 4];
    let short = [1f32; 5];
    for kernel in Kernel::available() {
        assert!(matmul_with(
            kernel,
            (2, 2, 3),
            (&short, 3, 1),
            (&short, 2, 1),
            (&mut d, 2),
            false,
            1.0
        )
        .is_err());
        assert!(matmul_with(
            kernel,
            (2, 3, 1),
            (&short, 1, 1),
            (&short, 3, 1),
            (&mut d, 3),
            false,
            1.0
        )
        .is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn kernels_match_a_naive_product(
        m in 1usize..40, n in 1usize..70, k in 0usize..40,
        ta: bool, tb: bool, pa in 0usize..3, pb in 0usize..3, pd in 0usize..3,
        accumulate: bool, scale in prop::sample::select(vec![1.0f32, 0.125, -2.0]),
        seed in 0u64..1000,
    ) {
        for kernel in Kernel::available() {
            check(kernel, (m, n, k), (ta, tb), (pa, pb, pd), accumulate, scale, seed);
        }
    }
}
