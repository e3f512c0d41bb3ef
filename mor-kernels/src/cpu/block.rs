//! The feed-forward half of a decoder layer as one differentiable op.
//!
//! `out = h + A · downᵀ` with `A = silu(Z_g) ⊙ Z_u`, `Z = [Z_g | Z_u] = n · [gate; up]ᵀ` and
//! `n = rms_norm(h, w)` (spec §1.1). Written as separate ops this is six graph nodes (norm,
//! two projections, the gate, the down projection, the residual add), and candle's autograd
//! pays a zero-filled gradient buffer plus an addition for each of them, over activations
//! of up to `rows × ff` elements, on the calling thread. Here it is one node: the forward
//! keeps `n`, `Z` and `A` for the backward pass, which runs
//!
//! ```text
//! dA = G · down            dDown = Gᵀ · A
//! dZ = swiglu′(Z) ⊙ dA     d[gate; up] = dZᵀ · n     dn = dZ · [gate; up]
//! dh = G + rms_norm′(h, w; dn)                          dw = Σ_rows (r · h ⊙ dn)
//! ```
//!
//! The gate and up projections run as one product of width `2·ff`. The op's second input is
//! `[w; gate; up]` stacked (`(1 + 2·ff) × d`, built with `Tensor::cat`, whose own backward
//! hands each weight its slice of the gradient), since candle's custom ops take at most three
//! tensors. Products go straight to the `gemm` crate (the one candle uses), with strided
//! operands instead of transposed copies and the residual accumulated in place.

use super::attention::AttentionOp;
use super::gemm::{self, Kernel, Prec, MR};
use super::norm::{rows_bwd, rows_fwd};
use super::rope::RopeOp;
use super::simd::Float;
use super::swiglu::{bwd_chunk, fwd_chunk};
use super::{bail_dtype, fwd_slice, rows_new, with_slices, SharedPtr};
use crate::validate::{AttnBlockDims, AttnDims, MlpDims};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};
use std::any::Any;
use std::sync::Mutex;

/// Multiply-adds below which a product runs on the calling thread.
const GEMM_PAR_MIN: usize = 1 << 16;

/// A strided matrix operand: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `[.., cols]` matrix.
    pub(crate) fn rows(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `[.., cols]` matrix.
    pub(crate) fn rows_t(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }

    /// Whether every element of an `m × n` view lies inside `data`.
    /// Strides and extents are checked without overflow, and must fit in `isize` (they are
    /// passed to `gemm` as `isize`).
    pub(crate) fn fits(&self, m: usize, n: usize) -> bool {
        if m == 0 || n == 0 {
            return true;
        }
        let small = |x: usize| x <= isize::MAX as usize;
        let last = (m - 1)
            .checked_mul(self.rs)
            .zip((n - 1).checked_mul(self.cs))
            .and_then(|(x, y)| x.checked_add(y));
        small(self.rs) && small(self.cs) && last.is_some_and(|e| e < self.data.len())
    }
}

/// A product operand: values of the tensors' dtype, or f32 values already rounded to bf16
/// (their bits, [`gemm::round_into_bf16`]), which only bf16 products take. A bf16 product
/// gives the same result, bit for bit, from either: its packing rounds f32 values exactly
/// as the bits were rounded.
#[derive(Clone, Copy)]
pub(crate) enum Operand<'a, T> {
    /// Values of the tensors' dtype.
    Full(Mat<'a, T>),
    /// bf16 bits (`T` is f32 and the product is bf16).
    Bf16(Mat<'a, u16>),
}

impl<'a, T> From<Mat<'a, T>> for Operand<'a, T> {
    fn from(m: Mat<'a, T>) -> Self {
        Operand::Full(m)
    }
}

impl<'a, T> Operand<'a, T> {
    /// Whether every element of an `m × n` view lies inside the data ([`Mat::fits`]).
    fn fits(&self, m: usize, n: usize) -> bool {
        match self {
            Operand::Full(x) => x.fits(m, n),
            Operand::Bf16(x) => x.fits(m, n),
        }
    }

    fn is_bf16(&self) -> bool {
        matches!(self, Operand::Bf16(_))
    }

    /// The view from row `r0` on (`r0` must be a row of the view).
    fn skip_rows(self, r0: usize) -> Self {
        match self {
            Operand::Full(x) => Operand::Full(Mat {
                data: &x.data[r0 * x.rs..],
                ..x
            }),
            Operand::Bf16(x) => Operand::Bf16(Mat {
                data: &x.data[r0 * x.rs..],
                ..x
            }),
        }
    }
}

/// An activation an op writes for products: values of the tensors' dtype, or, when it feeds
/// bf16 products only, rounded to bf16 by the op that writes it (half the bytes to write
/// and to read, and a copy instead of a conversion when a product packs it).
pub(crate) enum Act<T> {
    /// Values of the tensors' dtype.
    Full(Vec<T>),
    /// bf16 bits of f32 values.
    Bf16(Vec<u16>),
}

impl<T> Act<T> {
    /// The activation as a row-major `[.., cols]` operand.
    pub(crate) fn rows(&self, cols: usize) -> Operand<'_, T> {
        match self {
            Act::Full(v) => Operand::Full(Mat::rows(v, cols)),
            Act::Bf16(v) => Operand::Bf16(Mat::rows(v, cols)),
        }
    }

    /// The transpose of the activation as a row-major `[.., cols]` matrix.
    pub(crate) fn rows_t(&self, cols: usize) -> Operand<'_, T> {
        match self {
            Act::Full(v) => Operand::Full(Mat::rows_t(v, cols)),
            Act::Bf16(v) => Operand::Bf16(Mat::rows_t(v, cols)),
        }
    }
}

