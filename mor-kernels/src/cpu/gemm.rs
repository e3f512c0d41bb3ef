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

/// An element type the packing reads: f32, rounded to bf16 for the bf16 kernels, or
/// `u16`, the bits of values already rounded to bf16 (which only the bf16 kernels read:
/// their packing is then a copy, the same pairs as packing the f32 values they came from).
pub(crate) trait PackElem: Copy + Send + Sync + 'static {
    /// Whether the elements are bf16 bits.
    const BF16: bool;

    /// The packed bits of one value: its bf16 bits in the low half (`PAIRS`), or its f32
    /// bits.
    fn bits<const PAIRS: bool>(self) -> u32;

    /// Converts a contiguous run of depths into packed elements (see [`convert_run`]).
    fn run<const PAIRS: bool, const HW: bool>(src: &[Self], dst: &mut [u32]);
}

impl PackElem for f32 {
    const BF16: bool = false;

    #[inline(always)]
    fn bits<const PAIRS: bool>(self) -> u32 {
        if PAIRS {
            bf16_bits_vec(self)
        } else {
            self.to_bits()
        }
    }

    #[inline(always)]
    fn run<const PAIRS: bool, const HW: bool>(src: &[f32], dst: &mut [u32]) {
        convert_run::<PAIRS, HW>(src, dst)
    }
}

impl PackElem for u16 {
    const BF16: bool = true;

    #[inline(always)]
    fn bits<const PAIRS: bool>(self) -> u32 {
        debug_assert!(PAIRS, "bf16 bits are packed as pairs only");
        self as u32
    }

    #[inline(always)]
    fn run<const PAIRS: bool, const HW: bool>(src: &[u16], dst: &mut [u32]) {
        debug_assert!(PAIRS, "bf16 bits are packed as pairs only");
        let full = src.len() / 2;
        #[cfg(target_endian = "little")]
        {
            assert!(dst.len() >= full);
            // SAFETY: a pair read as a `u32` is its low (even) depth then its high one, so
            // the run's first `2·full` values are the pairs' bytes; `dst` holds `full`
            // pairs (checked) and does not overlap `src` (one is borrowed mutably).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr().cast::<u8>(),
                    dst.as_mut_ptr().cast::<u8>(),
                    4 * full,
                )
            };
        }
        #[cfg(not(target_endian = "little"))]
        for (o, pair) in dst[..full].iter_mut().zip(src.chunks_exact(2)) {
            *o = pair[0] as u32 | (pair[1] as u32) << 16;
        }
        if src.len() % 2 == 1 {
            dst[full] = src[src.len() - 1] as u32;
        }
    }
}

/// Rounds `src` to bf16 into `dst` (their bits, as [`bf16_bits`]): with `VCVTNEPS2BF16`
/// at the AVX512_BF16 tier, else a loop the compiler vectorises. What an op writes when its
/// output feeds only bf16 products (see [`PackElem`]).
///
/// # Panics
/// When the lengths differ.
pub(crate) fn round_into_bf16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "round_into_bf16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        let tier = isa::tier();
        if tier.has_bf16() {
            // SAFETY: the tier is at most the CPU's, which has AVX512_BF16 and AVX-512.
            unsafe { x86::round_halves(src, dst) };
            return;
        }
        if tier >= Tier::Avx512 {
            // SAFETY: the tier is at most the CPU's, which has AVX-512.
            unsafe { round_halves_avx512(src, dst) };
            return;
        }
    }
    round_halves(src, dst)
}

/// [`round_into_bf16`] in plain Rust.
#[inline(always)]
fn round_halves(src: &[f32], dst: &mut [u16]) {
    for (h, &v) in dst.iter_mut().zip(src) {
        *h = bf16_bits_vec(v) as u16;
    }
}

/// [`round_halves`] compiled for AVX-512.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, DQ, VL, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn round_halves_avx512(src: &[f32], dst: &mut [u16]) {
    round_halves(src, dst)
}

/// A packing source: "rows" `x` of a strided matrix (element `(x, kk)` at
/// `data[x·sx + kk·sk]`), depths `k0 .. k0 + kc`.
#[derive(Clone, Copy)]
struct Src<'a, E> {
    data: &'a [E],
    sx: usize,
    sk: usize,
    nx: usize,
    k0: usize,
    kc: usize,
}

/// How the packed tiles of an operand are laid out. Both hold, per tile of `w` rows (or
/// columns) and depth (or bf16 pair) `p`, the row's value at that depth; the kernels read
/// `a` in either layout and `b` in [`Layout::Depths`] only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `tile[p · w + i]`: the `w` values of one depth side by side, `kd · w` per tile (what
    /// a source contiguous along `x` packs into with straight copies).
    Depths,
    /// `tile[i · rs + p]`: each row's depths contiguous, rows [`Layout::row_stride`] apart
    /// and `w · rs` per tile (what a source contiguous along the depth packs into with
    /// straight conversions, no transposition).
    Rows,
}

