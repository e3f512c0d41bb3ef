//! Products of a few rows with a fixed weight matrix, the shape of decoding: `y = x · Wᵀ`
//! for `x: [m, k]` with `m` from 1 to a few dozen, `W: [n, k]` a linear layer's weight.
//!
//! A general GEMM packs both operands on every call; at decode time the weights never
//! change, so [`PackedMatrix`] packs them once, in column panels of [`PANEL`] outputs laid
//! out `k`-major, and the product streams each panel once per row tile while the `x` rows
//! stay in cache.
//!
//! Two storage precisions ([`Precision`]):
//! - **f32**: `panel[kk][j] = W[p·PANEL + j][kk]`. Every output is one fused multiply-add
//!   chain over `kk = 0..k` in order. Kernels: AVX-512 (tiles of up to 8 rows × 3 panels
//!   or 6 rows × 4 panels of 16 outputs, or 1-2 rows × 8 panels), AVX2+FMA (6 × 16) and portable; all give the
//!   same bits.
//! - **bf16**: the weights rounded to bf16 (round to nearest even), stored in pairs along `k`
//!   (`panel[q][j] = (W[j][2q], W[j][2q+1])`, the even element in the low half), the layout
//!   of `VDPBF16PS`. The `x` rows are rounded to bf16 the same way on every call; products
//!   of two bf16 values are exact in f32 and accumulate in f32. Every output is one chain
//!   over the pairs `q = 0..⌈k/2⌉` in order, each pair adding its odd product and then its
//!   even product, each addition rounded once (the order `VDPBF16PS` specifies). Kernels:
//!   AVX512_BF16 (`VDPBF16PS`, the AVX-512 tile shapes), AVX2+FMA and portable
//!   (the same chains as fused multiply-adds). Rounding to bf16 flushes subnormal inputs
//!   to zero, as the instruction does. The tiers agree bit for bit, except that
//!   `VDPBF16PS` also flushes a subnormal partial sum (|s| < 2⁻¹²⁶ ≈ 1.2·10⁻³⁸) to zero,
//!   which the fallbacks do not: there they can differ by less than 2⁻¹²⁶ per addition.
//!
//! The kernel is chosen at run time by [`isa::tier`] (the environment variable
//! `MOR_CPU_TIER` lowers it), never above what the CPU supports.
//!
//! In both precisions a row's result does not depend on `m`, the row's place in the batch,
//! the tile it falls in, or the thread count: the engine's batched decoding equals decoding
//! each request alone, bit for bit.

use super::isa::{self, Tier};
use crate::{Error, Result};
pub use mor_core::config::Precision;

/// Output columns per packed panel (two AVX2 registers, or one AVX-512 register, of f32).
pub const PANEL: usize = 16;

/// Rows of an AVX2 register tile.
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

/// The packed values.
#[derive(Clone, PartialEq)]
enum Data {
    /// `n.div_ceil(PANEL)` panels of `k × PANEL` f32, zero-padded past `n`.
    F32(Vec<f32>),
    /// `n.div_ceil(PANEL)` panels of `⌈k/2⌉ × PANEL` pairs of bf16 (even `k` index in the
    /// low 16 bits), zero-padded past `n` and past `k`.
    Bf16(Vec<u32>),
}

/// The `x` rows as the kernels read them.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// `m × k` f32.
    F32(&'a [f32]),
    /// `m × ⌈k/2⌉` pairs of bf16.
    Bf16(&'a [u32]),
}

/// A linear layer's weight `W: [n, k]`, packed for [`PackedMatrix::matmul`].
#[derive(Clone, PartialEq)]
pub struct PackedMatrix {
    k: usize,
    n: usize,
    data: Data,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("precision", &self.precision())
            .finish()
    }
}

/// `v` rounded to bf16 (round to nearest even; a subnormal becomes a zero of its sign, a
/// NaN stays a NaN), as the 16 high bits of an f32.
fn bf16_bits(v: f32) -> u32 {
    let b = v.to_bits();
    if v.is_nan() {
        return (b >> 16) | 0x40;
    }
    if b & 0x7f80_0000 == 0 {
        return (b >> 16) & 0x8000;
    }
    (b + 0x7fff + ((b >> 16) & 1)) >> 16
}

/// Row `xr` (`k` values) as `⌈k/2⌉` bf16 pairs appended to `out`.
fn push_pairs(xr: &[f32], out: &mut Vec<u32>) {
    let mut it = xr.chunks_exact(2);
    for c in &mut it {
        out.push(bf16_bits(c[0]) | (bf16_bits(c[1]) << 16));
    }
    if let [last] = it.remainder() {
        out.push(bf16_bits(*last));
    }
}

/// The f32 values of the odd (high) and even (low) halves of a pair.
#[inline(always)]
fn halves(p: u32) -> (f32, f32) {
    (f32::from_bits(p & 0xffff_0000), f32::from_bits(p << 16))
}