thread_local! {
    /// f32 rows an [`act_new`] block is computed into before it is rounded.
    static ACT_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A new `[rows, row_len]` activation filled by `f(first_row, block)` on zeroed blocks, as
/// [`rows_new`]; with `bf16` and `T = f32`, each block is computed into f32 scratch rows
/// and rounded to bf16 ([`Act::Bf16`], the same bits the products' packing would round the
/// f32 values to), else kept as it is ([`Act::Full`]).
pub(crate) fn act_new<T: Float>(
    bf16: bool,
    rows: usize,
    row_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Act<T> {
    if !(bf16 && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()) {
        return Act::Full(rows_new(rows, row_len, f).0);
    }
    let n = rows
        .checked_mul(row_len)
        .expect("act_new: buffer size overflows usize");
    let mut v: Vec<u16> = Vec::with_capacity(n);
    if n == 0 {
        return Act::Bf16(v);
    }
    let per = super::rows_per_task(rows, row_len);
    let base = SharedPtr(v.as_mut_ptr());
    let run = |blk: usize| {
        let r0 = blk * per;
        let len = per.min(rows - r0) * row_len;
        let fill = |buf: &mut Vec<f32>| {
            buf.clear();
            buf.resize(len, 0.0);
            // SAFETY: `T` is f32 (checked above), so the scratch is reinterpreted as itself.
            let tb = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<T>(), len) };
            f(r0, tb);
            // SAFETY: blocks are disjoint and lie inside the allocation of `n` elements; the
            // block is zeroed (a valid `u16`) before a reference to it is made.
            let out = unsafe {
                let p = base.get().add(r0 * row_len);
                std::ptr::write_bytes(p, 0, len);
                std::slice::from_raw_parts_mut(p, len)
            };
            gemm::round_into_bf16(buf, out);
        };
        // A task that runs inside another's `f` (work stealing) takes its own scratch.
        ACT_SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut buf) => fill(&mut buf),
            Err(_) => fill(&mut Vec::new()),
        });
    };
    let blocks = rows.div_ceil(per);
    if n < super::PAR_MIN_WORK {
        (0..blocks).for_each(run);
    } else {
        use rayon::prelude::*;
        (0..blocks).into_par_iter().for_each(run);
    }
    // SAFETY: every block, hence every element, was initialised above.
    unsafe { v.set_len(n) };
    Act::Bf16(v)
}

/// The same view with f32 elements, when `T` is f32.
pub(crate) fn as_f32<T: Float>(m: Mat<'_, T>) -> Option<Mat<'_, f32>> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| Mat {
        // SAFETY: `T` is f32 (same type, checked above), so the slice is reinterpreted as
        // itself.
        data: unsafe { std::slice::from_raw_parts(m.data.as_ptr().cast::<f32>(), m.data.len()) },
        rs: m.rs,
        cs: m.cs,
    })
}

/// `dst[i, j] (+)= Σ_k a[i, k] · b[k, j]` for an `m × n` row-major `dst` with row stride
/// `dst_rs`; adds to `dst` when `accumulate`, overwrites it otherwise.
///
/// # Errors
/// When an operand or the destination is too short for the given dims and strides.
pub(crate) fn matmul<'a, T: Float>(
    prec: Prec,
    dims: (usize, usize, usize),
    a: impl Into<Operand<'a, T>>,
    b: impl Into<Operand<'a, T>>,
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
) -> candle_core::Result<()> {
    let threads = rayon::current_num_threads();
    matmul_scaled(
        prec,
        dims,
        a.into(),
        b.into(),
        (dst, dst_rs),
        accumulate,
        (T::ONE, threads),
    )
}

/// `dst (+)= scale · a · b` on up to `threads` row blocks; [`matmul`] with `scale = 1` and
/// all threads. Kernels that already run inside a rayon task pass `threads = 1`.
///
/// # Errors
/// As [`matmul`].
pub(crate) fn matmul_scaled<'a, T: Float>(
    prec: Prec,
    (m, n, k): (usize, usize, usize),
    a: impl Into<Operand<'a, T>>,
    b: impl Into<Operand<'a, T>>,
    (dst, dst_rs): (&mut [T], usize),
    accumulate: bool,
    (scale, threads): (T, usize),
) -> candle_core::Result<()> {
    let (a, b) = (a.into(), b.into());
    check_bf16_operands::<T>(prec, &a, &b)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dst_fits = dst_rs >= n
        && dst_rs <= isize::MAX as usize
        && (m - 1)
            .checked_mul(dst_rs)
            .and_then(|x| x.checked_add(n))
            .is_some_and(|e| e <= dst.len());
    if !(a.fits(m, k) && b.fits(k, n) && dst_fits) {
        candle_core::bail!("mor matmul: operands too short for {m}×{k} · {k}×{n}");
    }
    if k == 0 {
        if !accumulate {
            for r in dst.chunks_mut(dst_rs).take(m) {
                r[..n].fill(T::ZERO);
            }
        }
        return Ok(());
    }
    let parts = (row_parts((m, n, k), threads), scale);
    // SAFETY: every index the product reads or writes is in bounds (checked above: the last
    // element of each view lies inside its slice, and `dst` rows do not overlap since
    // `dst_rs >= n`); `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm_rows_split(
            prec,
            (m, n, k),
            SharedPtr(dst.as_mut_ptr()),
            dst_rs,
            accumulate,
            a,
            b,
            parts,
        )
    };
    Ok(())
}

/// Operands of bf16 bits need a bf16 product over f32 tensors.
fn check_bf16_operands<T: Float>(
    prec: Prec,
    a: &Operand<'_, T>,
    b: &Operand<'_, T>,
) -> candle_core::Result<()> {
    let f32 = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
    if (a.is_bf16() || b.is_bf16()) && !(prec == Prec::Bf16 && f32) {
        candle_core::bail!("mor matmul: a bf16 operand needs a bf16 product of f32 tensors");
    }
    Ok(())
}

