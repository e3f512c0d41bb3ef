//! Packed matrix products of the `cpu` backend's training ops, chosen by [`isa::tier`].
//!
//! `dst (+)= scale · a · b` over strided operands ([`Mat`]), single-threaded (the callers
//! split rows across rayon tasks). Three kernels share one packing scheme (GotoBLAS-style:
//! `a` packed in tiles of [`MR`] rows, `b` in panels of [`NR`] columns, `k` blocked by
//! [`KC`] and `n` by [`NC`] so that a packed block of `b` stays in L2):
//!
//! * [`Kernel::F32Avx512`]: f32 inputs, an `MR × NR = 12 × 32` tile of zmm accumulators
//!   (24 registers), one FMA per `(row, 16 columns, k)`;
//! * [`Kernel::Bf16Avx512`]: inputs rounded to bf16 (round-to-nearest-even, subnormals
//!   flushed to zero, as `VCVTNE2PS2BF16` does) while packing, stored as pairs along `k`,
//!   and accumulated in f32 with `VDPBF16PS` (each instruction adds
//!   `a[2p+1]·b[2p+1] + a[2p]·b[2p]` to 16 f32 lanes);
//! * [`Kernel::Bf16Portable`]: the same packed bf16 pairs with the same f32 arithmetic in
//!   plain Rust (the products of two bf16 values are exact in f32; each addition rounds),
//!   for CPUs without AVX512_BF16.
//!
//! The f32 products below the AVX-512 tier stay on the `gemm` crate (see `block.rs`).
//!
//! A right operand used by many products can be packed once ([`PackedB`]) and multiplied
//! with [`gemm_packed_b`], also against a leading block of its columns and depths (the
//! attention's query blocks against the keys they see).

use super::block::Mat;
use super::isa::{self, Tier};
use std::cell::RefCell;

/// Rows of a microkernel tile.
pub(crate) const MR: usize = 12;
/// Columns of a microkernel tile (two zmm registers of f32).
pub(crate) const NR: usize = 32;
/// Depth of a packed block (even, so bf16 pairs never straddle blocks).
const KC: usize = 256;
/// Columns of a packed block of `b` (a multiple of [`NR`]).
const NC: usize = 1024;

/// The numeric precision of a product's inputs (accumulation is always f32 or wider).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Prec {
    /// Inputs as they are.
    #[default]
    F32,
    /// f32 inputs rounded to bf16, products accumulated in f32. f64 inputs are not rounded.
    Bf16,
}

/// A packed-product kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// f32 with AVX-512 FMAs (needs [`Tier::Avx512`]).
    F32Avx512,
    /// bf16 inputs, f32 accumulation with `VDPBF16PS` (needs [`Tier::Avx512Bf16`]).
    Bf16Avx512,
    /// bf16 inputs, f32 accumulation, plain Rust (any CPU).
    Bf16Portable,
}

impl Kernel {
    /// Whether the kernel packs its inputs as bf16.
    pub fn is_bf16(self) -> bool {
        !matches!(self, Kernel::F32Avx512)
    }

    /// The lowest tier the kernel runs on.
    pub fn tier(self) -> Tier {
        match self {
            Kernel::F32Avx512 => Tier::Avx512,
            Kernel::Bf16Avx512 => Tier::Avx512Bf16,
            Kernel::Bf16Portable => Tier::Portable,
        }
    }

    /// The kernel for `prec` at the current tier, or `None` for an f32 product below
    /// [`Tier::Avx512`] (which the `gemm` crate computes).
    pub(crate) fn for_prec(prec: Prec) -> Option<Kernel> {
        let tier = isa::tier();
        match prec {
            Prec::F32 if tier >= Tier::Avx512 => Some(Kernel::F32Avx512),
            Prec::F32 => None,
            Prec::Bf16 if tier.has_bf16() => Some(Kernel::Bf16Avx512),
            Prec::Bf16 => {
                notice_portable_bf16();
                Some(Kernel::Bf16Portable)
            }
        }
    }
}

