//! Element types and the small vector kernels the fused CPU ops are built from.
//!
//! Kernels are plain generic Rust over fixed-width lane arrays, which LLVM turns into vector
//! code. Each hot loop is generic over `const FMA: bool`; [`multiversion!`] compiles it
//! twice, once with AVX2+FMA enabled (chosen at run time when the CPU has them) and once for
//! the baseline target, so the crate needs no `-C target-cpu` flag.

use candle_core::{CpuStorage, WithDType};
use std::fmt;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// Lanes of the accumulator arrays: one AVX2 register of f32, two of f64.
pub(crate) const LANES: usize = 8;

/// A floating-point element type of the CPU kernels (f32 or f64).
pub(crate) trait Float:
    WithDType
    + Copy
    + Send
    + Sync
    + PartialOrd
    + fmt::Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Negative infinity.
    const NEG_INFINITY: Self;
    /// Fused multiply-add `self * a + b` with one rounding.
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Whether the value is NaN.
    fn is_nan(self) -> bool;
    /// `exp` of each lane; vectorisable for f32 (max relative error about 2 ulp).
    fn exp_lanes<const FMA: bool>(x: &mut [Self; LANES]);
    /// `exp` of one value, accurate to the last ulp (used in scalar tails).
    fn exp(self) -> Self;
    /// `exp` of one value, branch-free for f32 (as [`exp_lanes`](Float::exp_lanes)) so that
    /// a loop over a slice vectorises at the full register width; f64 as [`exp`](Float::exp).
    fn exp_fast<const FMA: bool>(self) -> Self;
    /// The elements of a CPU storage of this dtype.
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    /// Wraps a vector as a CPU storage.
    fn storage(v: Vec<Self>) -> CpuStorage;
}