/// An operand of the own packed kernels.
#[derive(Clone, Copy)]
enum OwnOperand<'a> {
    F32(Mat<'a, f32>),
    Bf16(Mat<'a, u16>),
}

/// The operand for the own kernels, when its values are f32 or bf16 bits.
fn own_operand<T: Float>(o: Operand<'_, T>) -> Option<OwnOperand<'_>> {
    match o {
        Operand::Full(m) => as_f32(m).map(OwnOperand::F32),
        Operand::Bf16(m) => Some(OwnOperand::Bf16(m)),
    }
}

/// [`gemm::gemm`] on own-kernel operands of either element type.
///
/// # Safety
/// As [`gemm::gemm`].
unsafe fn own_gemm(
    kernel: Kernel,
    dims: (usize, usize, usize),
    dst: (*mut f32, usize),
    accumulate: bool,
    (a, b): (OwnOperand<'_>, OwnOperand<'_>),
    scale: f32,
) {
    use OwnOperand::{Bf16, F32};
    // SAFETY: caller's contract.
    unsafe {
        match (a, b) {
            (F32(a), F32(b)) => gemm::gemm(kernel, dims, dst, accumulate, a, b, scale),
            (F32(a), Bf16(b)) => gemm::gemm(kernel, dims, dst, accumulate, a, b, scale),
            (Bf16(a), F32(b)) => gemm::gemm(kernel, dims, dst, accumulate, a, b, scale),
            (Bf16(a), Bf16(b)) => gemm::gemm(kernel, dims, dst, accumulate, a, b, scale),
        }
    }
}

/// How many row blocks to run a product in: one per thread when the product is large
/// enough, blocks of at least 32 rows. The blocking (and with it the `gemm` crate's own
/// choice of inner blocking) depends on the thread count, so results can differ in the last
/// bits between runs with different thread counts; with the same count they are identical.
fn row_parts((m, n, k): (usize, usize, usize), threads: usize) -> usize {
    if threads > 1 && m * n * k >= GEMM_PAR_MIN {
        threads.min(m / 32).max(1)
    } else {
        1
    }
}

/// The product over `parts` blocks of rows, each a single-threaded `gemm` call on its own
/// rayon task. On two cores this keeps both busy with no synchronisation inside the
/// product, which the `gemm` crate's own threading needs (about 75% parallel efficiency
/// at these sizes, against about 95% for row blocks).
///
/// # Safety
/// `a`, `b` must hold every element of their `m × k` and `k × n` views, `dst` must be
/// valid for writes (and reads when `accumulate`) of `m` rows of `n` elements spaced
/// `dst_rs >= n` apart, and nothing else may access those rows meanwhile; bf16 operands
/// come with a bf16 product over f32 ([`check_bf16_operands`]).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows_split<T: Float>(
    prec: Prec,
    (m, n, k): (usize, usize, usize),
    dst: SharedPtr<T>,
    dst_rs: usize,
    accumulate: bool,
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    (parts, scale): (usize, T),
) {
    // The own packed kernels take f32 operands (or bf16 bits): f32 products at the AVX-512
    // tier and every bf16 product (f64 operands are never rounded to bf16).
    let own = match (own_operand(a), own_operand(b)) {
        (Some(a32), Some(b32)) => Kernel::for_prec(prec).map(|kern| (kern, a32, b32)),
        _ => None,
    };
    let block = |r0: usize, rows: usize| {
        if let Some((kern, _, b32)) = own {
            let scale32 = scale.to_f64() as f32;
            let a_rows = own_operand(a.skip_rows(r0)).expect("own operand");
            // SAFETY: as below; `T` is f32 here (checked by `own_operand`), so the
            // destination pointer is an f32 pointer; the kernel's tier is at most the CPU's.
            unsafe {
                own_gemm(
                    kern,
                    (rows, n, k),
                    (dst.get().add(r0 * dst_rs).cast::<f32>(), dst_rs),
                    accumulate,
                    (a_rows, b32),
                    scale32,
                )
            };
            return;
        }
        let (Operand::Full(a), Operand::Full(b)) = (a, b) else {
            unreachable!("bf16 operands always run on the own bf16 kernels");
        };
        // SAFETY: rows `r0 .. r0 + rows` lie inside the views (caller's contract); blocks
        // are disjoint, so each task writes its own rows only.
        unsafe {
            ::gemm::gemm(
                rows,
                n,
                k,
                dst.get().add(r0 * dst_rs),
                1,
                dst_rs as isize,
                accumulate,
                a.data.as_ptr().add(r0 * a.rs),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr(),
                b.cs as isize,
                b.rs as isize,
                if accumulate { T::ONE } else { T::ZERO },
                scale,
                false,
                false,
                false,
                ::gemm::Parallelism::None,
            )
        }
    };
    if parts <= 1 {
        block(0, m);
        return;
    }
    // Blocks of whole microkernel tiles (`MR` rows for the own kernels, 16 for `gemm`).
    let tile = if own.is_some() { MR } else { 16 };
    let per = m.div_ceil(parts).div_ceil(tile) * tile;
    use rayon::prelude::*;
    (0..m.div_ceil(per))
        .into_par_iter()
        .with_max_len(1)
        .for_each(|i| block(i * per, per.min(m - i * per)));
}

/// `a · b` as a new row-major `m × n` matrix (no zero-filling pass: the product writes
/// every element).
///
/// # Errors
/// As [`matmul`].
pub(crate) fn matmul_new<'a, T: Float>(
    prec: Prec,
    dims: (usize, usize, usize),
    a: impl Into<Operand<'a, T>>,
    b: impl Into<Operand<'a, T>>,
) -> candle_core::Result<Vec<T>> {
    matmul_new_in(prec, dims, a.into(), b.into(), rayon::current_num_threads())
}