/// The one-line notice that bf16 products run the portable emulation.
fn notice_portable_bf16() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!(
            "mor: bf16 products run a portable emulation (CPU tier {}, no AVX512_BF16); \
             results are the same up to rounding, but slower",
            isa::tier()
        );
    });
}

/// `x` rounded to bf16 (nearest, ties to even), as its 16 bits. Subnormal inputs become a
/// signed zero and NaN stays a (quiet) NaN, as with `VCVTNE2PS2BF16`.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[inline]
pub fn bf16_value(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to bf16 and back ([`bf16_bits`]).
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16_value(bf16_bits(x))
}

thread_local! {
    static PACK: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// [`bf16_bits`] without branches (as a `u32`), so that packing loops vectorise.
#[inline(always)]
fn bf16_bits_vec(x: f32) -> u32 {
    let b = x.to_bits();
    let abs = b & 0x7fff_ffff;
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x0040;
    let zero = (b >> 16) & 0x8000;
    let r = if abs < 0x0080_0000 { zero } else { rounded };
    if abs > 0x7f80_0000 {
        nan
    } else {
        r
    }
}

/// A packing source: "rows" `x` of a strided matrix (element `(x, kk)` at
/// `data[x·sx + kk·sk]`), depths `k0 .. k0 + kc`.
#[derive(Clone, Copy)]
struct Src<'a> {
    data: &'a [f32],
    sx: usize,
    sk: usize,
    nx: usize,
    k0: usize,
    kc: usize,
}