/// `a * b + c`, fused when `FMA` (the caller runs with the FMA target feature).
#[inline(always)]
pub(crate) fn fma<T: Float, const FMA: bool>(a: T, b: T, c: T) -> T {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `max` that keeps NaN (so a NaN score is not silently dropped).
#[inline(always)]
pub(crate) fn max_nan<T: Float>(a: T, b: T) -> T {
    if a.is_nan() || a > b {
        a
    } else {
        b
    }
}

/// Cephes-style `expf`: range reduction by `ln 2` and a degree-6 polynomial, branch-free so
/// that it vectorises. Inputs are clamped to `[-87, 88]` (results below `2^-126` are not
/// needed by the kernels: `exp(-87)` stands in for an underflow to zero against the larger
/// terms it is added to); NaN propagates.
#[inline(always)]
fn exp_f32<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let f = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let xc = x.clamp(-87.0, 88.0);
    let t = f(xc, LOG2E, SHIFT);
    let n = t - SHIFT;
    let r = f(n, -C2, f(n, -C1, xc));
    let mut p = 1.987_569_1e-4_f32;
    p = f(p, r, 1.398_2e-3);
    p = f(p, r, 8.333_452e-3);
    p = f(p, r, 4.166_579_6e-2);
    p = f(p, r, 1.666_666_5e-1);
    p = f(p, r, 0.5);
    let y = f(p, r * r, r + 1.0);
    // 2^n from the integer sitting in the low mantissa bits of t.
    let e = (t.to_bits() as i32)
        .wrapping_sub(0x4B40_0000)
        .wrapping_add(127)
        << 23;
    let out = y * f32::from_bits(e as u32);
    if x.is_nan() {
        x
    } else {
        out
    }
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    #[inline(always)]
    fn exp_lanes<const FMA: bool>(x: &mut [Self; LANES]) {
        for v in x.iter_mut() {
            *v = exp_f32::<FMA>(*v);
        }
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn exp_fast<const FMA: bool>(self) -> Self {
        exp_f32::<FMA>(self)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    #[inline(always)]
    fn exp_lanes<const FMA: bool>(x: &mut [Self; LANES]) {
        // f64 is the finite-difference dtype: exactness matters more than speed.
        for v in x.iter_mut() {
            *v = v.exp();
        }
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn exp_fast<const FMA: bool>(self) -> Self {
        f64::exp(self)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// Makes [`has_avx2_fma`] answer `false`, so that unit tests run the baseline kernels.
#[cfg(test)]
pub(crate) static FORCE_BASELINE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether the CPU has AVX2 and FMA (checked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    #[cfg(test)]
    if FORCE_BASELINE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Defines `$name::<T>(args)` calling `$generic::<T, FMA>(args)`, compiled once with AVX2+FMA
/// (used when the CPU has them) and once for the baseline target.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident => $generic:ident ( $($arg:ident : $ty:ty),* $(,)? ) $(-> $ret:ty)?) => {
        $(#[$meta])*
        $vis fn $name<T: $crate::cpu::simd::Float>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast<T: $crate::cpu::simd::Float>($($arg: $ty),*) $(-> $ret)? {
                    $generic::<T, true>($($arg),*)
                }
                if $crate::cpu::simd::has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA, checked at run time just above.
                    return unsafe { fast::<T>($($arg),*) };
                }
            }
            $generic::<T, false>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Tree sum of the lanes.
#[inline(always)]
pub(crate) fn hsum<T: Float>(a: [T; LANES]) -> T {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// Dot product of `a` and `b[..a.len()]`.
#[inline(always)]
pub(crate) fn dot<T: Float, const FMA: bool>(a: &[T], b: &[T]) -> T {
    let b = &b[..a.len()];
    let mut acc = [T::ZERO; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] = fma::<T, FMA>(x[l], y[l], acc[l]);
        }
    }
    let mut s = hsum(acc);
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        s = fma::<T, FMA>(x, y, s);
    }
    s
}

/// `y += alpha * x` over `y.len()` elements.
#[inline(always)]
pub(crate) fn axpy<T: Float, const FMA: bool>(alpha: T, x: &[T], y: &mut [T]) {
    let x = &x[..y.len()];
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = fma::<T, FMA>(alpha, xi, *yi);
    }
}

/// `x[i] = exp(x[i] - shift)` in place; returns the sum of the results.
#[inline(always)]
pub(crate) fn exp_shift_sum<T: Float, const FMA: bool>(x: &mut [T], shift: T) -> T {
    // A plain map, which the loop vectoriser widens to the full register (a fixed array of
    // lanes was split into half-width registers with spills), then a lane-wise sum.
    for v in x.iter_mut() {
        *v = (*v - shift).exp_fast::<FMA>();
    }
    let mut acc = [T::ZERO; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    let mut s = hsum(acc);
    for &v in chunks.remainder() {
        s += v;
    }
    s
}

/// The largest element (NaN if any element is NaN), `-inf` for an empty slice.
#[inline(always)]
pub(crate) fn max<T: Float>(x: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = max_nan(c[l], acc[l]);
        }
    }
    let mut m = T::NEG_INFINITY;
    for a in acc.into_iter().chain(chunks.remainder().iter().copied()) {
        m = max_nan(a, m);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_matches_std_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            for fma_on in [false, true] {
                let got = if fma_on {
                    exp_f32::<true>(x)
                } else {
                    exp_f32::<false>(x)
                };
                let want = (x as f64).exp();
                worst = worst.max(((got as f64 - want) / want).abs());
            }
            x += 0.0137;
        }
        // 2 ulp of f32 is 2 * 2^-24 ≈ 1.19e-7 relative.
        assert!(worst < 1.2e-7, "worst relative error {worst}");
        assert!(exp_f32::<false>(f32::NAN).is_nan());
        assert!(exp_f32::<false>(-1e4) < 1e-37);
        assert!(exp_f32::<false>(0.0) == 1.0);
    }

    #[test]
    fn dot_kernels_match_naive_sums() {
        for n in [0usize, 1, 7, 8, 9, 17, 64] {
            let a: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            let bs: Vec<Vec<f64>> = (0..4)
                .map(|j| (0..n).map(|i| ((i + 3 * j) as f64 * 0.11).cos()).collect())
                .collect();
            let naive: Vec<f64> = bs
                .iter()
                .map(|b| a.iter().zip(b).map(|(x, y)| x * y).sum())
                .collect();
            for j in 0..4 {
                let d = dot::<f64, false>(&a, &bs[j]);
                assert!((d - naive[j]).abs() < 1e-12, "n={n} j={j}");
            }
        }
    }

    #[test]
    fn exp_shift_sum_and_max_match_naive() {
        let mut x: Vec<f32> = (0..21).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
        let m = max(&x);
        assert_eq!(m, x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let want: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
        let s = exp_shift_sum::<f32, false>(&mut x, m);
        for (g, w) in x.iter().zip(&want) {
            assert!((g - w).abs() <= 2e-7 * w.abs().max(1e-30), "{g} vs {w}");
        }
        assert!((s - want.iter().sum::<f32>()).abs() < 1e-5);
        assert!(max::<f32>(&[]).is_infinite());
        assert!(max(&[1.0f32, f32::NAN, 3.0]).is_nan());
    }
}