thread_local! {
    /// Reused buffer of the bf16 pairs of `x` (taken out while in use, so a nested call
    /// on the same thread only allocates).
    static PAIRS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl PackedMatrix {
    /// Packs `w`, `n` rows of `k` values (row-major, as a linear layer's `[out, in]`
    /// weight), in f32.
    ///
    /// # Errors
    /// `w.len() != n · k`, or `n` or `k` zero.
    pub fn new(w: &[f32], n: usize, k: usize) -> Result<Self> {
        Self::with_precision(w, n, k, Precision::F32)
    }

    /// Packs `w` (`[n, k]`, row-major) in `precision`: f32, or bf16 rounded to nearest
    /// even (the products then round `x` to bf16 too and accumulate in f32).
    ///
    /// # Errors
    /// `w.len() != n · k`, or `n` or `k` zero.
    pub fn with_precision(w: &[f32], n: usize, k: usize, precision: Precision) -> Result<Self> {
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
        let data = match precision {
            Precision::F32 => {
                let mut data = vec![0f32; panels * k * PANEL];
                for (col, row) in w.chunks_exact(k).enumerate() {
                    let (p, j) = (col / PANEL, col % PANEL);
                    let panel = &mut data[p * k * PANEL..(p + 1) * k * PANEL];
                    for (kk, &v) in row.iter().enumerate() {
                        panel[kk * PANEL + j] = v;
                    }
                }
                Data::F32(data)
            }
            Precision::Bf16 => {
                let kp = k.div_ceil(2);
                let mut data = vec![0u32; panels * kp * PANEL];
                let mut pairs = Vec::with_capacity(kp);
                for (col, row) in w.chunks_exact(k).enumerate() {
                    let (p, j) = (col / PANEL, col % PANEL);
                    let panel = &mut data[p * kp * PANEL..(p + 1) * kp * PANEL];
                    pairs.clear();
                    push_pairs(row, &mut pairs);
                    for (q, &v) in pairs.iter().enumerate() {
                        panel[q * PANEL + j] = v;
                    }
                }
                Data::Bf16(data)
            }
        };
        Ok(PackedMatrix { k, n, data })
    }

    /// Packs the rows of several weights stacked (`[n₁ + n₂ + …, k]`), e.g. the query, key
    /// and value projections as one product, in f32.
    ///
    /// # Errors
    /// A part whose length is not a multiple of `k`, or no rows at all.
    pub fn stacked(parts: &[&[f32]], k: usize) -> Result<Self> {
        Self::stacked_with_precision(parts, k, Precision::F32)
    }

    /// [`PackedMatrix::stacked`] in `precision` (see [`PackedMatrix::with_precision`]).
    ///
    /// # Errors
    /// A part whose length is not a multiple of `k`, or no rows at all.
    pub fn stacked_with_precision(
        parts: &[&[f32]],
        k: usize,
        precision: Precision,
    ) -> Result<Self> {
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
        Self::with_precision(&w, n, k, precision)
    }

    /// Inputs per row (`k`).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Outputs per row (`n`).
    pub fn n(&self) -> usize {
        self.n
    }

    /// The storage precision.
    pub fn precision(&self) -> Precision {
        match self.data {
            Data::F32(_) => Precision::F32,
            Data::Bf16(_) => Precision::Bf16,
        }
    }

    /// Bytes of packed weights (padding included): what a product streams.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(d) => d.len() * 4,
            Data::Bf16(d) => d.len() * 4,
        }
    }

    /// `v` rounded to bf16 as the bf16 products round their inputs (to nearest even,
    /// subnormals to zero), returned as the f32 of equal value.
    pub fn round_bf16(v: f32) -> f32 {
        f32::from_bits(bf16_bits(v) << 16)
    }

    /// `y = x · Wᵀ` (or `y += x · Wᵀ` when `accumulate`) for `x: [m, k]`, `y: [m, n]`,
    /// both row-major; `m = x.len() / k`. Splits the panels over the rayon threads when the
    /// product is large enough to pay for it. Uses the kernels of [`isa::tier`].
    ///
    /// # Errors
    /// `x` not a whole number of rows, or `y` not `m · n` long.
    pub fn matmul(&self, x: &[f32], y: &mut [f32], accumulate: bool) -> Result<()> {
        self.matmul_at(isa::tier(), x, y, accumulate)
    }

    /// [`PackedMatrix::matmul`] with the kernels of `tier`, lowered to what the CPU
    /// supports ([`isa::detected`]): the way to run (and compare) every tier in one process.
    ///
    /// # Errors
    /// `x` not a whole number of rows, or `y` not `m · n` long.
    pub fn matmul_at(&self, tier: Tier, x: &[f32], y: &mut [f32], accumulate: bool) -> Result<()> {
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
        let tier = tier.min(isa::detected());
        match self.data {
            Data::F32(_) => self.matmul_rows(tier, Rows::F32(x), m, y, accumulate),
            Data::Bf16(_) => {
                let mut pairs = PAIRS.take();
                pairs.clear();
                for xr in x.chunks_exact(k) {
                    #[cfg(target_arch = "x86_64")]
                    if tier >= Tier::Avx512Bf16 {
                        // SAFETY: the CPU has AVX-512 F and AVX512_BF16 (the tier is at
                        // most the detected one).
                        unsafe { avx512bf16::push_pairs(xr, &mut pairs) };
                        continue;
                    }
                    push_pairs(xr, &mut pairs);
                }
                self.matmul_rows(tier, Rows::Bf16(&pairs), m, y, accumulate);
                PAIRS.set(pairs);
            }
        }
        Ok(())
    }

    /// The product of `m` checked rows, serial or over the rayon threads.
    fn matmul_rows(&self, tier: Tier, x: Rows<'_>, m: usize, y: &mut [f32], accumulate: bool) {
        let (k, n) = (self.k, self.n);
        let panels = n.div_ceil(PANEL);
        let threads = rayon::current_num_threads();
        if threads <= 1 || panels < 2 || m * n * k < PAR_MIN_WORK {
            self.panels_into(
                tier,
                x,
                0..panels,
                Dst {
                    y,
                    ld: n,
                    c0: 0,
                    accumulate,
                },
            );
            return;
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
                    tier,
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
    }

    /// Panel `p` of an f32 matrix: its `k × PANEL` values, its first output column and its
    /// width (`PANEL`, or less for the last panel).
    fn panel_f32(&self, p: usize) -> (&[f32], usize, usize) {
        let Data::F32(data) = &self.data else {
            unreachable!("an f32 panel of a bf16 matrix")
        };
        let col = p * PANEL;
        (
            &data[p * self.k * PANEL..(p + 1) * self.k * PANEL],
            col,
            PANEL.min(self.n - col),
        )
    }

    /// Panel `p` of a bf16 matrix: its `⌈k/2⌉ × PANEL` pairs, first column and width.
    fn panel_bf16(&self, p: usize) -> (&[u32], usize, usize) {
        let Data::Bf16(data) = &self.data else {
            unreachable!("a bf16 panel of an f32 matrix")
        };
        let kp = self.k.div_ceil(2);
        let col = p * PANEL;
        (
            &data[p * kp * PANEL..(p + 1) * kp * PANEL],
            col,
            PANEL.min(self.n - col),
        )
    }

    /// Panels `ps` of the product of the rows `x` into `out`, with the kernels of `tier`
    /// (at most [`isa::detected`]). `x` matches the storage precision.
    fn panels_into(&self, tier: Tier, x: Rows<'_>, ps: std::ops::Range<usize>, out: Dst<'_>) {
        let tier = tier.min(isa::detected());
        match x {
            Rows::F32(x) => {
                #[cfg(target_arch = "x86_64")]
                if tier >= Tier::Avx512 {
                    // SAFETY: the CPU has AVX-512 F (the tier is at most the detected one);
                    // the shapes were checked by `matmul_at`.
                    unsafe { avx512::panels(self, x, ps, out) };
                    return;
                } else if tier >= Tier::Avx2 {
                    // SAFETY: the CPU has AVX2 and FMA (as above).
                    unsafe { avx2::panels(self, x, ps, out) };
                    return;
                }
                portable_panels(self, x, ps, out);
            }
            Rows::Bf16(x) => {
                #[cfg(target_arch = "x86_64")]
                if tier >= Tier::Avx512Bf16 {
                    // SAFETY: the CPU has AVX-512 F and AVX512_BF16 (as above).
                    unsafe { avx512::panels_bf16(self, x, ps, out) };
                    return;
                } else if tier >= Tier::Avx2 {
                    // SAFETY: the CPU has AVX2 and FMA (as above).
                    unsafe { avx2::panels_bf16(self, x, ps, out) };
                    return;
                }
                portable_panels_bf16(self, x, ps, out);
            }
        }
    }
}