/// Two independent products, each on half the threads (one each on two cores): the pairs of
/// a backward pass (`dx = g · w` and `dw = gᵀ · x`) have equal work, so this balances the
/// cores without splitting either product.
///
/// # Errors
/// As [`matmul`].
#[allow(clippy::type_complexity)]
pub(crate) fn matmul_new_pair<'a, T: Float>(
    prec: Prec,
    (d1, a1, b1): (
        (usize, usize, usize),
        impl Into<Operand<'a, T>>,
        impl Into<Operand<'a, T>>,
    ),
    (d2, a2, b2): (
        (usize, usize, usize),
        impl Into<Operand<'a, T>>,
        impl Into<Operand<'a, T>>,
    ),
) -> candle_core::Result<(Vec<T>, Vec<T>)> {
    let (a1, b1, a2, b2) = (a1.into(), b1.into(), a2.into(), b2.into());
    let threads = rayon::current_num_threads();
    if threads < 2 {
        return Ok((
            matmul_new_in(prec, d1, a1, b1, 1)?,
            matmul_new_in(prec, d2, a2, b2, 1)?,
        ));
    }
    let half = threads / 2;
    let (r1, r2) = rayon::join(
        || matmul_new_in(prec, d1, a1, b1, half),
        || matmul_new_in(prec, d2, a2, b2, threads - half),
    );
    Ok((r1?, r2?))
}

fn matmul_new_in<T: Float>(
    prec: Prec,
    (m, n, k): (usize, usize, usize),
    a: Operand<'_, T>,
    b: Operand<'_, T>,
    threads: usize,
) -> candle_core::Result<Vec<T>> {
    check_bf16_operands::<T>(prec, &a, &b)?;
    if k == 0 || m == 0 || n == 0 {
        return Ok(vec![T::ZERO; m * n]);
    }
    if !(a.fits(m, k) && b.fits(k, n)) {
        candle_core::bail!("mor matmul: operands too short for {m}×{k} · {k}×{n}");
    }
    let mut dst: Vec<T> = Vec::with_capacity(m * n);
    let parts = row_parts((m, n, k), threads);
    // SAFETY: the operands are in bounds (checked above); `dst` has room for `m × n`
    // elements, which the product (`read_dst = false`, `k > 0`) writes, every one of them,
    // through the raw pointer before `set_len`.
    unsafe {
        gemm_rows_split(
            prec,
            (m, n, k),
            SharedPtr(dst.as_mut_ptr()),
            n,
            false,
            a,
            b,
            (parts, T::ONE),
        );
        dst.set_len(m * n);
    }
    Ok(dst)
}

/// `rms_norm(h, w)` of the `[rows, d]` matrix `h`, rounded to bf16 with `bf16` (for bf16
/// products only, [`act_new`]).
fn norm_fwd<T: Float>(bf16: bool, h: &[T], w: &[T], eps: T, rows: usize, d: usize) -> Act<T> {
    act_new(bf16, rows, d, |r0, n| {
        rows_fwd(&h[r0 * d..r0 * d + n.len()], w, eps, d, n)
    })
}

/// A copy of the row-major `[rows, d]` matrix `x`, made in parallel blocks.
fn copy_rows<T: Float>(x: &[T], rows: usize, d: usize) -> Vec<T> {
    rows_new(rows, d, |r0, o| {
        o.copy_from_slice(&x[r0 * d..r0 * d + o.len()])
    })
    .0
}

/// The gradient of `h + f(rms_norm(h, w))` with respect to `h`, given `g` (the output
/// gradient, which reaches `h` through the residual) and `dn` (the gradient reaching the
/// norm's output); writes the norm weight's gradient (summed over rows) into `dw`.
fn norm_residual_bwd<T: Float>(
    h: &[T],
    w: &[T],
    dn: &[T],
    g: &[T],
    eps: T,
    dw: &mut [T],
) -> Vec<T> {
    let d = w.len();
    let rows = h.len().checked_div(d).unwrap_or(0);
    let (dh, partial) = rows_new(rows, d, |r0, dh| {
        let r = r0 * d..r0 * d + dh.len();
        let mut dw = vec![T::ZERO; d];
        rows_bwd(&h[r.clone()], w, &dn[r.clone()], eps, d, dh, &mut dw);
        for (o, &gv) in dh.iter_mut().zip(&g[r]) {
            *o += gv;
        }
        dw
    });
    // Block partial sums added in block order: the same result for any thread count.
    dw.fill(T::ZERO);
    for p in partial {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    dh
}

/// Head layout of a projection: `(b, t, heads, dh)`.
type HeadShape = (usize, usize, usize, usize);

/// Copies columns `off .. off + heads·dh` of the row-major `[b·t, width]` matrix `src` into
/// head-major `[b, heads, t, dh]`.
fn heads_from_cols<T: Float>(
    src: &[T],
    width: usize,
    off: usize,
    (b, t, h, dh): HeadShape,
) -> Vec<T> {
    // Rows of the output are (batch, head, token) rows of `dh` elements.
    rows_new(b * h * t, dh, |r0, o| {
        for (k, or) in o.chunks_exact_mut(dh).enumerate() {
            let r = r0 + k;
            let (bh, ti) = (r / t, r % t);
            let (bi, hi) = (bh / h, bh % h);
            let s = (bi * t + ti) * width + off + hi * dh;
            or.copy_from_slice(&src[s..s + dh]);
        }
    })
    .0
}

/// A new row-major `[b·t, width]` matrix whose columns are filled from head-major sources
/// `(src: [b, heads, t, dh], first column, heads)` that together cover every column, rounded
/// to bf16 with `bf16` (for bf16 products only, [`act_new`]).
fn cols_from_heads<T: Float>(
    bf16: bool,
    srcs: &[(&[T], usize, usize)],
    width: usize,
    (b, t, dh): (usize, usize, usize),
) -> Act<T> {
    act_new(bf16, b * t, width, |r0, d| {
        for (k, dr) in d.chunks_exact_mut(width).enumerate() {
            let r = r0 + k;
            let (bi, ti) = (r / t, r % t);
            for &(src, off, h) in srcs {
                for hi in 0..h {
                    let s = ((bi * h + hi) * t + ti) * dh;
                    dr[off + hi * dh..off + (hi + 1) * dh].copy_from_slice(&src[s..s + dh]);
                }
            }
        }
    })
}

/// Takes the state a custom op's forward pass kept, if it is of type `S` (the lock is
/// released before the backward pass runs).
pub(crate) fn take_saved<S: 'static>(
    slot: &Mutex<Option<Box<dyn Any + Send + Sync>>>,
) -> Option<S> {
    let kept = slot.lock().unwrap_or_else(|e| e.into_inner()).take()?;
    kept.downcast::<S>().ok().map(|b| *b)
}

