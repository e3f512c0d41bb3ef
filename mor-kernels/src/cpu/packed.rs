//! Products of a few rows with a fixed weight matrix, the shape of decoding: `y = x · Wᵀ`
//! for `x: [m, k]` with `m` from 1 to a few dozen, `W: [n, k]` a linear layer's weight.
//!
//! A general GEMM packs both operands on every call; at decode time the weights never
//! change, so [`PackedMatrix`] packs them once, in column panels of [`PANEL`] outputs laid
//! out `k`-major (`panel[kk][j] = W[p·PANEL + j][kk]`), and the product streams each panel
//! once per call while the `x` rows stay in cache. The AVX2+FMA kernel keeps a tile of
//! `6 × 16` outputs in twelve registers.
//!
//! Every output is one fused multiply-add chain over `kk = 0..k` in order, whatever `m`, the
//! row's place in the batch or the thread count: a row's result does not depend on the
//! other rows it is batched with (the engine's batched decoding equals decoding each request
//! alone, bit for bit).

use crate::{Error, Result};

/// Output columns per packed panel (two AVX2 registers of f32).
pub const PANEL: usize = 16;

/// Rows of a register tile.
const MR: usize = 6;

/// Products (`m · n · k`) below this run on the calling thread.
const PAR_MIN_WORK: usize = 1 << 21;

/// Where a range of panels writes: rows of `ld` values whose column 0 is output column
/// `c0`, overwritten or (`accumulate`) added to.
struct Dst<'a> {
    y: &'a mut [f32],
    ld: usize,
    c0: usize,
    accumulate: bool,
}