/// Writes (or adds) the `width` first values of `acc` at `out`'s row `r`, column `col`.
#[inline(always)]
fn store_row(out: &mut Dst<'_>, r: usize, col: usize, width: usize, acc: &[f32; PANEL]) {
    let start = r * out.ld + col - out.c0;
    let accumulate = out.accumulate;
    for (o, &v) in out.y[start..start + width].iter_mut().zip(acc) {
        *o = if accumulate { *o + v } else { v };
    }
}

/// The baseline f32 kernel: the same chains of `a · b + c` per output, in the same order.
fn portable_panels(a: &PackedMatrix, x: &[f32], ps: std::ops::Range<usize>, mut out: Dst<'_>) {
    let k = a.k;
    for p in ps {
        let (panel, col, width) = a.panel_f32(p);
        for r in 0..x.len() / k {
            let xr = &x[r * k..(r + 1) * k];
            let mut acc = [0f32; PANEL];
            for (kk, &xv) in xr.iter().enumerate() {
                let w = &panel[kk * PANEL..(kk + 1) * PANEL];
                for j in 0..PANEL {
                    acc[j] = xv.mul_add(w[j], acc[j]);
                }
            }
            store_row(&mut out, r, col, width, &acc);
        }
    }
}

/// The baseline bf16 kernel: per pair, the odd product then the even one, each one fused
/// multiply-add (exact product, one rounding), as `VDPBF16PS` specifies.
fn portable_panels_bf16(a: &PackedMatrix, x: &[u32], ps: std::ops::Range<usize>, mut out: Dst<'_>) {
    let kp = a.k.div_ceil(2);
    for p in ps {
        let (panel, col, width) = a.panel_bf16(p);
        for r in 0..x.len() / kp {
            let xr = &x[r * kp..(r + 1) * kp];
            let mut acc = [0f32; PANEL];
            for (q, &xq) in xr.iter().enumerate() {
                let (xo, xe) = halves(xq);
                let w = &panel[q * PANEL..(q + 1) * PANEL];
                for j in 0..PANEL {
                    let (wo, we) = halves(w[j]);
                    acc[j] = xe.mul_add(we, xo.mul_add(wo, acc[j]));
                }
            }
            store_row(&mut out, r, col, width, &acc);
        }
    }
}

/// Calls `$tile::<$K, R, $p>($args)` for `R = $rows`, one of the listed literals.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($rows:expr, $tile:ident, $K:ty, [$($r:literal),*], $p:literal, $args:tt) => {
        match $rows {
            $($r => $tile::<$K, $r, $p> $args,)*
            _ => unreachable!("a tile of {} rows", $rows),
        }
    };
}

/// The two entry points of a kernel module, `panels` (f32) and `panels_bf16`, compiled with
/// the features `$f32` and `$bf16` around the module's generic `walk`.
#[cfg(target_arch = "x86_64")]
macro_rules! entry_points {
    ($f32:literal, $bf16:literal, $name:literal) => {
        #[doc = concat!("The ", $name, " f32 kernel over panels `ps` (callable only where the CPU has `", $f32, "`): the chains of [`super::portable_panels`]. `x` holds `m × a.k` values, `out` `m` rows.")]
        #[target_feature(enable = $f32)]
        pub(super) fn panels(
            a: &PackedMatrix,
            x: &[f32],
            ps: std::ops::Range<usize>,
            out: Dst<'_>,
        ) {
            walk::<F32>(a, x, ps, out)
        }

        #[doc = concat!("The ", $name, " bf16 kernel over panels `ps` (callable only where the CPU has `", $bf16, "`): the chains of [`super::portable_panels_bf16`]. `x` holds `m × ⌈a.k/2⌉` pairs.")]
        #[target_feature(enable = $bf16)]
        pub(super) fn panels_bf16(
            a: &PackedMatrix,
            x: &[u32],
            ps: std::ops::Range<usize>,
            out: Dst<'_>,
        ) {
            walk::<Bf16>(a, x, ps, out)
        }
    };
}