impl Layout {
    /// Row stride of a [`Layout::Rows`] tile: the packed length of a full depth block, so
    /// that the kernels address it with constant offsets.
    const fn row_stride(pairs: bool) -> usize {
        if pairs {
            KC / 2
        } else {
            KC
        }
    }

    /// Packed elements per tile of `w` rows over `kd` packed depths.
    fn tile_len(self, pairs: bool, w: usize, kd: usize) -> usize {
        match self {
            Layout::Depths => kd * w,
            Layout::Rows => w * Layout::row_stride(pairs),
        }
    }
}

/// Packed depths (pairs for bf16) of `kc` depths.
fn packed_depth(pairs: bool, kc: usize) -> usize {
    if pairs {
        kc.div_ceil(2)
    } else {
        kc
    }
}

/// Converts a contiguous run of depths into packed elements: bf16 pairs (`PAIRS`; low half
/// the even depth, an odd run's last pair with a zero high half) or f32 bits. With `HW`, the
/// pairs come from `VCVTNE2PS2BF16`, which rounds exactly as [`bf16_bits`].
#[inline(always)]
fn convert_run<const PAIRS: bool, const HW: bool>(src: &[f32], dst: &mut [u32]) {
    if !PAIRS {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = v.to_bits();
        }
        return;
    }
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if HW {
        // SAFETY: `HW` is only set by callers that checked AVX512_BF16 (`pack_avx512bf16`).
        done = unsafe { x86::convert_pairs(src, dst) };
    }
    let (src, dst) = (&src[done..], &mut dst[done / 2..]);
    let full = src.len() / 2;
    #[cfg(target_endian = "little")]
    {
        // A pair read as a `u32` is its low (even) depth then its high one, so the run
        // converts value by value into the pairs' 16-bit halves (vectorised).
        // SAFETY: `dst[..full]` is `2·full` initialised, aligned `u16`s of its own memory.
        let halves =
            unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u16>(), 2 * full) };
        for (h, &v) in halves.iter_mut().zip(&src[..2 * full]) {
            *h = bf16_bits_vec(v) as u16;
        }
    }
    #[cfg(not(target_endian = "little"))]
    for (o, pair) in dst[..full].iter_mut().zip(src.chunks_exact(2)) {
        *o = bf16_bits_vec(pair[0]) | (bf16_bits_vec(pair[1]) << 16);
    }
    if src.len() % 2 == 1 {
        dst[full] = bf16_bits_vec(src[src.len() - 1]);
    }
}