/// A linear layer's weight `W: [n, k]`, packed for [`PackedMatrix::matmul`].
#[derive(Clone, PartialEq)]
pub struct PackedMatrix {
    k: usize,
    n: usize,
    /// `n.div_ceil(PANEL)` panels of `k × PANEL`, zero-padded past `n`.
    data: Vec<f32>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl PackedMatrix {
    /// Packs `w`, `n` rows of `k` values (row-major, as a linear layer's `[out, in]`
    /// weight).
    ///
    /// # Errors
    /// `w.len() != n · k`, or `n` or `k` zero.
    pub fn new(w: &[f32], n: usize, k: usize) -> Result<Self> {
        if n == 0 || k == 0 || n.checked_mul(k) != Some(w.len()) {
            return Err(Error::Invalid {
                op: "PackedMatrix::new",
                msg: format!(
                    "a weight of {} values is not [{n}, {k}] (both dims >= 1)",
                    w.len()
                ),
            });
        }
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0f32; panels * k * PANEL];
        for (col, row) in w.chunks_exact(k).enumerate() {
            let (p, j) = (col / PANEL, col % PANEL);
            let panel = &mut data[p * k * PANEL..(p + 1) * k * PANEL];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * PANEL + j] = v;
            }
        }
        Ok(PackedMatrix { k, n, data })
    }

    /// Packs the rows of several weights stacked (`[n₁ + n₂ + …, k]`), e.g. the query, key
    /// and value projections as one product.
    ///
    /// # Errors
    /// A part whose length is not a multiple of `k`, or no rows at all.
    pub fn stacked(parts: &[&[f32]], k: usize) -> Result<Self> {
        let mut w = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        for p in parts {
            if k == 0 || p.len() % k != 0 {
                return Err(Error::Invalid {
                    op: "PackedMatrix::stacked",
                    msg: format!(
                        "a part of {} values is not a whole number of rows of {k}",
                        p.len()
                    ),
                });
            }
            w.extend_from_slice(p);
        }
        let n = w.len() / k.max(1);
        Self::new(&w, n, k)
    }

    /// Inputs per row (`k`).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Outputs per row (`n`).
    pub fn n(&self) -> usize {
        self.n
    }

    /// `y = x · Wᵀ` (or `y += x · Wᵀ` when `accumulate`) for `x: [m, k]`, `y: [m, n]`,
    /// both row-major; `m = x.len() / k`. Splits the panels over the rayon threads when the
    /// product is large enough to pay for it.
    ///
    /// # Errors
    /// `x` not a whole number of rows, or `y` not `m · n` long.
    pub fn matmul(&self, x: &[f32], y: &mut [f32], accumulate: bool) -> Result<()> {
        let (k, n) = (self.k, self.n);
        if !x.len().is_multiple_of(k) || y.len() != (x.len() / k) * n {
            return Err(Error::Invalid {
                op: "PackedMatrix::matmul",
                msg: format!(
                    "x has {} values and y {}, expected [m, {k}] and [m, {n}]",
                    x.len(),
                    y.len()
                ),
            });
        }
        let m = x.len() / k;
        if m == 0 {
            return Ok(());
        }
        let panels = n.div_ceil(PANEL);
        let threads = rayon::current_num_threads();
        if threads <= 1 || panels < 2 || m * n * k < PAR_MIN_WORK {
            self.panels_into(
                x,
                0..panels,
                Dst {
                    y,
                    ld: n,
                    c0: 0,
                    accumulate,
                },
            );
            return Ok(());
        }
        // One contiguous range of panels per task, each into its own [m, width] buffer,
        // then copied into y (m·n copies against m·n·k products).
        use rayon::prelude::*;
        let per = panels.div_ceil(threads);
        let parts: Vec<(usize, Vec<f32>)> = (0..panels.div_ceil(per))
            .into_par_iter()
            .map(|t| {
                let ps = t * per..((t + 1) * per).min(panels);
                let c0 = ps.start * PANEL;
                let width = (ps.end * PANEL).min(n) - c0;
                let mut buf = vec![0f32; m * width];
                if accumulate {
                    for (dst, src) in buf.chunks_exact_mut(width).zip(y.chunks_exact(n)) {
                        dst.copy_from_slice(&src[c0..c0 + width]);
                    }
                }
                self.panels_into(
                    x,
                    ps,
                    Dst {
                        y: &mut buf,
                        ld: width,
                        c0,
                        accumulate,
                    },
                );
                (c0, buf)
            })
            .collect();
        for (c0, buf) in parts {
            let width = buf.len() / m;
            for (src, dst) in buf.chunks_exact(width).zip(y.chunks_exact_mut(n)) {
                dst[c0..c0 + width].copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Panel `p`: its `k × PANEL` values, its first output column and its width (`PANEL`,
    /// or less for the last panel).
    fn panel(&self, p: usize) -> (&[f32], usize, usize) {
        let col = p * PANEL;
        (
            &self.data[p * self.k * PANEL..(p + 1) * self.k * PANEL],
            col,
            PANEL.min(self.n - col),
        )
    }

    /// Panels `ps` of the product of the rows `x` (`m × k`) into `out`.
    fn panels_into(&self, x: &[f32], ps: std::ops::Range<usize>, out: Dst<'_>) {
        #[cfg(target_arch = "x86_64")]
        if super::simd::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above); the shapes were checked
            // by `matmul` (out holds m rows of `ld` covering the panels' columns).
            unsafe { avx2::panels(self, x, ps, out) };
            return;
        }
        portable_panels(self, x, ps, out);
    }
}

/// The baseline kernel: the same chains of `a · b + c` per output, in the same order.
fn portable_panels(a: &PackedMatrix, x: &[f32], ps: std::ops::Range<usize>, out: Dst<'_>) {
    let k = a.k;
    for p in ps {
        let (panel, col, width) = a.panel(p);
        for r in 0..x.len() / k {
            let xr = &x[r * k..(r + 1) * k];
            let mut acc = [0f32; PANEL];
            for (kk, &xv) in xr.iter().enumerate() {
                let w = &panel[kk * PANEL..(kk + 1) * PANEL];
                for j in 0..PANEL {
                    acc[j] = xv.mul_add(w[j], acc[j]);
                }
            }
            let start = r * out.ld + col - out.c0;
            for (o, v) in out.y[start..start + width].iter_mut().zip(acc) {
                *o = if out.accumulate { *o + v } else { v };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Dst, PackedMatrix, MR, PANEL};
    use std::arch::x86_64::*;

    /// The AVX2+FMA kernel over panels `ps` (callable only where the CPU has both). Slices
    /// are indexed with bounds checks; `x` holds `m × a.k` values, `out` `m` rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn panels(a: &PackedMatrix, x: &[f32], ps: std::ops::Range<usize>, out: Dst<'_>) {
        let k = a.k;
        let m = x.len() / k;
        for p in ps {
            let (panel, col, width) = a.panel(p);
            let mut r0 = 0;
            while r0 < m {
                let rows = MR.min(m - r0);
                let xs = &x[r0 * k..(r0 + rows) * k];
                let (ldy, accumulate) = (out.ld, out.accumulate);
                let ys = &mut out.y[r0 * ldy..];
                let off = col - out.c0;
                match rows {
                    6 => tile::<6>(panel, xs, k, ys, ldy, off, width, accumulate),
                    5 => tile::<5>(panel, xs, k, ys, ldy, off, width, accumulate),
                    4 => tile::<4>(panel, xs, k, ys, ldy, off, width, accumulate),
                    3 => tile::<3>(panel, xs, k, ys, ldy, off, width, accumulate),
                    2 => tile::<2>(panel, xs, k, ys, ldy, off, width, accumulate),
                    _ => tile::<1>(panel, xs, k, ys, ldy, off, width, accumulate),
                }
                r0 += rows;
            }
        }
    }

    /// `R` rows × one panel.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn tile<const R: usize>(
        panel: &[f32],
        xs: &[f32],
        k: usize,
        ys: &mut [f32],
        ldy: usize,
        off: usize,
        width: usize,
        accumulate: bool,
    ) {
        // Bounds the raw reads below: the panel has k × PANEL values, xs R rows of k.
        assert!(panel.len() >= k * PANEL && xs.len() >= R * k);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let wp = panel.as_ptr();
        let xp = xs.as_ptr();
        for kk in 0..k {
            // SAFETY: kk < k, so the 16 values at kk·PANEL are inside the panel.
            let (w0, w1) = unsafe {
                (
                    _mm256_loadu_ps(wp.add(kk * PANEL)),
                    _mm256_loadu_ps(wp.add(kk * PANEL + 8)),
                )
            };
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: r < R and kk < k, inside xs.
                let xb = _mm256_set1_ps(unsafe { *xp.add(r * k + kk) });
                acc_r[0] = _mm256_fmadd_ps(xb, w0, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(xb, w1, acc_r[1]);
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let mut out = [0f32; PANEL];
            let (lo, hi) = out.split_at_mut(8);
            // SAFETY: each half holds 8 f32.
            unsafe {
                _mm256_storeu_ps(lo.as_mut_ptr(), acc_r[0]);
                _mm256_storeu_ps(hi.as_mut_ptr(), acc_r[1]);
            }
            let dst = &mut ys[r * ldy + off..r * ldy + off + width];
            if accumulate {
                for (d, v) in dst.iter_mut().zip(out) {
                    *d += v;
                }
            } else {
                dst.copy_from_slice(&out[..width]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The product in f64, one dot product per output (a separate reference).
    fn naive(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            for c in 0..n {
                y[r * n + c] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                    .sum();
            }
        }
        y
    }

    /// `Σ_i |x_ri w_ci|`: the magnitudes that enter each output's sum.
    fn naive_magnitudes(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let ax: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        let aw: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        naive(&ax, &aw, m, n, k)
    }

    fn dst(y: &mut [f32], ld: usize, c0: usize, accumulate: bool) -> Dst<'_> {
        Dst {
            y,
            ld,
            c0,
            accumulate,
        }
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn check(m: usize, n: usize, k: usize, accumulate: bool) {
        let x = values(m * k, 1 + m as u64);
        let w = values(n * k, 2 + n as u64);
        let y0 = values(m * n, 3);
        let a = PackedMatrix::new(&w, n, k).unwrap();
        let mut y = y0.clone();
        a.matmul(&x, &mut y, accumulate).unwrap();
        let want = naive(&x, &w, m, n, k);
        let mag = naive_magnitudes(&x, &w, m, n, k);
        for i in 0..m * n {
            let base = if accumulate { y0[i] as f64 } else { 0.0 };
            let e = (y[i] as f64 - (want[i] + base)).abs();
            // A sum of k products and the base in f32 errs by at most γ_{k+2} times the sum
            // of the magnitudes of its terms (Higham §3.1; the products rounded or fused),
            // whatever the cancellation; γ_n = n u / (1 - n u) < (n + 1) u here.
            let u = f32::EPSILON as f64 / 2.0;
            assert!(
                e <= (k as f64 + 3.0) * u * (mag[i] + base.abs()),
                "m {m} n {n} k {k} [{i}]: {} vs {}",
                y[i],
                want[i] + base
            );
        }
    }

    #[test]
    fn matches_a_naive_product_on_edge_shapes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 16, 8),
            (7, 17, 5),
            (6, 33, 64),
            (13, 15, 3),
            (32, 48, 256),
        ] {
            check(m, n, k, false);
            check(m, n, k, true);
        }
    }

    /// The baseline kernel (run on CPUs without AVX2/FMA) gives the same bits as the
    /// dispatched one: both are the same fused chains in the same order.
    #[test]
    fn baseline_kernel_gives_the_same_bits() {
        for &(m, n, k, acc) in &[(7, 19, 9, false), (3, 40, 33, true), (13, 16, 64, false)] {
            let x = values(m * k, 7);
            let w = values(n * k, 8);
            let a = PackedMatrix::new(&w, n, k).unwrap();
            let y0 = values(m * n, 9);
            let (mut fast, mut base) = (y0.clone(), y0);
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // Called directly: another test may force the dispatch to the baseline.
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                unsafe { avx2::panels(&a, &x, 0..n.div_ceil(PANEL), dst(&mut fast, n, 0, acc)) };
            } else {
                a.matmul(&x, &mut fast, acc).unwrap();
            }
            #[cfg(not(target_arch = "x86_64"))]
            a.matmul(&x, &mut fast, acc).unwrap();
            portable_panels(&a, &x, 0..n.div_ceil(PANEL), dst(&mut base, n, 0, acc));
            assert_eq!(fast, base, "m {m} n {n} k {k}");
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        let (n, k) = (40, 70);
        let w = values(n * k, 9);
        let a = PackedMatrix::new(&w, n, k).unwrap();
        let x = values(13 * k, 10);
        let mut all = vec![0f32; 13 * n];
        a.matmul(&x, &mut all, false).unwrap();
        for r in 0..13 {
            let mut one = vec![0f32; n];
            a.matmul(&x[r * k..(r + 1) * k], &mut one, false).unwrap();
            assert_eq!(one, all[r * n..(r + 1) * n], "row {r}");
        }
    }

    #[test]
    fn threaded_product_equals_the_serial_one() {
        let (m, n, k) = (40, 300, 256);
        let w = values(n * k, 4);
        let a = PackedMatrix::new(&w, n, k).unwrap();
        let x = values(m * k, 5);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for accumulate in [false, true] {
            let y0 = values(m * n, 6);
            let mut serial = y0.clone();
            a.panels_into(&x, 0..n.div_ceil(PANEL), dst(&mut serial, n, 0, accumulate));
            let mut par = y0;
            pool.install(|| a.matmul(&x, &mut par, accumulate)).unwrap();
            assert_eq!(serial, par, "accumulate {accumulate}");
        }
    }

    /// A range of panels into a buffer whose column 0 is a later output column (the
    /// threaded path's layout): both kernels, the same bits as the full product.
    #[test]
    fn a_panel_range_lands_at_its_columns() {
        let (m, n, k) = (7, 50, 33);
        let a = PackedMatrix::new(&values(n * k, 11), n, k).unwrap();
        let x = values(m * k, 12);
        let mut full = vec![0f32; m * n];
        a.matmul(&x, &mut full, false).unwrap();
        let (c0, width) = (PANEL, n - PANEL);
        let mut part = vec![0f32; m * width];
        portable_panels(
            &a,
            &x,
            1..n.div_ceil(PANEL),
            dst(&mut part, width, c0, false),
        );
        let mut fast = vec![0f32; m * width];
        a.panels_into(&x, 1..n.div_ceil(PANEL), dst(&mut fast, width, c0, false));
        for r in 0..m {
            assert_eq!(
                part[r * width..(r + 1) * width],
                full[r * n + c0..(r + 1) * n]
            );
            assert_eq!(
                fast[r * width..(r + 1) * width],
                full[r * n + c0..(r + 1) * n]
            );
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(PackedMatrix::new(&[1.0; 6], 4, 2).is_err());
        assert!(PackedMatrix::new(&[], 0, 2).is_err());
        let a = PackedMatrix::new(&[1.0; 6], 3, 2).unwrap();
        assert!(a.matmul(&[1.0; 3], &mut [0.0; 3], false).is_err());
        assert!(a.matmul(&[1.0; 4], &mut [0.0; 5], false).is_err());
        assert!(PackedMatrix::stacked(&[&[1.0; 4], &[1.0; 3]], 2).is_err());
        let s = PackedMatrix::stacked(&[&[1.0; 4], &[2.0; 2]], 2).unwrap();
        assert_eq!((s.n(), s.k()), (3, 2));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_shape_matches_the_naive_product(m in 1usize..20, n in 1usize..50, k in 1usize..40, acc in any::<bool>()) {
            check(m, n, k, acc);
        }
    }
}