/// The `CustomOp3` impl of a fused layer half: dispatches its three inputs (one float dtype)
/// to the op's `cpu_fwd_typed::<T>` and `bwd_typed::<T>`, and returns gradients only for
/// the inputs that track them.
macro_rules! fused_layer_op {
    ($op:ty, $name:literal, $shape:expr) => {
        impl CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
                s3: &CpuStorage,
                l3: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                let args = ((s1, l1), (s2, l2), (s3, l3));
                let out = match (s1, s2, s3) {
                    (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                        self.cpu_fwd_typed::<f32>(args.0, args.1, args.2)?
                    }
                    (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                        self.cpu_fwd_typed::<f64>(args.0, args.1, args.2)?
                    }
                    _ => return Err(bail_dtype(self.name(), s1)),
                };
                Ok((out, ($shape)(self)))
            }

            fn bwd(
                &self,
                a: &Tensor,
                b: &Tensor,
                c: &Tensor,
                _res: &Tensor,
                grad: &Tensor,
            ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
                let (da, db, dc) = match a.dtype() {
                    candle_core::DType::F32 => self.bwd_typed::<f32>(a, b, c, grad)?,
                    candle_core::DType::F64 => self.bwd_typed::<f64>(a, b, c, grad)?,
                    other => candle_core::bail!("{}: unsupported dtype {other:?}", self.name()),
                };
                Ok((
                    a.track_op().then_some(da),
                    b.track_op().then_some(db),
                    c.track_op().then_some(dc),
                ))
            }
        }
    };
}

/// What the forward pass keeps for the backward pass.
struct Saved<T> {
    /// `rms_norm(h)`, `[rows, d]` (bf16 for bf16 products).
    n: Act<T>,
    /// `[Z_g | Z_u]`, `[rows, 2·ff]`.
    z: Vec<T>,
    /// `silu(Z_g) ⊙ Z_u`, `[rows, ff]` (bf16 for bf16 products).
    a: Act<T>,
}

/// The fused feed-forward half: inputs `h: [.., d]`, `[w; gate; up]: [1 + 2·ff, d]`,
/// `down: [d, ff]`.
pub(crate) struct MlpOp {
    dims: MlpDims,
    eps: f64,
    out_shape: Vec<usize>,
    /// Whether to keep the intermediates (only when a gradient can flow).
    keep: bool,
    /// Precision of the products (the norm, gate and residual stay in the tensors' dtype).
    prec: Prec,
    saved: Mutex<Option<Box<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for MlpOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlpOp")
            .field("dims", &self.dims)
            .field("eps", &self.eps)
            .finish()
    }
}

impl MlpOp {
    pub(crate) fn new(dims: MlpDims, eps: f64, out_shape: Vec<usize>, keep: bool) -> Self {
        MlpOp {
            dims,
            eps,
            out_shape,
            keep,
            prec: Prec::F32,
            saved: Mutex::new(None),
        }
    }

    /// The same op with products in `prec`.
    pub(crate) fn with_prec(mut self, prec: Prec) -> Self {
        self.prec = prec;
        self
    }

    fn forward<T: Float>(
        &self,
        h: &[T],
        pack: &[T],
        down: &[T],
    ) -> candle_core::Result<(Vec<T>, Saved<T>)> {
        let MlpDims { rows, d, ff } = self.dims;
        let (f2, eps) = (2 * ff, T::from_f64(self.eps));
        let (w, wgu) = pack.split_at(d);
        // n and A feed bf16 products only: rounded once, where they are written.
        let bf16 = self.prec == Prec::Bf16;
        let n = norm_fwd(bf16, h, w, eps, rows, d);
        // Z = n · [gate; up]ᵀ
        let z = matmul_new(self.prec, (rows, f2, d), n.rows(d), Mat::rows_t(wgu, d))?;
        // A = silu(Z_g) ⊙ Z_u
        let a = act_new(bf16, rows, ff, |r0, a| {
            for (k, ar) in a.chunks_exact_mut(ff).enumerate() {
                let zr = &z[(r0 + k) * f2..(r0 + k + 1) * f2];
                let (g, u) = zr.split_at(ff);
                fwd_chunk(g, u, ar);
            }
        });
        // out = h + A · downᵀ
        let mut out = copy_rows(h, rows, d);
        matmul(
            self.prec,
            (rows, d, ff),
            a.rows(ff),
            Mat::rows_t(down, ff),
            &mut out,
            d,
            true,
        )?;
        Ok((out, Saved { n, z, a }))
    }