/// Packs `src` into tiles of `w` rows: `out[(tile · kd + p) · w + i]`, zero-padded, with
/// `kd = kc` for f32 and, for bf16 (`PAIRS`), `kd = ⌈kc / 2⌉` pairs whose low half is depth
/// `2p` and high half depth `2p + 1`. Reads run along the source's contiguous direction.
#[inline(always)]
fn pack_body<const PAIRS: bool>(src: Src<'_>, w: usize, out: &mut [u32]) {
    let Src {
        data,
        sx,
        sk,
        nx,
        k0,
        kc,
    } = src;
    let cvt = |x: f32| if PAIRS { bf16_bits_vec(x) } else { x.to_bits() };
    let kd = if PAIRS { kc.div_ceil(2) } else { kc };
    let full = if PAIRS { kc / 2 } else { kc };
    if sx == 1 && sk != 1 {
        // Contiguous along x: a tile's `w` rows at one depth are one run.
        for t in 0..nx.div_ceil(w) {
            let (x0, wv) = (t * w, w.min(nx - t * w));
            let tile = &mut out[t * kd * w..(t + 1) * kd * w];
            for (p, o) in tile.chunks_exact_mut(w).enumerate().take(full) {
                let o = &mut o[..wv];
                if PAIRS {
                    let lo = &data[x0 + (k0 + 2 * p) * sk..][..wv];
                    let hi = &data[x0 + (k0 + 2 * p + 1) * sk..][..wv];
                    for ((o, &l), &h) in o.iter_mut().zip(lo).zip(hi) {
                        *o = cvt(l) | (cvt(h) << 16);
                    }
                } else {
                    let r = &data[x0 + (k0 + p) * sk..][..wv];
                    for (o, &v) in o.iter_mut().zip(r) {
                        *o = cvt(v);
                    }
                }
            }
            if PAIRS && kc % 2 == 1 {
                let lo = &data[x0 + (k0 + kc - 1) * sk..][..wv];
                for (o, &l) in tile[(kd - 1) * w..][..wv].iter_mut().zip(lo) {
                    *o = cvt(l);
                }
            }
        }
    } else if !PAIRS && sk == 1 {
        // f32, contiguous along the depth: `w` rows read side by side, written in the packed
        // (depth-major) order one depth at a time.
        for t in 0..nx.div_ceil(w) {
            let (x0, wv) = (t * w, w.min(nx - t * w));
            let rows: Vec<&[f32]> = (0..wv).map(|i| &data[(x0 + i) * sx + k0..][..kc]).collect();
            let tile = &mut out[t * kd * w..(t + 1) * kd * w];
            for (p, o) in tile.chunks_exact_mut(w).enumerate() {
                for (o, r) in o.iter_mut().zip(&rows) {
                    *o = r[p].to_bits();
                }
            }
        }
    } else if PAIRS && sk == 1 {
        // Contiguous along the depth: each row of a tile is rounded into `tmp` as a run of
        // bf16 values (vectorised), which read as `u32` are its pairs; the tile is then
        // transposed into the packed order.
        let kp = kd;
        let mut tmp = vec![0u16; w * 2 * kp];
        for t in 0..nx.div_ceil(w) {
            let (x0, wv) = (t * w, w.min(nx - t * w));
            for i in 0..wv {
                let row = &data[(x0 + i) * sx + k0..][..kc];
                let dst = &mut tmp[i * 2 * kp..(i + 1) * 2 * kp];
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d = bf16_bits_vec(v) as u16;
                }
                if kc % 2 == 1 {
                    dst[kc] = 0;
                }
            }
            let tile = &mut out[t * kd * w..(t + 1) * kd * w];
            for (p, o) in tile.chunks_exact_mut(w).enumerate() {
                for (i, o) in o[..wv].iter_mut().enumerate() {
                    let j = i * 2 * kp + 2 * p;
                    *o = tmp[j] as u32 | ((tmp[j + 1] as u32) << 16);
                }
            }
        }
    } else {
        // Contiguous along the depth (or neither): one source row at a time.
        for x in 0..nx {
            let (t, i) = (x / w, x % w);
            let base = x * sx + k0 * sk;
            let o = out[t * kd * w + i..].iter_mut().step_by(w);
            if PAIRS {
                if sk == 1 {
                    let row = &data[base..base + kc];
                    for (o, pair) in o.zip(row.chunks_exact(2)) {
                        *o = cvt(pair[0]) | (cvt(pair[1]) << 16);
                    }
                } else {
                    for (p, o) in o.take(full).enumerate() {
                        *o = cvt(data[base + 2 * p * sk])
                            | (cvt(data[base + (2 * p + 1) * sk]) << 16);
                    }
                }
                if kc % 2 == 1 {
                    out[(t * kd + kd - 1) * w + i] = cvt(data[base + (kc - 1) * sk]);
                }
            } else if sk == 1 {
                for (o, &v) in o.zip(&data[base..base + kc]) {
                    *o = cvt(v);
                }
            } else {
                for (p, o) in o.take(kc).enumerate() {
                    *o = cvt(data[base + p * sk]);
                }
            }
        }
    }
}

/// [`pack_body`] compiled for AVX-512 (wider vectors for the conversion loops).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, DQ, VL, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn pack_avx512<const PAIRS: bool>(src: Src<'_>, w: usize, out: &mut [u32]) {
    pack_body::<PAIRS>(src, w, out)
}

/// Packs `src` (see [`pack_body`]) into `out`, resized to whole tiles.
fn pack<const PAIRS: bool>(src: Src<'_>, w: usize, out: &mut Vec<u32>) {
    let kd = if PAIRS { src.kc.div_ceil(2) } else { src.kc };
    out.clear();
    out.resize(src.nx.div_ceil(w) * kd * w, 0);
    #[cfg(target_arch = "x86_64")]
    if isa::detected() >= Tier::Avx512 {
        // SAFETY: the CPU has AVX-512 (checked).
        unsafe { pack_avx512::<PAIRS>(src, w, out) };
        return;
    }
    pack_body::<PAIRS>(src, w, out)
}