/// Packs `src` into tiles of `w` rows in `layout` (see [`Layout`]), with `kd = kc` packed
/// depths for f32 and, for bf16 (`PAIRS`), `kd = ⌈kc / 2⌉` pairs whose low half is depth
/// `2p` and high half depth `2p + 1`. Rows of the last tile past `nx` are zero. Reads run
/// along the source's contiguous direction; [`Layout::Rows`] needs `sk == 1`.
#[inline(always)]
fn pack_body<E: PackElem, const PAIRS: bool, const HW: bool>(
    src: Src<'_, E>,
    w: usize,
    layout: Layout,
    out: &mut [u32],
) {
    let Src {
        data,
        sx,
        sk,
        nx,
        k0,
        kc,
    } = src;
    let cvt = |x: E| x.bits::<PAIRS>();
    let kd = packed_depth(PAIRS, kc);
    let full = if PAIRS { kc / 2 } else { kc };
    let tiles = nx.div_ceil(w);
    let tile_len = layout.tile_len(PAIRS, w, kd);
    if layout == Layout::Rows {
        debug_assert_eq!(sk, 1);
        let rs = Layout::row_stride(PAIRS);
        for x in 0..nx {
            let o = &mut out[(x / w) * tile_len + (x % w) * rs..][..kd];
            E::run::<PAIRS, HW>(&data[x * sx + k0..][..kc], o);
        }
        for i in nx % w..if nx % w == 0 { 0 } else { w } {
            out[(tiles - 1) * tile_len + i * rs..][..kd].fill(0);
        }
        return;
    }
    if sx == 1 && sk != 1 {
        // Contiguous along x: one depth (or pair of depths) at a time over every row,
        // converted into `line` and copied into the tiles in runs of `w`.
        let mut line = vec![0u32; tiles * w];
        for p in 0..kd {
            if PAIRS && p == full {
                // The odd last depth: a pair with a zero high half.
                let lo = &data[(k0 + kc - 1) * sk..][..nx];
                for (o, &l) in line.iter_mut().zip(lo) {
                    *o = cvt(l);
                }
            } else if PAIRS {
                let lo = &data[(k0 + 2 * p) * sk..][..nx];
                let hi = &data[(k0 + 2 * p + 1) * sk..][..nx];
                for ((o, &l), &h) in line.iter_mut().zip(lo).zip(hi) {
                    *o = cvt(l) | (cvt(h) << 16);
                }
            } else {
                for (o, &v) in line.iter_mut().zip(&data[(k0 + p) * sk..][..nx]) {
                    *o = cvt(v);
                }
            }
            // Runs of a length known here are copied inline (a `memcpy` call per run of 12
            // or 32 values costs more than the copy).
            fn spread<const W: usize>(
                line: &[u32],
                out: &mut [u32],
                (tile_len, p): (usize, usize),
            ) {
                for (t, run) in line.chunks_exact(W).enumerate() {
                    let dst: &mut [u32; W] =
                        (&mut out[t * tile_len + p * W..][..W]).try_into().unwrap();
                    *dst = run.try_into().unwrap();
                }
            }
            match w {
                MR => spread::<MR>(&line, out, (tile_len, p)),
                NR => spread::<NR>(&line, out, (tile_len, p)),
                _ => {
                    for (t, run) in line.chunks_exact(w).enumerate() {
                        out[t * tile_len + p * w..][..w].copy_from_slice(run);
                    }
                }
            }
        }
    } else {
        // Contiguous along the depth (or neither): one source row at a time, converted into
        // `row` and spread over the tile's depths.
        let mut row = vec![0u32; kd];
        for x in 0..nx {
            let (t, i) = (x / w, x % w);
            let base = x * sx + k0 * sk;
            if sk == 1 {
                E::run::<PAIRS, HW>(&data[base..base + kc], &mut row);
            } else {
                for (p, o) in row.iter_mut().enumerate().take(full) {
                    *o = if PAIRS {
                        cvt(data[base + 2 * p * sk]) | (cvt(data[base + (2 * p + 1) * sk]) << 16)
                    } else {
                        cvt(data[base + p * sk])
                    };
                }
                if PAIRS && kc % 2 == 1 {
                    row[kd - 1] = cvt(data[base + (kc - 1) * sk]);
                }
            }
            let tile = &mut out[t * tile_len..][..tile_len];
            for (o, &v) in tile[i..].iter_mut().step_by(w).zip(&row) {
                *o = v;
            }
        }
        for i in nx % w..if nx % w == 0 { 0 } else { w } {
            let tile = &mut out[(tiles - 1) * tile_len..][..tile_len];
            for o in tile[i..].iter_mut().step_by(w) {
                *o = 0;
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
unsafe fn pack_avx512<E: PackElem, const PAIRS: bool>(
    src: Src<'_, E>,
    w: usize,
    layout: Layout,
    out: &mut [u32],
) {
    pack_body::<E, PAIRS, false>(src, w, layout, out)
}

/// [`pack_body`] with the bf16 runs converted by `VCVTNE2PS2BF16`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, DQ, VL, BF16, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn pack_avx512bf16<E: PackElem>(src: Src<'_, E>, w: usize, layout: Layout, out: &mut [u32]) {
    pack_body::<E, true, true>(src, w, layout, out)
}

/// Packs `src` (see [`pack_body`]) into `out`, resized to whole tiles. The code used follows
/// [`isa::tier`] (so `MOR_CPU_TIER` also lowers the packing); every variant packs the same
/// bits.
fn pack<E: PackElem, const PAIRS: bool>(
    src: Src<'_, E>,
    w: usize,
    layout: Layout,
    out: &mut Vec<u32>,
) {
    assert!(
        PAIRS || !E::BF16,
        "bf16 operands are packed for bf16 kernels only"
    );
    let kd = packed_depth(PAIRS, src.kc);
    let len = src.nx.div_ceil(w) * layout.tile_len(PAIRS, w, kd);
    // Every element a kernel reads is written below; resizing keeps the old contents, so
    // a buffer of the same size is not cleared first.
    out.resize(len, 0);
    #[cfg(target_arch = "x86_64")]
    {
        let tier = isa::tier();
        if PAIRS && tier.has_bf16() {
            // SAFETY: the tier is at most the CPU's, which has AVX512_BF16 and AVX-512.
            unsafe { pack_avx512bf16(src, w, layout, out) };
            return;
        }
        if tier >= Tier::Avx512 {
            // SAFETY: the tier is at most the CPU's, which has AVX-512.
            unsafe { pack_avx512::<E, PAIRS>(src, w, layout, out) };
            return;
        }
    }
    pack_body::<E, PAIRS, false>(src, w, layout, out)
}

/// Packs depths `k0 .. k0 + kc` of `a: m × k` for `kernel` into `out`: in [`Layout::Rows`]
/// when `a` is contiguous along the depth (straight conversions), else [`Layout::Depths`].
/// Returns the layout and the packed depth.
fn pack_a<E: PackElem>(
    kernel: Kernel,
    a: Mat<'_, E>,
    m: usize,
    (k0, kc): (usize, usize),
    out: &mut Vec<u32>,
) -> (Layout, usize) {
    let src = Src {
        data: a.data,
        sx: a.rs,
        sk: a.cs,
        nx: m,
        k0,
        kc,
    };
    let layout = if a.cs == 1 {
        Layout::Rows
    } else {
        Layout::Depths
    };
    if kernel.is_bf16() {
        pack::<E, true>(src, MR, layout, out);
    } else {
        pack::<E, false>(src, MR, layout, out);
    }
    (layout, packed_depth(kernel.is_bf16(), kc))
}

/// Packs depths `k0 .. k0 + kc` of columns `n0 .. n0 + nc` of `b: k × n` for `kernel` into
/// panels of [`NR`] columns ([`Layout::Depths`]).
fn pack_b<E: PackElem>(
    kernel: Kernel,
    b: Mat<'_, E>,
    (n0, nc): (usize, usize),
    (k0, kc): (usize, usize),
    out: &mut Vec<u32>,
) {
    let src = Src {
        data: &b.data[n0 * b.cs..],
        sx: b.cs,
        sk: b.rs,
        nx: nc,
        k0,
        kc,
    };
    if kernel.is_bf16() {
        pack::<E, true>(src, NR, Layout::Depths, out);
    } else {
        pack::<E, false>(src, NR, Layout::Depths, out);
    }
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

/// One depth block of a product, packed: `a` in tiles of [`MR`] rows laid out as `layout`,
/// `b` in panels of [`NR`] columns, `b_panel` elements apart, each `kd` packed depths (or
/// pairs) long from its start.
struct Block<'a> {
    kernel: Kernel,
    kd: usize,
    a: &'a [u32],
    layout: Layout,
    b: &'a [u32],
    b_panel: usize,
}

/// `dst (+)= scale · a · b` over one packed [`Block`] for an `m × n` destination: every
/// tile, rows outermost (a packed tile of `a` stays in L1 while the panels of `b` stream
/// from L2).
///
/// # Safety
/// The block holds `⌈m / MR⌉` tiles of `a` and `⌈n / NR⌉` panels of `b`; `dst` is valid
/// for reads and writes of `m` rows of `n` elements spaced `dst_rs` apart;
/// `blk.kernel.tier() <= isa::detected()`.
unsafe fn multiply_block(
    blk: &Block<'_>,
    (m, n): (usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    add: bool,
    scale: f32,
) {
    let a_tile = blk.layout.tile_len(blk.kernel.is_bf16(), MR, blk.kd);
    for t in 0..m.div_ceil(MR) {
        for j in 0..n.div_ceil(NR) {
            let tile = Tile {
                // SAFETY: in bounds of `dst` (row `t·MR < m`, column `j·NR < n`).
                ptr: unsafe { dst.add(t * MR * dst_rs + j * NR) },
                rs: dst_rs,
                rows: MR.min(m - t * MR),
                cols: NR.min(n - j * NR),
                add,
                scale,
            };
            // SAFETY: tile `t` of `a` and panel `j` of `b` are in the block, the tile lies
            // inside `dst`, the kernel's tier is available (caller's contract).
            unsafe {
                run_tile(
                    blk.kernel,
                    blk.layout,
                    blk.kd,
                    &blk.a[t * a_tile..],
                    &blk.b[j * blk.b_panel..],
                    &tile,
                )
            };
        }
    }
}

/// Zeroes `m` rows of `n` elements of `dst` (a product over an empty depth).
///
/// # Safety
/// As [`gemm`]'s `dst`.
unsafe fn zero_rows(m: usize, n: usize, (dst, dst_rs): (*mut f32, usize)) {
    for r in 0..m {
        // SAFETY: row `r` of `dst` is valid for `n` writes (caller's contract).
        unsafe { std::ptr::write_bytes(dst.add(r * dst_rs), 0, n) };
    }
}

/// `dst (+)= scale · a · b` for `a: m × k`, `b: k × n`, on the calling thread. An operand
/// of bf16 bits (`u16`) needs a bf16 kernel (panics otherwise) and gives the same result as
/// the f32 values it was rounded from.
///
/// # Safety
/// `a` and `b` must hold every element of their views, `dst` must be valid for reads and
/// writes of `m` rows of `n` elements spaced `dst_rs >= n` apart, and must not alias the
/// operands; `kernel.tier() <= isa::detected()`.
pub(crate) unsafe fn gemm<EA: PackElem, EB: PackElem>(
    kernel: Kernel,
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    a: Mat<'_, EA>,
    b: Mat<'_, EB>,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: caller's contract.
            unsafe { zero_rows(m, n, (dst, dst_rs)) };
        }
        return;
    }
    PACK.with_borrow_mut(|(ap, bp)| {
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let (layout, kd) = pack_a(kernel, a, m, (k0, kc), ap);
            for n0 in (0..n).step_by(NC) {
                let nc = NC.min(n - n0);
                pack_b(kernel, b, (n0, nc), (k0, kc), bp);
                let blk = Block {
                    kernel,
                    kd,
                    a: ap,
                    layout,
                    b: bp,
                    b_panel: kd * NR,
                };
                // SAFETY: the block holds the packed rows and columns; columns
                // `n0 .. n0 + nc` of `dst` are valid (caller's contract).
                unsafe {
                    multiply_block(
                        &blk,
                        (m, nc),
                        (dst.add(n0), dst_rs),
                        accumulate || k0 > 0,
                        scale,
                    )
                };
            }
        }
    });
}

/// One microkernel tile of `kernel` over `kd` packed depths (or pairs), `a` laid out as
/// `layout`.
///
/// # Safety
/// `a` holds a packed tile of `kd` depths in `layout`, `b` a panel of `kd · NR`; the tile
/// is valid memory; `kernel.tier() <= isa::detected()`.
#[inline(always)]
unsafe fn run_tile(kernel: Kernel, layout: Layout, kd: usize, a: &[u32], b: &[u32], tile: &Tile) {
    #[inline(always)]
    unsafe fn go<const ROWS: bool>(kernel: Kernel, kd: usize, a: &[u32], b: &[u32], tile: &Tile) {
        // SAFETY: caller's contract.
        unsafe {
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::F32Avx512 => x86::f32_tile::<ROWS>(kd, a, b, tile),
                #[cfg(target_arch = "x86_64")]
                Kernel::Bf16Avx512 => x86::bf16_tile::<ROWS>(kd, a, b, tile),
                #[cfg(not(target_arch = "x86_64"))]
                Kernel::F32Avx512 | Kernel::Bf16Avx512 => {
                    unreachable!("AVX-512 kernels exist on x86_64 only")
                }
                Kernel::Bf16Portable => bf16_tile_portable::<ROWS>(kd, a, b, tile),
            }
        }
    }
    // SAFETY: caller's contract.
    unsafe {
        match layout {
            Layout::Rows => go::<true>(kernel, kd, a, b, tile),
            Layout::Depths => go::<false>(kernel, kd, a, b, tile),
        }
    }
}