    /// Gradients of `(h, [w; gate; up], down)` for the output gradient `g`.
    fn backward<T: Float>(
        &self,
        h: &[T],
        pack: &[T],
        down: &[T],
        g: &[T],
        s: &Saved<T>,
    ) -> candle_core::Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let MlpDims { rows, d, ff } = self.dims;
        let (f2, eps) = (2 * ff, T::from_f64(self.eps));
        let (w, wgu) = pack.split_at(d);
        // dDown = Gᵀ · A and dA = G · down, then dZ = swiglu′(Z) ⊙ dA
        let (d_down, da) = matmul_new_pair(
            self.prec,
            ((d, ff, rows), Mat::rows_t(g, d), s.a.rows(ff)),
            ((rows, ff, d), Mat::rows(g, d), Mat::rows(down, ff)),
        )?;
        // dZ feeds bf16 products only: rounded once, where it is written.
        let dz = act_new(self.prec == Prec::Bf16, rows, f2, |r0, dz| {
            for (k, dzr) in dz.chunks_exact_mut(f2).enumerate() {
                let r = r0 + k;
                let (zg, zu) = s.z[r * f2..(r + 1) * f2].split_at(ff);
                let (dg, du) = dzr.split_at_mut(ff);
                bwd_chunk(zg, zu, &da[r * ff..(r + 1) * ff], dg, du);
            }
        });
        drop(da);
        // d[gate; up] = dZᵀ · n and dn = dZ · [gate; up]
        let (dgu, dn) = matmul_new_pair(
            self.prec,
            ((f2, d, rows), dz.rows_t(f2), s.n.rows(d)),
            ((rows, d, f2), dz.rows(f2), Mat::rows(wgu, d)),
        )?;
        drop(dz);
        let mut d_pack = vec![T::ZERO; d];
        let dh = norm_residual_bwd(h, w, &dn, g, eps, &mut d_pack);
        d_pack.extend_from_slice(&dgu);
        Ok((dh, d_pack, d_down))
    }

    fn cpu_fwd_typed<T: Float>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<CpuStorage> {
        let MlpDims { rows, d, ff } = self.dims;
        let name = self.name();
        let h = fwd_slice::<T>(name, s1, l1, &self.out_shape)?;
        let pack = fwd_slice::<T>(name, s2, l2, &[1 + 2 * ff, d])?;
        let down = fwd_slice::<T>(name, s3, l3, &[d, ff])?;
        if h.len() != rows * d {
            candle_core::bail!("{name}: h has {} elements, expected {rows}×{d}", h.len());
        }
        let (out, saved) = self.forward(h, pack, down)?;
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(saved));
        }
        Ok(T::storage(out))
    }

    fn bwd_typed<T: Float>(
        &self,
        h: &Tensor,
        pack: &Tensor,
        down: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (dh, dp, dd) = with_slices::<T, _>(&[h, pack, down, g], |s| {
            let (h, pack, down, g) = (s[0], s[1], s[2], s[3]);
            // Taken, so the intermediates are freed as soon as the backward pass ends; a
            // second backward pass through the same graph recomputes them.
            let saved = match take_saved::<Saved<T>>(&self.saved) {
                Some(saved) => saved,
                None => self.forward(h, pack, down)?.1,
            };
            self.backward(h, pack, down, g, &saved)
        })?;
        Ok((
            Tensor::from_vec(dh, h.shape(), &Device::Cpu)?,
            Tensor::from_vec(dp, pack.shape(), &Device::Cpu)?,
            Tensor::from_vec(dd, down.shape(), &Device::Cpu)?,
        ))
    }
}

fused_layer_op!(MlpOp, "mor-mlp-block", |op: &MlpOp| Shape::from(
    op.out_shape.clone()
));

/// What the attention half keeps for its backward pass.
struct AttnSaved<T> {
    /// `rms_norm(h)`, `[rows, d]` (bf16 for bf16 products).
    n: Act<T>,
    /// Rotated queries `[b, hq, t, dh]`.
    q: Vec<T>,
    /// Rotated keys `[b, hkv, t, dh]`.
    k: Vec<T>,
    /// Values `[b, hkv, t, dh]`.
    v: Vec<T>,
    /// Attention output `[b, hq, t, dh]`.
    o: Vec<T>,
    /// Log-sum-exp of each query row `[b, hq, t]`.
    lse: Vec<T>,
    /// The output with heads merged, `[rows, hq·dh]` (bf16 for bf16 products).
    merged: Act<T>,
}

/// The fused attention half of a decoder layer: inputs `h: [b, t, d]`,
/// `[w; q; k; v]: [1 + (hq + 2·hkv)·dh, d]`, `o: [d, hq·dh]`; positions and RoPE tables held
/// by the op.
///
/// Forward: `n = rms_norm(h)`, one product `n · [q; k; v]ᵀ`, heads split and rotated, the
/// flash-style attention of [`AttentionOp`], heads merged, `out = h + merged · oᵀ`. Backward
/// runs the same steps in reverse (RoPE's gradient is the inverse rotation), writing the
/// three projection gradients into one `[rows, (hq + 2·hkv)·dh]` matrix so that the weight
/// gradient and the gradient of `n` are one product each.
#[derive(Debug)]
pub(crate) struct AttnBlockOp {
    dims: AttnBlockDims,
    eps: f64,
    attn: AttentionOp,
    rope_q: RopeOp,
    rope_k: RopeOp,
    /// RoPE tables in the dtype of `h`, contiguous.
    cos: Tensor,
    sin: Tensor,
    keep: bool,
    /// Precision of the projections (the attention op carries its own copy).
    prec: Prec,
    saved: Mutex<Option<Box<dyn Any + Send + Sync>>>,
}

impl AttnBlockOp {
    pub(crate) fn new(dims: AttnBlockDims, eps: f64, cos: Tensor, sin: Tensor, keep: bool) -> Self {
        let AttnBlockDims {
            b, t, hq, hkv, dh, ..
        } = dims;
        let attn = AttentionOp::new(&AttnDims {
            b,
            hq,
            hkv,
            t,
            s: t,
            dh,
            q_pos: dims.pos.clone(),
            k_pos: dims.pos.clone(),
        });
        let rope = |h: usize| RopeOp {
            b,
            h,
            t,
            dh,
            max_pos: dims.max_pos,
            pos: dims.pos.clone(),
            split: false,
        };
        AttnBlockOp {
            rope_q: rope(hq),
            rope_k: rope(hkv),
            attn,
            dims,
            eps,
            cos,
            sin,
            keep,
            prec: Prec::F32,
            saved: Mutex::new(None),
        }
    }

    /// The same op with products in `prec` (the projections and the attention).
    pub(crate) fn with_prec(mut self, prec: Prec) -> Self {
        self.prec = prec;
        self.attn.prec = prec;
        self
    }

    /// `(rows, d, hq·dh, hkv·dh)`.
    fn sizes(&self) -> (usize, usize, usize, usize) {
        let AttnBlockDims {
            b,
            t,
            d,
            hq,
            hkv,
            dh,
            ..
        } = self.dims;
        (b * t, d, hq * dh, hkv * dh)
    }