/// The destination of one tile: `rows × cols` at `ptr`, rows `rs` apart.
struct Tile {
    ptr: *mut f32,
    rs: usize,
    rows: usize,
    cols: usize,
    add: bool,
    scale: f32,
}

/// `dst (+)= scale · a · b` for `a: m × k`, `b: k × n`, on the calling thread.
///
/// # Safety
/// `a` and `b` must hold every element of their views, `dst` must be valid for reads and
/// writes of `m` rows of `n` elements spaced `dst_rs >= n` apart, and must not alias the
/// operands; `kernel.tier() <= isa::detected()`.
pub(crate) unsafe fn gemm(
    kernel: Kernel,
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    a: Mat<'_, f32>,
    b: Mat<'_, f32>,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                // SAFETY: row `r` of `dst` is valid for `n` writes (caller's contract).
                unsafe { std::ptr::write_bytes(dst.add(r * dst_rs), 0, n) };
            }
        }
        return;
    }
    PACK.with_borrow_mut(|(ap, bp)| {
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let add = accumulate || k0 > 0;
            let asrc = Src {
                data: a.data,
                sx: a.rs,
                sk: a.cs,
                nx: m,
                k0,
                kc,
            };
            if kernel.is_bf16() {
                pack::<true>(asrc, MR, ap);
            } else {
                pack::<false>(asrc, MR, ap);
            }
            for n0 in (0..n).step_by(NC) {
                let nc = NC.min(n - n0);
                let bsub = &b.data[n0 * b.cs..];
                let bsrc = Src {
                    data: bsub,
                    sx: b.cs,
                    sk: b.rs,
                    nx: nc,
                    k0,
                    kc,
                };
                if kernel.is_bf16() {
                    pack::<true>(bsrc, NR, bp);
                } else {
                    pack::<false>(bsrc, NR, bp);
                }
                let kd = if kernel.is_bf16() { kc.div_ceil(2) } else { kc };
                for t in 0..m.div_ceil(MR) {
                    for j in 0..nc.div_ceil(NR) {
                        let tile = Tile {
                            // SAFETY: in bounds of `dst` (row `t·MR < m`, column `n0 + j·NR < n`).
                            ptr: unsafe { dst.add(t * MR * dst_rs + n0 + j * NR) },
                            rs: dst_rs,
                            rows: MR.min(m - t * MR),
                            cols: NR.min(nc - j * NR),
                            add,
                            scale,
                        };
                        let (ao, bo) = (t * kd * MR, j * kd * NR);
                        // SAFETY: the packed tiles hold `kd · MR` and `kd · NR` elements from
                        // `ao` and `bo`; the tile's rows and columns lie inside `dst`; the
                        // kernel's tier is available (caller's contract).
                        unsafe { run_tile(kernel, kd, &ap[ao..], &bp[bo..], &tile) };
                    }
                }
            }
        }
    });
}

/// One microkernel tile of `kernel` over `kd` packed depths (or pairs).
///
/// # Safety
/// `a`, `b` hold `kd · MR`, `kd · NR` packed elements; the tile is valid memory;
/// `kernel.tier() <= isa::detected()`.
#[inline(always)]
unsafe fn run_tile(kernel: Kernel, kd: usize, a: &[u32], b: &[u32], tile: &Tile) {
    // SAFETY: caller's contract.
    unsafe {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::F32Avx512 => x86::f32_tile(kd, a, b, tile),
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16Avx512 => x86::bf16_tile(kd, a, b, tile),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::F32Avx512 | Kernel::Bf16Avx512 => {
                unreachable!("AVX-512 kernels exist on x86_64 only")
            }
            Kernel::Bf16Portable => bf16_tile_portable(kd, a, b, tile),
        }
    }
}