/// The kernels' view of one storage precision: the packed element (4 bytes: an f32, or a
/// pair of bf16 in a `u32`), the panels and the length of an `x` row in elements.
trait Store {
    /// A packed element, as the `x` rows hold it too.
    type E: Copy;
    /// Panel `p`: its elements (`len × PANEL`), first output column and width.
    fn panel(a: &PackedMatrix, p: usize) -> (&[Self::E], usize, usize);
    /// Elements per `x` row (`k`, or `⌈k/2⌉` pairs).
    fn len(a: &PackedMatrix) -> usize;
}

/// f32 storage.
struct F32;
/// bf16 storage (pairs along `k`).
struct Bf16;

impl Store for F32 {
    type E = f32;
    #[inline(always)]
    fn panel(a: &PackedMatrix, p: usize) -> (&[f32], usize, usize) {
        a.panel_f32(p)
    }
    #[inline(always)]
    fn len(a: &PackedMatrix) -> usize {
        a.k
    }
}

impl Store for Bf16 {
    type E = u32;
    #[inline(always)]
    fn panel(a: &PackedMatrix, p: usize) -> (&[u32], usize, usize) {
        a.panel_bf16(p)
    }
    #[inline(always)]
    fn len(a: &PackedMatrix) -> usize {
        a.k.div_ceil(2)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{halves, store_row, Bf16, Dst, PackedMatrix, Store, F32, MR, PANEL};
    use std::arch::x86_64::*;

    /// One precision's arithmetic in AVX2 registers: a panel line (16 outputs) loaded for
    /// the products, and one `x` element's multiply-adds into a row's two accumulators.
    pub(super) trait Lanes: Store {
        /// A panel line ready for the products.
        type W: Copy;
        /// The 16 elements at `p`.
        ///
        /// # Safety
        /// AVX2 and FMA; 16 readable elements at `p`.
        unsafe fn load(p: *const Self::E) -> Self::W;
        /// `acc + x · w`, in the chain order of the precision.
        ///
        /// # Safety
        /// AVX2 and FMA.
        unsafe fn madd(acc: [__m256; 2], x: Self::E, w: Self::W) -> [__m256; 2];
    }

    impl Lanes for F32 {
        type W = [__m256; 2];
        #[inline(always)]
        unsafe fn load(p: *const f32) -> [__m256; 2] {
            // SAFETY: the caller's contract.
            unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] }
        }
        #[inline(always)]
        unsafe fn madd(acc: [__m256; 2], x: f32, w: [__m256; 2]) -> [__m256; 2] {
            // SAFETY: the caller's contract.
            unsafe {
                let xb = _mm256_set1_ps(x);
                [
                    _mm256_fmadd_ps(xb, w[0], acc[0]),
                    _mm256_fmadd_ps(xb, w[1], acc[1]),
                ]
            }
        }
    }

    impl Lanes for Bf16 {
        /// The odd (high) halves of the 16 pairs widened to f32, then the even (low) ones.
        type W = [[__m256; 2]; 2];
        #[inline(always)]
        unsafe fn load(p: *const u32) -> [[__m256; 2]; 2] {
            // SAFETY: the caller's contract.
            unsafe {
                let v = [
                    _mm256_loadu_si256(p.cast()),
                    _mm256_loadu_si256(p.add(8).cast()),
                ];
                let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
                [
                    [
                        _mm256_castsi256_ps(_mm256_and_si256(v[0], hi)),
                        _mm256_castsi256_ps(_mm256_and_si256(v[1], hi)),
                    ],
                    [
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v[0])),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v[1])),
                    ],
                ]
            }
        }
        #[inline(always)]
        unsafe fn madd(acc: [__m256; 2], x: u32, w: [[__m256; 2]; 2]) -> [__m256; 2] {
            let (xo, xe) = halves(x);
            // SAFETY: the caller's contract.
            unsafe {
                let (xo, xe) = (_mm256_set1_ps(xo), _mm256_set1_ps(xe));
                [
                    _mm256_fmadd_ps(xe, w[1][0], _mm256_fmadd_ps(xo, w[0][0], acc[0])),
                    _mm256_fmadd_ps(xe, w[1][1], _mm256_fmadd_ps(xo, w[0][1], acc[1])),
                ]
            }
        }
    }

    entry_points!("avx2,fma", "avx2,fma", "AVX2+FMA");

    /// Panels `ps` one at a time, rows in tiles of up to [`MR`].
    #[inline(always)]
    fn walk<K: Lanes>(a: &PackedMatrix, x: &[K::E], ps: std::ops::Range<usize>, mut out: Dst<'_>) {
        let len = K::len(a);
        let m = x.len() / len;
        for p in ps {
            let mut r0 = 0;
            while r0 < m {
                let rows = MR.min(m - r0);
                let xs = &x[r0 * len..(r0 + rows) * len];
                by_rows!(
                    rows,
                    tile,
                    K,
                    [1, 2, 3, 4, 5, 6],
                    1,
                    (a, p, xs, len, &mut out, r0)
                );
                r0 += rows;
            }
        }
    }

    /// `R` rows × panel `p` (`P` is 1).
    #[inline(always)]
    fn tile<K: Lanes, const R: usize, const P: usize>(
        a: &PackedMatrix,
        p: usize,
        xs: &[K::E],
        len: usize,
        out: &mut Dst<'_>,
        r0: usize,
    ) {
        let (panel, col, width) = K::panel(a, p);
        // Bounds the raw reads below: the panel has len × PANEL elements, xs R rows of len.
        assert!(panel.len() >= len * PANEL && xs.len() >= R * len);
        // SAFETY: (every `unsafe` below) the callers run with AVX2 and FMA.
        let mut acc = [[unsafe { _mm256_setzero_ps() }; 2]; R];
        let wp = panel.as_ptr();
        for q in 0..len {
            // SAFETY: q < len, so the 16 elements at q·PANEL are inside the panel.
            let w = unsafe { K::load(wp.add(q * PANEL)) };
            for (r, acc_r) in acc.iter_mut().enumerate() {
                *acc_r = unsafe { K::madd(*acc_r, xs[r * len + q], w) };
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let mut row = [0f32; PANEL];
            let (lo, hi) = row.split_at_mut(8);
            // SAFETY: each half holds 8 f32.
            unsafe {
                _mm256_storeu_ps(lo.as_mut_ptr(), acc_r[0]);
                _mm256_storeu_ps(hi.as_mut_ptr(), acc_r[1]);
            }
            store_row(out, r0 + r, col, width, &row);
        }
    }
}