    fn forward<T: Float>(
        &self,
        h: &[T],
        pack: &[T],
        wo: &[T],
        (cos, sin): (&[T], &[T]),
    ) -> candle_core::Result<(Vec<T>, AttnSaved<T>)> {
        let AttnBlockDims {
            b, t, hq, hkv, dh, ..
        } = self.dims;
        let (rows, d, nq, nk) = self.sizes();
        let width = nq + 2 * nk;
        let (w, wqkv) = pack.split_at(d);
        // n and the merged heads feed bf16 products only: rounded once, where they are
        // written.
        let bf16 = self.prec == Prec::Bf16;
        let n = norm_fwd(bf16, h, w, T::from_f64(self.eps), rows, d);
        let qkv = matmul_new(self.prec, (rows, width, d), n.rows(d), Mat::rows_t(wqkv, d))?;
        let q = self.rope_q.rotate(
            &heads_from_cols(&qkv, width, 0, (b, t, hq, dh)),
            cos,
            sin,
            T::ONE,
        );
        let k = self.rope_k.rotate(
            &heads_from_cols(&qkv, width, nq, (b, t, hkv, dh)),
            cos,
            sin,
            T::ONE,
        );
        let v = heads_from_cols(&qkv, width, nq + nk, (b, t, hkv, dh));
        drop(qkv);
        let (o, lse) = self.attn.fwd_slices(&q, &k, &v)?;
        let merged = cols_from_heads(bf16, &[(&o, 0, hq)], nq, (b, t, dh));
        let mut out = copy_rows(h, rows, d);
        matmul(
            self.prec,
            (rows, d, nq),
            merged.rows(nq),
            Mat::rows_t(wo, nq),
            &mut out,
            d,
            true,
        )?;
        let saved = AttnSaved {
            n,
            q,
            k,
            v,
            o,
            lse,
            merged,
        };
        Ok((out, saved))
    }

    /// Gradients of `(h, [w; q; k; v], o)` for the output gradient `g`.
    fn backward<T: Float>(
        &self,
        (h, pack, wo, g): (&[T], &[T], &[T], &[T]),
        (cos, sin): (&[T], &[T]),
        s: &AttnSaved<T>,
    ) -> candle_core::Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let AttnBlockDims {
            b, t, hq, hkv, dh, ..
        } = self.dims;
        let (rows, d, nq, nk) = self.sizes();
        let width = nq + 2 * nk;
        let (w, wqkv) = pack.split_at(d);
        // d o-proj = Gᵀ · merged, d merged = G · o-proj
        let (d_wo, d_merged) = matmul_new_pair(
            self.prec,
            ((d, nq, rows), Mat::rows_t(g, d), s.merged.rows(nq)),
            ((rows, nq, d), Mat::rows(g, d), Mat::rows(wo, nq)),
        )?;
        let d_o = heads_from_cols(&d_merged, nq, 0, (b, t, hq, dh));
        drop(d_merged);
        let (dq, dk, dv) = self.attn.bwd_slices(&s.q, &s.k, &s.v, &s.o, &d_o, &s.lse)?;
        drop(d_o);
        // RoPE's gradient is the inverse rotation; the three projections' gradients go side
        // by side into one matrix.
        let dq = self.rope_q.rotate(&dq, cos, sin, -T::ONE);
        let dk = self.rope_k.rotate(&dk, cos, sin, -T::ONE);
        // dQKV feeds bf16 products only: rounded once, where it is written.
        let d_qkv = cols_from_heads(
            self.prec == Prec::Bf16,
            &[(&dq, 0, hq), (&dk, nq, hkv), (&dv, nq + nk, hkv)],
            width,
            (b, t, dh),
        );
        drop((dq, dk, dv));
        let (d_wqkv, dn) = matmul_new_pair(
            self.prec,
            ((width, d, rows), d_qkv.rows_t(width), s.n.rows(d)),
            ((rows, d, width), d_qkv.rows(width), Mat::rows(wqkv, d)),
        )?;
        drop(d_qkv);
        let mut d_pack = vec![T::ZERO; d];
        let dh = norm_residual_bwd(h, w, &dn, g, T::from_f64(self.eps), &mut d_pack);
        d_pack.extend_from_slice(&d_wqkv);
        Ok((dh, d_pack, d_wo))
    }

    fn cpu_fwd_typed<T: Float>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<CpuStorage> {
        let AttnBlockDims { b, t, .. } = self.dims;
        let (_, d, nq, nk) = self.sizes();
        let name = self.name();
        let h = fwd_slice::<T>(name, s1, l1, &[b, t, d])?;
        let pack = fwd_slice::<T>(name, s2, l2, &[1 + nq + 2 * nk, d])?;
        let wo = fwd_slice::<T>(name, s3, l3, &[d, nq])?;
        let (out, saved) = with_slices::<T, _>(&[&self.cos, &self.sin], |cs| {
            self.forward(h, pack, wo, (cs[0], cs[1]))
        })?;
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(saved));
        }
        Ok(T::storage(out))
    }

    fn bwd_typed<T: Float>(
        &self,
        h: &Tensor,
        pack: &Tensor,
        wo: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (dh, dp, dwo) = with_slices::<T, _>(&[h, pack, wo, g, &self.cos, &self.sin], |s| {
            let inputs = (s[0], s[1], s[2], s[3]);
            let tables = (s[4], s[5]);
            let saved = match take_saved::<AttnSaved<T>>(&self.saved) {
                Some(saved) => saved,
                None => self.forward(s[0], s[1], s[2], tables)?.1,
            };
            self.backward(inputs, tables, &saved)
        })?;
        Ok((
            Tensor::from_vec(dh, h.shape(), &Device::Cpu)?,
            Tensor::from_vec(dp, pack.shape(), &Device::Cpu)?,
            Tensor::from_vec(dwo, wo.shape(), &Device::Cpu)?,
        ))
    }
}