/// The right operand `b: k × n` of a product, packed once for `kernel` so that several
/// products against a leading block of it (the first `n' <= n` columns and the first
/// `k' <= k` depths) reuse the packing: panels of [`NR`] columns per depth block of [`KC`],
/// each panel holding the block's full depth, so a shorter depth reads a prefix of it.
#[derive(Debug)]
pub(crate) struct PackedB {
    kernel: Kernel,
    k: usize,
    n: usize,
    data: Vec<u32>,
}

impl PackedB {
    /// Packs `b: k × n` for `kernel`.
    ///
    /// # Errors
    /// When `b` does not hold every element of its `k × n` view.
    pub(crate) fn new(kernel: Kernel, b: Mat<'_, f32>, k: usize, n: usize) -> Result<Self, String> {
        if !b.fits(k, n) {
            return Err(format!("packed operand too short for {k}×{n}"));
        }
        let mut data = Vec::new();
        let mut part = Vec::new();
        if n > 0 {
            for k0 in (0..k).step_by(KC) {
                let src = Src {
                    data: b.data,
                    sx: b.cs,
                    sk: b.rs,
                    nx: n,
                    k0,
                    kc: KC.min(k - k0),
                };
                if kernel.is_bf16() {
                    pack::<true>(src, NR, &mut part);
                } else {
                    pack::<false>(src, NR, &mut part);
                }
                data.extend_from_slice(&part);
            }
        }
        Ok(PackedB { kernel, k, n, data })
    }

    /// The kernel the operand is packed for.
    pub(crate) fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Depth of the packed operand.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Columns of the packed operand.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Packed depths (or pairs) of the depth block starting at `k0`.
    fn kd(&self, k0: usize) -> usize {
        let kc = KC.min(self.k - k0);
        if self.kernel.is_bf16() {
            kc.div_ceil(2)
        } else {
            kc
        }
    }
}

/// `dst (+)= scale · a · b[..k, ..n]` on the calling thread, with `b` packed by
/// [`PackedB::new`]. Equal, bit for bit, to [`gemm`] on the same operands: the tile sums
/// run over the same depths in the same order (the zero padding of `a` past depth `k`
/// meets packed values of `b` instead of zeros, which adds exact zeros for finite `b`).
///
/// # Safety
/// `a` must hold every element of its `m × k` view, `dst` must be valid for reads and
/// writes of `m` rows of `n` elements spaced `dst_rs >= n` apart and must not alias `a`;
/// `k <= b.k`, `n <= b.n`; `b.kernel.tier() <= isa::detected()`.
pub(crate) unsafe fn gemm_packed_b(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    a: Mat<'_, f32>,
    b: &PackedB,
    scale: f32,
) {
    debug_assert!(k <= b.k && n <= b.n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                // SAFETY: row `r` of `dst` is valid for `n` writes (caller's contract).
                unsafe { std::ptr::write_bytes(dst.add(r * dst_rs), 0, n) };
            }
        }
        return;
    }
    let kernel = b.kernel;
    let panels = b.n.div_ceil(NR);
    PACK.with_borrow_mut(|(ap, _)| {
        let mut block_off = 0;
        for k0 in (0..b.k).step_by(KC) {
            let kd_full = b.kd(k0);
            if k0 < k {
                let kc = KC.min(k - k0);
                let asrc = Src {
                    data: a.data,
                    sx: a.rs,
                    sk: a.cs,
                    nx: m,
                    k0,
                    kc,
                };
                let kd = if kernel.is_bf16() {
                    pack::<true>(asrc, MR, ap);
                    kc.div_ceil(2)
                } else {
                    pack::<false>(asrc, MR, ap);
                    kc
                };
                let add = accumulate || k0 > 0;
                for j in 0..n.div_ceil(NR) {
                    let bo = block_off + j * kd_full * NR;
                    for t in 0..m.div_ceil(MR) {
                        let tile = Tile {
                            // SAFETY: in bounds of `dst` (row `t·MR < m`, column `j·NR < n`).
                            ptr: unsafe { dst.add(t * MR * dst_rs + j * NR) },
                            rs: dst_rs,
                            rows: MR.min(m - t * MR),
                            cols: NR.min(n - j * NR),
                            add,
                            scale,
                        };
                        // SAFETY: the packed tile of `a` holds `kd · MR` elements from
                        // `t·kd·MR`; panel `j` of the block holds `kd_full >= kd` rows of
                        // `NR`; the tile lies inside `dst`; the tier is available.
                        unsafe { run_tile(kernel, kd, &ap[t * kd * MR..], &b.data[bo..], &tile) };
                    }
                }
            }
            block_off += panels * kd_full * NR;
        }
    });
}