/// Index of the packed `a` element of tile row `i` at packed depth `p`, in [`Layout::Rows`]
/// (`ROWS`) or [`Layout::Depths`], and the length a tile of `kd` depths needs.
#[inline(always)]
const fn a_index<const ROWS: bool, const PAIRS: bool>(i: usize, p: usize) -> usize {
    if ROWS {
        i * Layout::row_stride(PAIRS) + p
    } else {
        p * MR + i
    }
}

/// The length of `a` a tile of `kd` packed depths reads ([`a_index`] of its last element,
/// plus one).
#[inline(always)]
const fn a_extent<const ROWS: bool, const PAIRS: bool>(kd: usize) -> usize {
    if kd == 0 {
        0
    } else {
        a_index::<ROWS, PAIRS>(MR - 1, kd - 1) + 1
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
    pub(crate) fn new<E: PackElem>(
        kernel: Kernel,
        b: Mat<'_, E>,
        k: usize,
        n: usize,
    ) -> Result<Self, String> {
        if !b.fits(k, n) {
            return Err(format!("packed operand too short for {k}×{n}"));
        }
        let mut data = Vec::new();
        let mut part = Vec::new();
        if n > 0 {
            for k0 in (0..k).step_by(KC) {
                pack_b(kernel, b, (0, n), (k0, KC.min(k - k0)), &mut part);
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
pub(crate) unsafe fn gemm_packed_b<E: PackElem>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    a: Mat<'_, E>,
    b: &PackedB,
    scale: f32,
) {
    debug_assert!(k <= b.k && n <= b.n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: caller's contract.
            unsafe { zero_rows(m, n, (dst, dst_rs)) };
        }
        return;
    }
    let kernel = b.kernel;
    let panels = b.n.div_ceil(NR);
    PACK.with_borrow_mut(|(ap, _)| {
        let mut block_off = 0;
        for k0 in (0..k).step_by(KC) {
            let kd_full = packed_depth(kernel.is_bf16(), KC.min(b.k - k0));
            let (layout, kd) = pack_a(kernel, a, m, (k0, KC.min(k - k0)), ap);
            let blk = Block {
                kernel,
                kd,
                a: ap,
                layout,
                b: &b.data[block_off..],
                b_panel: kd_full * NR,
            };
            // SAFETY: the block holds the packed rows, and the first `⌈n / NR⌉` panels
            // (of `kd_full >= kd` packed depths); `dst` as the caller's contract.
            unsafe { multiply_block(&blk, (m, n), (dst, dst_rs), accumulate || k0 > 0, scale) };
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
/// order `VDPBF16PS` documents); `a` in [`Layout::Rows`] (`ROWS`) or [`Layout::Depths`].
///
/// # Safety
/// As [`store_tile`]; `a` holds a tile of `kp` pairs, `b` a panel of `kp · NR`.
unsafe fn bf16_tile_portable<const ROWS: bool>(kp: usize, a: &[u32], b: &[u32], tile: &Tile) {
    let mut acc = [0f32; MR * NR];
    let (a, b) = (&a[..a_extent::<ROWS, true>(kp)], &b[..kp * NR]);
    for (p, bp) in b.chunks_exact(NR).enumerate() {
        let mut b0 = [0f32; NR];
        let mut b1 = [0f32; NR];
        for c in 0..NR {
            b0[c] = bf16_value(bp[c] as u16);
            b1[c] = bf16_value((bp[c] >> 16) as u16);
        }
        for i in 0..MR {
            let av = a[a_index::<ROWS, true>(i, p)];
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
    use super::{a_extent, a_index, Tile, MR, NR};
    use std::arch::x86_64::*;

    /// Converts the leading multiple of 32 values of `src` into bf16 pairs in `dst` with
    /// `VCVTNE2PS2BF16` (nearest, ties to even, subnormals to zero: [`super::bf16_bits`]);
    /// returns how many values it converted.
    ///
    /// # Safety
    /// AVX-512 F and BF16 must be available; `dst` holds at least `src.len() / 2` pairs.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn convert_pairs(src: &[f32], dst: &mut [u32]) -> usize {
        let chunks = src.len() / 32;
        assert!(dst.len() >= chunks * 16);
        for c in 0..chunks {
            // SAFETY: values `32c .. 32c + 32` lie in `src`, pairs `16c .. 16c + 16` in
            // `dst` (checked above); `__m512bh` and `__m512i` are both 64 plain bytes.
            unsafe {
                let lo = _mm512_loadu_ps(src.as_ptr().add(32 * c));
                let hi = _mm512_loadu_ps(src.as_ptr().add(32 * c + 16));
                let r: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.as_mut_ptr().add(16 * c).cast(), r);
            }
        }
        chunks * 32
    }

    /// Rounds `src` to bf16 bits in `dst` (equal lengths) with `VCVTNEPS2BF16`, 16 values
    /// per instruction, the tail in plain Rust; the same bits as [`super::bf16_bits`].
    ///
    /// # Safety
    /// AVX-512 F, BW, DQ, VL and BF16 must be available.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    pub(super) unsafe fn round_halves(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let chunks = n / 16;
        for c in 0..chunks {
            // SAFETY: values `16c .. 16c + 16` lie in both slices; `__m256bh` and `__m256i`
            // are both 32 plain bytes.
            unsafe {
                let v = _mm512_loadu_ps(src.as_ptr().add(16 * c));
                let r: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(dst.as_mut_ptr().add(16 * c).cast(), r);
            }
        }
        super::round_halves(&src[16 * chunks..n], &mut dst[16 * chunks..n]);
    }

    /// Adds (or writes) `scale · c` into the tile, masked to its columns. Inlined into the
    /// tiles, so that the accumulators stay in registers (as a call, the array was zeroed
    /// by a `memset` and spilled to the stack at every tile).
    ///
    /// # Safety
    /// AVX-512 F must be available (the callers are AVX-512 tiles); the tile is valid memory.
    #[inline(always)]
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
        // Multiplying by 1 is exact, so skipping it changes no bit.
        let scaled = tile.scale != 1.0;
        // SAFETY: AVX-512 F is available (caller's contract).
        let s = unsafe { _mm512_set1_ps(tile.scale) };
        for i in 0..MR {
            if i < tile.rows {
                // SAFETY: row `i` of the tile is valid for `cols` elements; the masks keep
                // every access inside them; AVX-512 F is available (caller's contract).
                unsafe {
                    let p = tile.ptr.add(i * tile.rs);
                    let (mut v0, mut v1) = (c[2 * i], c[2 * i + 1]);
                    if scaled {
                        v0 = _mm512_mul_ps(v0, s);
                        v1 = _mm512_mul_ps(v1, s);
                    }
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

    /// Prefetches the tile's rows of `dst` into L1, so that the stores at the end of the
    /// tile do not wait for them (each row is two cache lines, read when accumulating).
    #[inline(always)]
    fn prefetch_dst(tile: &Tile) {
        for i in 0..tile.rows {
            // `wrapping_add`: a prefetch reads nothing and faults on no address; the row is
            // inside the destination anyway (caller's contract of the kernels).
            let p = tile.ptr.wrapping_add(i * tile.rs).cast::<i8>();
            // SAFETY: prefetching has no architectural effect.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(p);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
            }
        }
    }

    /// The f32 `MR × NR` tile over `kc` packed depths (f32 bits), `a` in `Layout::Rows`
    /// (`ROWS`) or `Layout::Depths`.
    ///
    /// # Safety
    /// AVX-512 F must be available; `a` holds a tile of `kc` depths, `b` a panel of
    /// `kc · NR` elements; the tile is valid memory.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn f32_tile<const ROWS: bool>(kc: usize, a: &[u32], b: &[u32], tile: &Tile) {
        let (a, b) = (&a[..a_extent::<ROWS, false>(kc)], &b[..kc * NR]);
        prefetch_dst(tile);
        let mut c = [_mm512_setzero_ps(); 2 * MR];
        // The packed f32 values are stored as their bits.
        let (pa, pb) = (a.as_ptr().cast::<f32>(), b.as_ptr().cast::<f32>());
        for p in 0..kc {
            // SAFETY: `p < kc`, so the loads stay inside `a` and `b` (checked by the slicing).
            unsafe {
                let b0 = _mm512_loadu_ps(pb.add(p * NR));
                let b1 = _mm512_loadu_ps(pb.add(p * NR + 16));
                for i in 0..MR {
                    let av = _mm512_set1_ps(*pa.add(a_index::<ROWS, false>(i, p)));
                    c[2 * i] = _mm512_fmadd_ps(av, b0, c[2 * i]);
                    c[2 * i + 1] = _mm512_fmadd_ps(av, b1, c[2 * i + 1]);
                }
            }
        }
        // SAFETY: caller's contract.
        unsafe { store(&c, tile) };
    }

    /// The bf16 `MR × NR` tile over `kp` packed pairs, with `VDPBF16PS`, `a` in
    /// `Layout::Rows` (`ROWS`) or `Layout::Depths`.
    ///
    /// # Safety
    /// AVX-512 F and BF16 must be available; `a` holds a tile of `kp` pairs, `b` a panel of
    /// `kp · NR`; the tile is valid memory.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn bf16_tile<const ROWS: bool>(kp: usize, a: &[u32], b: &[u32], tile: &Tile) {
        let (a, b) = (&a[..a_extent::<ROWS, true>(kp)], &b[..kp * NR]);
        prefetch_dst(tile);
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
                        std::mem::transmute(_mm512_set1_epi32(
                            *pa.add(a_index::<ROWS, true>(i, p)) as i32,
                        ));
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

    /// A bf16 product reads an operand given as bf16 bits (`u16`, rounded by
    /// [`round_into_bf16`]) exactly as the f32 values they were rounded from: bit-identical
    /// results for `a`, `b` or both as bits, row-major and transposed (both packing layouts
    /// and paths), odd depths, several depth blocks, and a prepacked `b`.
    #[test]
    fn bf16_bit_operands_equal_their_f32_values() {
        let val = |i: usize, s: usize| ((i * s + 7) % 29) as f32 / 13.0 - 1.0 + i as f32 * 1.3e-4;
        for kernel in Kernel::available().into_iter().filter(|k| k.is_bf16()) {
            for (m, n, k) in [(13, 70, KC + 45), (5, 33, 63), (25, 1, KC), (12, 32, 1)] {
                let af: Vec<f32> = (0..m * k).map(|i| val(i, 3)).collect();
                let bf: Vec<f32> = (0..k * n).map(|i| val(i, 5)).collect();
                let (mut ab, mut bb) = (vec![0u16; af.len()], vec![0u16; bf.len()]);
                round_into_bf16(&af, &mut ab);
                round_into_bf16(&bf, &mut bb);
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    // `a` is m × k: row-major, or stored transposed; `b` likewise.
                    let (a32, a16) = if ta {
                        (Mat::rows_t(&af, m), Mat::rows_t(&ab, m))
                    } else {
                        (Mat::rows(&af, k), Mat::rows(&ab, k))
                    };
                    let (b32, b16) = if tb {
                        (Mat::rows_t(&bf, k), Mat::rows_t(&bb, k))
                    } else {
                        (Mat::rows(&bf, n), Mat::rows(&bb, n))
                    };
                    let run = |f: &dyn Fn(*mut f32)| {
                        let mut d = vec![0.25f32; m * n];
                        f(d.as_mut_ptr());
                        d.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
                    };
                    let dims = (m, n, k);
                    // SAFETY (all four): the operands hold their views, `dst` is `m × n`,
                    // the kernel is available.
                    let want = run(&|d| unsafe { gemm(kernel, dims, (d, n), true, a32, b32, 0.5) });
                    let got_a =
                        run(&|d| unsafe { gemm(kernel, dims, (d, n), true, a16, b32, 0.5) });
                    let got_b =
                        run(&|d| unsafe { gemm(kernel, dims, (d, n), true, a32, b16, 0.5) });
                    let got_ab =
                        run(&|d| unsafe { gemm(kernel, dims, (d, n), true, a16, b16, 0.5) });
                    let what = format!("{kernel:?} {m}x{n}x{k} transposed a {ta} b {tb}");
                    assert_eq!(want, got_a, "{what}: a as bits");
                    assert_eq!(want, got_b, "{what}: b as bits");
                    assert_eq!(want, got_ab, "{what}: both as bits");
                    let pb = PackedB::new(kernel, b16, k, n).unwrap();
                    let got_p =
                        run(&|d| unsafe { gemm_packed_b(dims, (d, n), true, a16, &pb, 0.5) });
                    assert_eq!(want, got_p, "{what}: prepacked b as bits");
                }
            }
        }
    }

    /// [`round_into_bf16`] (`VCVTNEPS2BF16` where the CPU has it, the AVX-512 and the plain
    /// loop otherwise) gives [`bf16_bits`] for every class of input, in runs whose lengths
    /// are and are not multiples of the 16 values one instruction converts.
    #[test]
    fn rounding_into_bf16_matches_the_scalar_rounding() {
        let vals: Vec<f32> = SPECIALS
            .into_iter()
            .chain((0..=u32::MAX).step_by(65_539))
            .map(f32::from_bits)
            .collect();
        for len in [1, 15, 16, 17, 100] {
            for run in vals.chunks(len) {
                let want: Vec<u16> = run.iter().map(|&v| bf16_bits(v)).collect();
                let mut got = vec![0x5555u16; run.len()];
                round_into_bf16(run, &mut got);
                assert_eq!(got, want, "tier {}, length {}", isa::tier(), run.len());
                got.fill(0x5555);
                round_halves(run, &mut got);
                assert_eq!(got, want, "plain, length {}", run.len());
                #[cfg(target_arch = "x86_64")]
                if isa::detected().has_bf16() {
                    got.fill(0x5555);
                    // SAFETY: the CPU has AVX512_BF16 (checked).
                    unsafe { x86::round_halves(run, &mut got) };
                    assert_eq!(got, want, "VCVTNEPS2BF16, length {}", run.len());
                }
            }
        }
    }

    /// Bit patterns of every class of f32: zeros, subnormals, the smallest and largest
    /// normals, infinities, NaNs, both signs, and ties of the bf16 rounding.
    const SPECIALS: [u32; 14] = [
        0,
        0x8000_0000,
        0x0000_0001,
        0x007f_ffff,
        0x807f_ffff,
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

    /// Every conversion of a run into packed pairs (`VCVTNE2PS2BF16` where the CPU has it,
    /// the vectorised and the plain rounding) gives the pairs of [`bf16_bits`]: a sweep of
    /// bit patterns (normals, subnormals, infinities, NaNs, both signs), in runs of odd and
    /// even lengths past and short of the 32 values one instruction converts.
    #[test]
    fn run_conversions_match_the_scalar_rounding() {
        let vals: Vec<f32> = SPECIALS
            .into_iter()
            .chain((0..=u32::MAX).step_by(65_537))
            .map(f32::from_bits)
            .collect();
        let want = |run: &[f32]| -> Vec<u32> {
            run.chunks(2)
                .map(|c| {
                    bf16_bits(c[0]) as u32 | c.get(1).map_or(0, |&h| (bf16_bits(h) as u32) << 16)
                })
                .collect()
        };
        for len in [1, 2, 31, 32, 33, 64, 95, 256] {
            for run in vals.chunks(len) {
                let mut got = vec![u32::MAX; run.len().div_ceil(2)];
                convert_run::<true, false>(run, &mut got);
                assert_eq!(got, want(run), "plain, length {}", run.len());
                #[cfg(target_arch = "x86_64")]
                if isa::detected().has_bf16() {
                    got.fill(u32::MAX);
                    // SAFETY: the CPU has AVX512_BF16 (checked).
                    let done = unsafe { x86::convert_pairs(run, &mut got) };
                    assert_eq!(done, run.len() / 32 * 32);
                    convert_run::<true, false>(&run[done..], &mut got[done / 2..]);
                    assert_eq!(got, want(run), "VCVTNE2PS2BF16, length {}", run.len());
                }
            }
        }
    }

    /// The branch-free rounding of the packing loops equals [`bf16_bits`] on every class of
    /// input: a sweep of bit patterns (normals, subnormals, infinities, NaNs, both signs).
    #[test]
    fn branch_free_rounding_matches_the_scalar_one() {
        for b in SPECIALS.into_iter().chain((0..=u32::MAX).step_by(65_521)) {
            let x = f32::from_bits(b);
            assert_eq!(bf16_bits_vec(x), bf16_bits(x) as u32, "bits {b:#010x}");
        }
    }
}