fused_layer_op!(AttnBlockOp, "mor-attention-block", |op: &AttnBlockOp| {
    let AttnBlockDims { b, t, d, .. } = op.dims;
    Shape::from((b, t, d))
});

#[cfg(test)]
mod tests {
    use super::*;

    /// `c[i][j] = Σ_k a(i, k) b(k, j)` with element accessors, in f64.
    fn naive(
        (m, n, k): (usize, usize, usize),
        a: impl Fn(usize, usize) -> f64,
        b: impl Fn(usize, usize) -> f64,
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|kk| a(i, kk) * b(kk, j)).sum();
            }
        }
        c
    }

    /// `act_new` rounds to bf16 only f32 activations asked to be bf16: the bits are those of
    /// the f32 rows `rows_new` fills (one and several blocks, both thread counts), f64 and
    /// f32-without-bf16 stay as they are; a bf16 operand is refused by f32 products.
    #[test]
    fn activations_are_rounded_where_they_are_written() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let fill32 = |r0: usize, o: &mut [f32]| {
            for (i, v) in o.iter_mut().enumerate() {
                *v = ((r0 * 37 + i) as f32 * 0.731).sin() * 3.0 + 1e-3;
            }
        };
        for (rows, cols) in [(3, 5), (700, 97)] {
            let full = rows_new(rows, cols, fill32).0;
            for threads in [1, 2] {
                let pool_t = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let Act::Bf16(bits) = pool_t.install(|| act_new(true, rows, cols, fill32)) else {
                    panic!("f32 with bf16 must be rounded");
                };
                let want: Vec<u16> = full.iter().map(|&v| gemm::bf16_bits(v)).collect();
                assert_eq!(bits, want, "{rows}x{cols}, {threads} threads");
                let Act::Full(same) = act_new(false, rows, cols, fill32) else {
                    panic!("f32 without bf16 must stay f32");
                };
                assert_eq!(same, full);
            }
            let Act::Full(f64s) = act_new(true, rows, cols, |r0, o: &mut [f64]| {
                o.iter_mut().for_each(|v| *v = r0 as f64 + 0.1)
            }) else {
                panic!("f64 is never rounded");
            };
            assert_eq!(f64s.len(), rows * cols);
        }
        // A bf16 operand in an f32 product (or of f64 tensors) is an error, not a silent
        // product of reinterpreted bits.
        let act = pool.install(|| act_new(true, 4, 4, fill32));
        let x = vec![1.0f32; 16];
        assert!(matmul_new(Prec::F32, (4, 4, 4), act.rows(4), Mat::rows(&x, 4)).is_err());
        let y = matmul_new(Prec::Bf16, (4, 4, 4), act.rows(4), Mat::rows(&x, 4)).unwrap();
        let z = matmul_new(
            Prec::Bf16,
            (4, 4, 4),
            Mat::rows(&rows_new(4, 4, fill32).0, 4),
            Mat::rows(&x, 4),
        )
        .unwrap();
        assert_eq!(y, z, "bits and their f32 values give the same bf16 product");
    }

    /// Plain, transposed and padded operands; overwrite and accumulate; a scale; one thread
    /// and row blocks over two; the pair; an empty inner dimension.
    #[test]
    fn products_match_a_naive_product() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 7, 3),
            (67, 33, 129),
            (40, 17, 0),
            (300, 9, 250),
        ] {
            // a: [m, k] stored transposed as [k, m + 2]; b: [k, n] row-major with stride n + 1.
            let at: Vec<f64> = (0..k * (m + 2)).map(|i| (i as f64 * 0.31).sin()).collect();
            let b: Vec<f64> = (0..k * (n + 1)).map(|i| (i as f64 * 0.17).cos()).collect();
            let am = Mat {
                data: &at,
                rs: 1,
                cs: m + 2,
            };
            let bm = Mat {
                data: &b,
                rs: n + 1,
                cs: 1,
            };
            let want = naive(
                (m, n, k),
                |i, kk| at[kk * (m + 2) + i],
                |kk, j| b[kk * (n + 1) + j],
            );
            for threads in [1, 2] {
                pool.install(|| {
                    // dst rows padded to n + 3, pre-filled with 1 for the accumulating case.
                    let mut d = vec![1.0; m * (n + 3)];
                    matmul_scaled(
                        Prec::F32,
                        (m, n, k),
                        am,
                        bm,
                        (&mut d, n + 3),
                        true,
                        (0.5, threads),
                    )
                    .unwrap();
                    let mut e = vec![f64::NAN; m * (n + 3)];
                    matmul_scaled(
                        Prec::F32,
                        (m, n, k),
                        am,
                        bm,
                        (&mut e, n + 3),
                        false,
                        (1.0, threads),
                    )
                    .unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let w = want[i * n + j];
                            assert!((d[i * (n + 3) + j] - (1.0 + 0.5 * w)).abs() < 1e-12);
                            assert!((e[i * (n + 3) + j] - w).abs() < 1e-12, "{m}x{n}x{k}");
                        }
                    }
                });
            }
            let fresh = pool
                .install(|| matmul_new(Prec::F32, (m, n, k), am, bm))
                .unwrap();
            let (p1, p2) = pool
                .install(|| matmul_new_pair(Prec::F32, ((m, n, k), am, bm), ((m, n, k), am, bm)))
                .unwrap();
            for (i, &w) in want.iter().enumerate() {
                assert!((fresh[i] - w).abs() < 1e-12 && (p1[i] - w).abs() < 1e-12);
                assert!((p2[i] - w).abs() < 1e-12);
            }
        }
        // Operands too short for the stated dims are an error, not a read out of bounds.
        let short = [0.0f64; 5];
        let mut d = [0.0f64; 4];
        let m = Mat::rows(&short, 3);
        assert!(matmul(Prec::F32, (2, 2, 3), m, m, &mut d, 2, false).is_err());
        assert!(matmul_new(Prec::F32, (2, 2, 3), m, m).is_err());
    }
}