/// The AVX-512 tile shape for `m` rows: (rows per tile, panels per group). Every output
/// is its own chain whatever the shape, so the shape only sets how many independent chains
/// are in flight (`rows × panels`): one row alone still runs eight. Above 6 rows the rows
/// are split into tiles of equal size (at most 8: 32 rows are 4 tiles of 8 × 3 panels).
#[cfg(target_arch = "x86_64")]
fn shape512(m: usize) -> (usize, usize) {
    match m {
        1 => (1, 8),
        2 => (2, 8),
        3..=6 => (m, 4),
        _ => (m.div_ceil(m.div_ceil(8)), 3),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Bf16, Dst, PackedMatrix, Store, F32, PANEL};
    use std::arch::x86_64::*;

    /// One precision's multiply-add in AVX-512 registers.
    pub(super) trait Lanes: Store {
        /// `acc + x · w` for a broadcast element `x` and a panel line `w` (both as raw
        /// 32-bit lanes), in the chain order of the precision.
        ///
        /// # Safety
        /// AVX-512 F (and AVX512_BF16 for bf16).
        unsafe fn madd(acc: __m512, x: __m512, w: __m512) -> __m512;
    }

    impl Lanes for F32 {
        #[inline(always)]
        unsafe fn madd(acc: __m512, x: __m512, w: __m512) -> __m512 {
            // SAFETY: the caller's contract.
            unsafe { _mm512_fmadd_ps(x, w, acc) }
        }
    }

    impl Lanes for Bf16 {
        /// `VDPBF16PS`: per lane, the odd product then the even one, each addition rounded.
        #[inline(always)]
        unsafe fn madd(acc: __m512, x: __m512, w: __m512) -> __m512 {
            // SAFETY: the caller's contract; __m512 and __m512bh are both 64 bytes of lanes.
            unsafe {
                _mm512_dpbf16_ps(
                    acc,
                    std::mem::transmute::<__m512, __m512bh>(x),
                    std::mem::transmute::<__m512, __m512bh>(w),
                )
            }
        }
    }

    entry_points!(
        "avx512f",
        "avx512f,avx512bf16",
        "AVX-512 (bf16: `VDPBF16PS`)"
    );

    /// Walks panels `ps` in groups of the shape's width (the last ones narrower) and rows in
    /// tiles of the shape's height. The first row tile of a group prefetches the next
    /// group's panels (contiguous after it), so the weights stream from memory while the
    /// current group is computed.
    #[inline(always)]
    fn walk<K: Lanes>(a: &PackedMatrix, x: &[K::E], ps: std::ops::Range<usize>, mut out: Dst<'_>) {
        let len = K::len(a);
        let m = x.len() / len;
        let (rmax, pw) = super::shape512(m);
        let mut p = ps.start;
        while p < ps.end {
            let np = match pw.min(ps.end - p) {
                5..=7 => 4,
                w => w,
            };
            // What the next group reads: its panels, at most this group's count of lines.
            let next = np.min(ps.end - p - np) * len;
            let mut r0 = 0;
            while r0 < m {
                let rows = rmax.min(m - r0);
                let xs = &x[r0 * len..(r0 + rows) * len];
                let pf = if r0 == 0 { next } else { 0 };
                match np {
                    8 => by_rows!(rows, tile, K, [1, 2], 8, (a, p, xs, len, &mut out, r0, pf)),
                    4 => by_rows!(
                        rows,
                        tile,
                        K,
                        [1, 2, 3, 4, 5, 6],
                        4,
                        (a, p, xs, len, &mut out, r0, pf)
                    ),
                    3 => by_rows!(
                        rows,
                        tile,
                        K,
                        [1, 2, 3, 4, 5, 6, 7, 8],
                        3,
                        (a, p, xs, len, &mut out, r0, pf)
                    ),
                    2 => by_rows!(
                        rows,
                        tile,
                        K,
                        [1, 2, 3, 4, 5, 6, 7, 8],
                        2,
                        (a, p, xs, len, &mut out, r0, pf)
                    ),
                    _ => by_rows!(
                        rows,
                        tile,
                        K,
                        [1, 2, 3, 4, 5, 6, 7, 8],
                        1,
                        (a, p, xs, len, &mut out, r0, pf)
                    ),
                }
                r0 += rows;
            }
            p += np;
        }
    }

    /// `R` rows × panels `p0..p0 + P` (one register per row and panel), prefetching the
    /// `pf` panel lines (`PANEL` elements, one cache line, each) that follow the group.
    #[inline(always)]
    fn tile<K: Lanes, const R: usize, const P: usize>(
        a: &PackedMatrix,
        p0: usize,
        xs: &[K::E],
        len: usize,
        out: &mut Dst<'_>,
        r0: usize,
        pf: usize,
    ) {
        const { assert!(std::mem::size_of::<K::E>() == 4) };
        assert!(xs.len() >= R * len);
        let panels: [(&[K::E], usize, usize); P] = std::array::from_fn(|i| K::panel(a, p0 + i));
        let wp: [*const f32; P] = std::array::from_fn(|i| {
            assert!(panels[i].0.len() >= len * PANEL);
            panels[i].0.as_ptr().cast()
        });
        // The group's panels are contiguous; the next `pf` lines follow the last one (the
        // caller asks only for lines of panels that exist).
        let pf_base = wp[P - 1].wrapping_add(len * PANEL);
        // SAFETY: (every `unsafe` below) the callers run with the features `K` needs.
        let mut acc = [[unsafe { _mm512_setzero_ps() }; P]; R];
        let xp = xs.as_ptr().cast::<f32>();
        for q in 0..len {
            if q * P < pf {
                for i in 0..P.min(pf - q * P) {
                    // A prefetch is a hint: it never faults, and the line is inside the
                    // packed data (checked by the caller's count).
                    unsafe {
                        _mm_prefetch::<_MM_HINT_T0>(
                            pf_base.wrapping_add((q * P + i) * PANEL).cast(),
                        )
                    };
                }
            }
            let mut w = [unsafe { _mm512_setzero_ps() }; P];
            for (wi, &p) in w.iter_mut().zip(&wp) {
                // SAFETY: q < len, so the 16 elements at q·PANEL are inside each panel.
                *wi = unsafe { _mm512_loadu_ps(p.add(q * PANEL)) };
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: r < R and q < len, inside xs (4-byte elements read as raw lanes).
                let xb = unsafe { _mm512_set1_ps(*xp.add(r * len + q)) };
                for (acc_rp, &wi) in acc_r.iter_mut().zip(&w) {
                    *acc_rp = unsafe { K::madd(*acc_rp, xb, wi) };
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (acc_rp, &(_, col, width)) in acc_r.iter().zip(&panels) {
                // SAFETY: row r0 + r of `out` holds the columns col..col + width (checked
                // by `matmul_at`); the mask keeps the lanes inside them.
                unsafe { store(out, r0 + r, col, width, *acc_rp) };
            }
        }
    }

    /// [`super::store_row`] from a register: `width` lanes written (or added) at `out`'s
    /// row `r`, column `col` (the same additions, so the same bits).
    ///
    /// # Safety
    /// AVX-512 F.
    #[inline(always)]
    unsafe fn store(out: &mut Dst<'_>, r: usize, col: usize, width: usize, acc: __m512) {
        let start = r * out.ld + col - out.c0;
        let dst = &mut out.y[start..start + width];
        let mask: __mmask16 = if width >= PANEL {
            0xffff
        } else {
            (1u16 << width) - 1
        };
        let p = dst.as_mut_ptr();
        // SAFETY: the masked lanes are the `width` values of `dst`.
        unsafe {
            let v = if out.accumulate {
                _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), acc)
            } else {
                acc
            };
            _mm512_mask_storeu_ps(p, mask, v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use std::arch::x86_64::*;

    /// [`super::push_pairs`] with `VCVTNEPS2BF16` (the same rounding: to nearest even,
    /// subnormal inputs to zero, NaN to a quiet NaN), 16 values at a time.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn push_pairs(xr: &[f32], out: &mut Vec<u32>) {
        let start = out.len();
        out.resize(start + xr.len().div_ceil(2), 0);
        let body = xr.len() / 16 * 16;
        let dst = out[start..].as_mut_ptr().cast::<u16>();
        for i in (0..body).step_by(16) {
            // SAFETY: i + 16 <= xr.len(); the destination holds ⌈len/2⌉ u32, i.e. at least
            // len u16, past index i + 15; __m256bh and __m256i are both 32 bytes of lanes.
            unsafe {
                let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(xr.as_ptr().add(i)));
                _mm256_storeu_si256(
                    dst.add(i).cast(),
                    std::mem::transmute::<__m256bh, __m256i>(v),
                );
            }
        }
        for (i, &v) in xr.iter().enumerate().skip(body) {
            // SAFETY: i < len, inside the destination as above.
            unsafe { *dst.add(i) = super::bf16_bits(v) as u16 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The tiers this CPU can run, lowest first.
    fn tiers() -> Vec<Tier> {
        Tier::ALL
            .into_iter()
            .filter(|&t| t <= isa::detected())
            .collect()
    }

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

    /// bf16 rounding written from its definition: the nearest multiple of
    /// 2^(e - 7) (ties to the even mantissa), in f64.
    fn bf16_ref(v: f32) -> f32 {
        if v == 0.0 || v.abs() < f32::MIN_POSITIVE {
            return 0.0f32.copysign(v);
        }
        let e = (v.abs() as f64).log2().floor();
        let ulp = 2f64.powf(e - 7.0);
        let q = v as f64 / ulp;
        let (fl, fr) = (q.floor(), q - q.floor());
        let r = if fr > 0.5 || (fr == 0.5 && fl % 2.0 != 0.0) {
            fl + 1.0
        } else {
            fl
        };
        (r * ulp) as f32
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

    /// The product at `tier` and `precision` against the f64 reference (on bf16-rounded
    /// inputs for bf16); returns it.
    fn check(
        tier: Tier,
        precision: Precision,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Vec<f32> {
        let x = values(m * k, 1 + m as u64);
        let w = values(n * k, 2 + n as u64);
        let y0 = values(m * n, 3);
        let a = PackedMatrix::with_precision(&w, n, k, precision).unwrap();
        let mut y = y0.clone();
        a.matmul_at(tier, &x, &mut y, accumulate).unwrap();
        let (xr, wr): (Vec<f32>, Vec<f32>) = match precision {
            Precision::F32 => (x, w),
            Precision::Bf16 => (
                x.iter().map(|&v| bf16_ref(v)).collect(),
                w.iter().map(|&v| bf16_ref(v)).collect(),
            ),
        };
        let want = naive(&xr, &wr, m, n, k);
        let mag = naive_magnitudes(&xr, &wr, m, n, k);
        for i in 0..m * n {
            let base = if accumulate { y0[i] as f64 } else { 0.0 };
            let e = (y[i] as f64 - (want[i] + base)).abs();
            // A sum of k products and the base in f32 errs by at most γ_{k+2} times the sum
            // of the magnitudes of its terms (Higham §3.1; the products exact or fused),
            // whatever the cancellation; γ_n = n u / (1 - n u) < (n + 1) u here. The bf16
            // chains add ⌈k/2⌉ pairs, one or two products each: at most k + 1 additions.
            let u = f32::EPSILON as f64 / 2.0;
            assert!(
                e <= (k as f64 + 4.0) * u * (mag[i] + base.abs()),
                "{tier} {precision:?} m {m} n {n} k {k} [{i}]: {} vs {}",
                y[i],
                want[i] + base
            );
        }
        y
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        let one = 1.0f32;
        let ulp = 2f32.powi(-7);
        for (v, want) in [
            (one, one),
            (one + ulp / 2.0, one),             // a tie, to even (down)
            (one + ulp * 1.5, one + 2.0 * ulp), // a tie, to even (up)
            (one + ulp / 2.0 + 2f32.powi(-20), one + ulp),
            (-3.0e-39, -0.0), // subnormal: a zero of its sign
            (f32::INFINITY, f32::INFINITY),
            (f32::MAX, f32::INFINITY), // rounds past the largest bf16
        ] {
            assert_eq!(
                PackedMatrix::round_bf16(v).to_bits(),
                want.to_bits(),
                "{v:e}"
            );
        }
        assert!(PackedMatrix::round_bf16(f32::NAN).is_nan());
        for v in values(2000, 21).into_iter().map(|v| v * 1.0e5) {
            assert_eq!(PackedMatrix::round_bf16(v), bf16_ref(v), "{v:e}");
        }
    }

    /// The vector conversion of the rows (`VCVTNEPS2BF16`) gives the scalar one's bits,
    /// special values included, at every length (body of 16 and tail).
    #[test]
    fn vector_rounding_of_the_rows_matches_the_scalar_one() {
        #[cfg(target_arch = "x86_64")]
        if isa::detected() >= Tier::Avx512Bf16 {
            let mut x = values(1000, 31);
            let special = [
                0.0,
                -0.0,
                1.0e-40,
                -3.0e-39,
                f32::MIN_POSITIVE,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
                -f32::MAX,
                1.0 + 2f32.powi(-8),
                1.0 + 3.0 * 2f32.powi(-8),
            ];
            for (i, v) in special.into_iter().enumerate() {
                x[i * 7] = v;
            }
            for (i, v) in x.iter_mut().enumerate().skip(200).take(300) {
                *v *= 2f32.powi((i % 60) as i32 - 30);
            }
            x[900] = f32::NAN;
            for len in [1, 15, 16, 17, 33, 1000] {
                let (mut a, mut b) = (vec![7u32], vec![7u32]);
                push_pairs(&x[..len], &mut a);
                // SAFETY: the CPU has AVX-512 F and AVX512_BF16 (checked just above).
                unsafe { avx512bf16::push_pairs(&x[..len], &mut b) };
                assert_eq!(a, b, "len {len}");
            }
        }
    }

    #[test]
    fn every_tier_matches_a_naive_product_on_edge_shapes() {
        for tier in tiers() {
            for precision in [Precision::F32, Precision::Bf16] {
                for &(m, n, k) in &[
                    (1, 1, 1),
                    (1, 16, 8),
                    (7, 17, 5),
                    (6, 33, 64),
                    (13, 15, 3),
                    (25, 31, 9),
                    (32, 48, 256),
                ] {
                    check(tier, precision, m, n, k, false);
                    check(tier, precision, m, n, k, true);
                }
            }
        }
    }

    /// Every tier gives the same bits: the same chains in the same order (for bf16, the
    /// `VDPBF16PS` order; no partial sum is subnormal here).
    #[test]
    fn every_tier_gives_the_same_bits() {
        let all = tiers();
        for precision in [Precision::F32, Precision::Bf16] {
            for &(m, n, k, acc) in &[
                (7, 19, 9, false),
                (3, 40, 33, true),
                (13, 16, 64, false),
                (30, 50, 101, true),
                (1, 150, 40, false),
                (2, 130, 33, true),
                (5, 140, 20, false),
            ] {
                let x = values(m * k, 7);
                let a = PackedMatrix::with_precision(&values(n * k, 8), n, k, precision).unwrap();
                let y0 = values(m * n, 9);
                let mut base = y0.clone();
                a.matmul_at(Tier::Portable, &x, &mut base, acc).unwrap();
                for &t in &all {
                    let mut y = y0.clone();
                    a.matmul_at(t, &x, &mut y, acc).unwrap();
                    assert_eq!(y, base, "{t} {precision:?} m {m} n {n} k {k}");
                }
            }
        }
    }

    /// A row's result does not depend on how many rows it is batched with nor on its place
    /// (so on which tile and which tile size it falls in), at every tier and precision.
    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        // 9 and 11 panels: groups of 8, 4, 3, 2 and single panels, depending on m (a
        // last panel of 12 columns for n = 140).
        let k = 70;
        let x = values(30 * k, 10);
        for (n, precision) in [140, 170]
            .into_iter()
            .flat_map(|n| [(n, Precision::F32), (n, Precision::Bf16)])
        {
            let w = values(n * k, 9);
            let a = PackedMatrix::with_precision(&w, n, k, precision).unwrap();
            for tier in tiers() {
                let mut alone = Vec::new();
                for r in 0..30 {
                    let mut one = vec![0f32; n];
                    a.matmul_at(tier, &x[r * k..(r + 1) * k], &mut one, false)
                        .unwrap();
                    alone.push(one);
                }
                for m in [2, 5, 7, 12, 13, 25, 30] {
                    for start in [0, 30 - m] {
                        let mut all = vec![0f32; m * n];
                        a.matmul_at(tier, &x[start * k..(start + m) * k], &mut all, false)
                            .unwrap();
                        for r in 0..m {
                            assert_eq!(
                                alone[start + r],
                                all[r * n..(r + 1) * n],
                                "{tier} {precision:?} m {m} row {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn threaded_product_equals_the_serial_one() {
        let (m, n, k) = (40, 300, 256);
        let w = values(n * k, 4);
        let x = values(m * k, 5);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for precision in [Precision::F32, Precision::Bf16] {
            let a = PackedMatrix::with_precision(&w, n, k, precision).unwrap();
            for accumulate in [false, true] {
                let y0 = values(m * n, 6);
                let mut serial = y0.clone();
                let one = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                one.install(|| a.matmul(&x, &mut serial, accumulate))
                    .unwrap();
                let mut par = y0;
                pool.install(|| a.matmul(&x, &mut par, accumulate)).unwrap();
                assert_eq!(serial, par, "{precision:?} accumulate {accumulate}");
            }
        }
    }

    /// A range of panels into a buffer whose column 0 is a later output column (the
    /// threaded path's layout): every kernel, the same bits as the full product.
    #[test]
    fn a_panel_range_lands_at_its_columns() {
        let (m, n, k) = (7, 50, 33);
        let x = values(m * k, 12);
        for precision in [Precision::F32, Precision::Bf16] {
            let a = PackedMatrix::with_precision(&values(n * k, 11), n, k, precision).unwrap();
            let mut full = vec![0f32; m * n];
            a.matmul(&x, &mut full, false).unwrap();
            let mut pairs = Vec::new();
            for xr in x.chunks_exact(k) {
                push_pairs(xr, &mut pairs);
            }
            let rows = match precision {
                Precision::F32 => Rows::F32(&x),
                Precision::Bf16 => Rows::Bf16(&pairs),
            };
            let (c0, width) = (PANEL, n - PANEL);
            for tier in tiers() {
                let mut part = vec![0f32; m * width];
                a.panels_into(
                    tier,
                    rows,
                    1..n.div_ceil(PANEL),
                    dst(&mut part, width, c0, false),
                );
                for r in 0..m {
                    assert_eq!(
                        part[r * width..(r + 1) * width],
                        full[r * n + c0..(r + 1) * n],
                        "{tier} {precision:?}"
                    );
                }
            }
        }
    }

    /// bf16 storage halves the packed bytes, and its products differ from f32's (the
    /// inputs are rounded), by no more than bf16's rounding allows.
    #[test]
    fn bf16_storage_is_half_the_size_and_rounds_its_inputs() {
        let (m, n, k) = (3, 32, 64);
        let w = values(n * k, 13);
        let x = values(m * k, 14);
        let f = PackedMatrix::new(&w, n, k).unwrap();
        let b = PackedMatrix::with_precision(&w, n, k, Precision::Bf16).unwrap();
        assert_eq!((f.bytes(), b.bytes()), (n * k * 4, n * k * 2));
        assert_eq!(b.precision(), Precision::Bf16);
        let (mut yf, mut yb) = (vec![0f32; m * n], vec![0f32; m * n]);
        f.matmul(&x, &mut yf, false).unwrap();
        b.matmul(&x, &mut yb, false).unwrap();
        let mag = naive_magnitudes(&x, &w, m, n, k);
        let mut differ = 0;
        for i in 0..m * n {
            // Each product of two inputs rounded to 8 bits errs by at most 2·2⁻⁸ relative.
            assert!(((yf[i] - yb[i]) as f64).abs() <= 2.0 * 2f64.powi(-8) * mag[i] * 1.01);
            differ += usize::from(yf[i] != yb[i]);
        }
        assert!(differ > m * n / 2, "only {differ} outputs differ");
    }

    #[test]
    fn bad_shapes_are_refused() {
        for p in [Precision::F32, Precision::Bf16] {
            assert!(PackedMatrix::with_precision(&[1.0; 6], 4, 2, p).is_err());
            assert!(PackedMatrix::with_precision(&[], 0, 2, p).is_err());
            let a = PackedMatrix::with_precision(&[1.0; 6], 3, 2, p).unwrap();
            assert!(a.matmul(&[1.0; 3], &mut [0.0; 3], false).is_err());
            assert!(a.matmul(&[1.0; 4], &mut [0.0; 5], false).is_err());
            assert!(PackedMatrix::stacked_with_precision(&[&[1.0; 4], &[1.0; 3]], 2, p).is_err());
            let s = PackedMatrix::stacked_with_precision(&[&[1.0; 4], &[2.0; 2]], 2, p).unwrap();
            assert_eq!((s.n(), s.k(), s.precision()), (3, 2, p));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_shape_matches_the_naive_product(
            m in 1usize..30, n in 1usize..50, k in 1usize..40, acc in any::<bool>(),
            bf16 in any::<bool>(), t in 0usize..4,
        ) {
            let tier = Tier::ALL[t].min(isa::detected());
            let p = if bf16 { Precision::Bf16 } else { Precision::F32 };
            let y = check(tier, p, m, n, k, acc);
            let y0 = check(Tier::Portable, p, m, n, k, acc);
            prop_assert_eq!(y, y0);
        }
    }
}