/// Writes an `MR × NR` accumulator tile into `tile` (`dst (+)= scale · acc`).
///
/// # Safety
/// `tile` must describe valid, writable memory.
unsafe fn store_tile(acc: &[f32; MR * NR], tile: &Tile) {
    for i in 0..tile.rows {
        // SAFETY: row `i < rows` of the tile holds `cols` elements (caller's contract).
        let row = unsafe { std::slice::from_raw_parts_mut(tile.ptr.add(i * tile.rs), tile.cols) };
        let src = &acc[i * NR..i * NR + tile.cols];
        if tile.add {
            for (d, &s) in row.iter_mut().zip(src) {
                *d += tile.scale * s;
            }
        } else {
            for (d, &s) in row.iter_mut().zip(src) {
                *d = tile.scale * s;
            }
        }
    }
}

/// The portable bf16 tile: `acc += a[2p+1]·b[2p+1]`, then `+= a[2p]·b[2p]`, in f32 (the
/// order `VDPBF16PS` documents).
///
/// # Safety
/// As [`store_tile`]; `a` and `b` hold `kp · MR` and `kp · NR` pairs.
unsafe fn bf16_tile_portable(kp: usize, a: &[u32], b: &[u32], tile: &Tile) {
    let mut acc = [0f32; MR * NR];
    let (a, b) = (&a[..kp * MR], &b[..kp * NR]);
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        let mut b0 = [0f32; NR];
        let mut b1 = [0f32; NR];
        for c in 0..NR {
            b0[c] = bf16_value(bp[c] as u16);
            b1[c] = bf16_value((bp[c] >> 16) as u16);
        }
        for (i, &av) in ap.iter().enumerate() {
            let (a0, a1) = (bf16_value(av as u16), bf16_value((av >> 16) as u16));
            let row = &mut acc[i * NR..(i + 1) * NR];
            for c in 0..NR {
                row[c] = (row[c] + a1 * b1[c]) + a0 * b0[c];
            }
        }
    }
    // SAFETY: caller's contract.
    unsafe { store_tile(&acc, tile) };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, MR, NR};
    use std::arch::x86_64::*;

    /// Adds (or writes) `scale · c` into the tile, masked to its columns.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(c: &[__m512; 2 * MR], tile: &Tile) {
        let m0: __mmask16 = if tile.cols >= 16 {
            0xffff
        } else {
            (1u16 << tile.cols) - 1
        };
        let m1: __mmask16 = if tile.cols >= NR {
            0xffff
        } else if tile.cols > 16 {
            (1u16 << (tile.cols - 16)) - 1
        } else {
            0
        };
        let s = _mm512_set1_ps(tile.scale);
        for i in 0..MR {
            if i < tile.rows {
                // SAFETY: row `i` of the tile is valid for `cols` elements; the masks keep
                // every access inside them.
                unsafe {
                    let p = tile.ptr.add(i * tile.rs);
                    let (mut v0, mut v1) =
                        (_mm512_mul_ps(c[2 * i], s), _mm512_mul_ps(c[2 * i + 1], s));
                    if tile.add {
                        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p));
                        v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p.add(16)));
                    }
                    _mm512_mask_storeu_ps(p, m0, v0);
                    _mm512_mask_storeu_ps(p.add(16), m1, v1);
                }
            }
        }
    }

    /// The f32 `MR × NR` tile over `kc` packed depths (f32 bits).
    ///
    /// # Safety
    /// AVX-512 F must be available; `a`, `b` hold `kc · MR`, `kc · NR` elements; the tile
    /// is valid memory.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn f32_tile(kc: usize, a: &[u32], b: &[u32], tile: &Tile) {
        let (a, b) = (&a[..kc * MR], &b[..kc * NR]);
        let mut c = [_mm512_setzero_ps(); 2 * MR];
        // The packed f32 values are stored as their bits.
        let (pa, pb) = (a.as_ptr().cast::<f32>(), b.as_ptr().cast::<f32>());
        for p in 0..kc {
            // SAFETY: `p < kc`, so the loads stay inside `a` and `b` (checked by the slicing).
            unsafe {
                let b0 = _mm512_loadu_ps(pb.add(p * NR));
                let b1 = _mm512_loadu_ps(pb.add(p * NR + 16));
                for i in 0..MR {
                    let av = _mm512_set1_ps(*pa.add(p * MR + i));
                    c[2 * i] = _mm512_fmadd_ps(av, b0, c[2 * i]);
                    c[2 * i + 1] = _mm512_fmadd_ps(av, b1, c[2 * i + 1]);
                }
            }
        }
        // SAFETY: caller's contract.
        unsafe { store(&c, tile) };
    }

    /// The bf16 `MR × NR` tile over `kp` packed pairs, with `VDPBF16PS`.
    ///
    /// # Safety
    /// AVX-512 F and BF16 must be available; `a`, `b` hold `kp · MR`, `kp · NR` pairs; the
    /// tile is valid memory.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn bf16_tile(kp: usize, a: &[u32], b: &[u32], tile: &Tile) {
        let (a, b) = (&a[..kp * MR], &b[..kp * NR]);
        let mut c = [_mm512_setzero_ps(); 2 * MR];
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        for p in 0..kp {
            // SAFETY: `p < kp`, so the loads stay inside `a` and `b` (checked by the slicing);
            // `__m512i` and `__m512bh` are both 64 plain bytes.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(pb.add(p * NR).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(pb.add(p * NR + 16).cast()));
                for i in 0..MR {
                    let av: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*pa.add(p * MR + i) as i32));
                    c[2 * i] = _mm512_dpbf16_ps(c[2 * i], av, b0);
                    c[2 * i + 1] = _mm512_dpbf16_ps(c[2 * i + 1], av, b1);
                }
            }
        }
        // SAFETY: caller's contract.
        unsafe { store(&c, tile) };
    }
}

impl Kernel {
    /// Every kernel, lowest tier first.
    pub const ALL: [Kernel; 3] = [Kernel::Bf16Portable, Kernel::F32Avx512, Kernel::Bf16Avx512];

    /// The kernels this CPU can run ([`isa::detected`], ignoring `MOR_CPU_TIER`).
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.tier() <= isa::detected())
            .collect()
    }
}

/// `dst (+)= scale · a · b` on the calling thread with the given kernel, for tests and
/// benches. Operands are `(data, row stride, column stride)`; `dst` is row-major with row
/// stride `dst_rs`; `accumulate` adds to `dst` instead of overwriting it.
///
/// # Errors
/// When the CPU lacks the kernel's instructions, or an operand or `dst` is too short.
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    kernel: Kernel,
    (m, n, k): (usize, usize, usize),
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    (dst, dst_rs): (&mut [f32], usize),
    accumulate: bool,
    scale: f32,
) -> Result<(), String> {
    if kernel.tier() > isa::detected() {
        return Err(format!(
            "kernel {kernel:?} needs CPU tier {}, this CPU has {}",
            kernel.tier(),
            isa::detected()
        ));
    }
    let (a, b) = (
        Mat {
            data: a.0,
            rs: a.1,
            cs: a.2,
        },
        Mat {
            data: b.0,
            rs: b.1,
            cs: b.2,
        },
    );
    let dst_fits = m == 0
        || n == 0
        || (dst_rs >= n
            && (m - 1)
                .checked_mul(dst_rs)
                .and_then(|x| x.checked_add(n))
                .is_some_and(|e| e <= dst.len()));
    if !(a.fits(m, k) && b.fits(k, n) && dst_fits) {
        return Err(format!("operands too short for {m}×{k} · {k}×{n}"));
    }
    // SAFETY: bounds checked above; `dst` is borrowed mutably, so it aliases neither
    // operand; the kernel's tier is available.
    unsafe {
        gemm(
            kernel,
            (m, n, k),
            (dst.as_mut_ptr(), dst_rs),
            accumulate,
            a,
            b,
            scale,
        )
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A product against a leading block of a prepacked operand (fewer columns, fewer
    /// depths, odd depths, several depth blocks) equals, bit for bit, the product that
    /// packs that block itself, for every kernel this CPU runs.
    #[test]
    fn prepacked_operand_equals_packing_per_product() {
        let (kb, nb) = (KC + 45, 70);
        let val = |i: usize, s: usize| ((i * s + 7) % 23) as f32 / 11.0 - 1.0 + i as f32 * 1e-4;
        let bdata: Vec<f32> = (0..kb * nb).map(|i| val(i, 5)).collect();
        for kernel in Kernel::available() {
            for (b, what) in [
                (Mat::rows(&bdata, nb), "rows"),
                (Mat::rows_t(&bdata, kb), "transposed"),
            ] {
                let pb = PackedB::new(kernel, b, kb, nb).unwrap();
                for (m, n, k) in [
                    (13, 70, kb),
                    (5, 33, 63),
                    (25, 1, KC),
                    (12, 32, KC + 1),
                    (3, 64, 1),
                ] {
                    let adata: Vec<f32> = (0..m * k).map(|i| val(i, 3)).collect();
                    let a = Mat::rows(&adata, k);
                    let mut want = vec![0.5f32; m * n];
                    let mut got = want.clone();
                    for accumulate in [false, true] {
                        // SAFETY: the operands hold their views; `dst` is `m × n`; the kernel
                        // is available.
                        unsafe {
                            gemm(
                                kernel,
                                (m, n, k),
                                (want.as_mut_ptr(), n),
                                accumulate,
                                a,
                                b,
                                0.75,
                            );
                            gemm_packed_b(
                                (m, n, k),
                                (got.as_mut_ptr(), n),
                                accumulate,
                                a,
                                &pb,
                                0.75,
                            );
                        }
                        let (wb, gb): (Vec<u32>, Vec<u32>) = (
                            want.iter().map(|x| x.to_bits()).collect(),
                            got.iter().map(|x| x.to_bits()).collect(),
                        );
                        assert_eq!(wb, gb, "{kernel:?} {what} {m}x{n}x{k} acc {accumulate}");
                    }
                }
            }
        }
    }

    /// The branch-free rounding of the packing loops equals [`bf16_bits`] on every class of
    /// input: a sweep of bit patterns (normals, subnormals, infinities, NaNs, both signs).
    #[test]
    fn branch_free_rounding_matches_the_scalar_one() {
        let specials = [
            0u32,
            0x8000_0000,
            0x0000_0001,
            0x007f_ffff,
            0x0080_0000,
            0x7f7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001,
            0xffff_ffff,
            0x3f80_8000,
            0x3f81_8000,
        ];
        for b in specials.into_iter().chain((0..=u32::MAX).step_by(65_521)) {
            let x = f32::from_bits(b);
            assert_eq!(bf16_bits_vec(x), bf16_bits(x) as u32, "bits {b:#010x}");
        }
    }
}
