//! The block pool: preallocated fixed-size blocks of K, V and positions, with a free list.

use super::KvView;
use crate::{Error, Result};
use std::borrow::Cow;
use std::fmt;

const POOL: &str = "block_pool";

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid {
        policy: POOL,
        msg: msg.into(),
    }
}

/// How the pool stores K and V (attention arithmetic is f32 either way).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum KvPrecision {
    /// 4 bytes per element, stored exactly.
    #[default]
    F32,
    /// 2 bytes per element: each K and V element is rounded to bfloat16 (round to nearest,
    /// ties to even) when stored and widened back to f32 when read. Halves the bytes that
    /// decode attention streams; relative error of a stored element at most `2^-8`.
    Bf16,
}

impl KvPrecision {
    /// Bytes per stored element.
    pub fn bytes(self) -> usize {
        match self {
            KvPrecision::F32 => 4,
            KvPrecision::Bf16 => 2,
        }
    }

    /// `"f32"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            KvPrecision::F32 => "f32",
            KvPrecision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for KvPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `x` rounded to bfloat16 (nearest, ties to even; NaN stays NaN), as its bits.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// The f32 value of bfloat16 bits `h`.
#[inline(always)]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// K and V storage of a pool.
enum Store {
    F32 { k: Vec<f32>, v: Vec<f32> },
    Bf16 { k: Vec<u16>, v: Vec<u16> },
}

/// Stored rows, borrowed from the pool in its storage precision.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Rows<'a> {
    /// The rows in f32 (borrowed when stored in f32).
    pub(crate) fn to_f32(self) -> Cow<'a, [f32]> {
        match self {
            Rows::F32(x) => Cow::Borrowed(x),
            Rows::Bf16(x) => Cow::Owned(x.iter().map(|&h| from_bf16(h)).collect()),
        }
    }

    /// Asks the CPU to bring the rows into the cache: the nearest level when `near`, else
    /// the second level (a hint: no effect on values, and nothing off x86-64).
    #[inline(always)]
    pub(crate) fn prefetch(self, near: bool) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
            let (p, bytes) = match self {
                Rows::F32(x) => (x.as_ptr().cast::<i8>(), std::mem::size_of_val(x)),
                Rows::Bf16(x) => (x.as_ptr().cast::<i8>(), std::mem::size_of_val(x)),
            };
            for off in (0..bytes).step_by(64) {
                // SAFETY: a prefetch never faults; the address is inside the rows.
                unsafe {
                    if near {
                        _mm_prefetch::<_MM_HINT_T0>(p.add(off))
                    } else {
                        _mm_prefetch::<_MM_HINT_T1>(p.add(off))
                    }
                };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (self, near);
    }

    /// Writes the first `out.len()` elements in f32 into `out` (at most the rows' length).
    #[inline(always)]
    pub(crate) fn copy_to(self, out: &mut [f32]) {
        match self {
            Rows::F32(x) => out.copy_from_slice(&x[..out.len()]),
            Rows::Bf16(x) => {
                for (o, &h) in out.iter_mut().zip(x) {
                    *o = from_bf16(h);
                }
            }
        }
    }
}

/// Preallocated storage for decode-time K/V in blocks of `block_tokens` tokens.
///
/// A block holds, for each of its tokens, one K row and one V row of `row = hkv · dh`
/// elements (f32, or bf16 under [`KvPrecision::Bf16`]; token-major, head-major inside a
/// row) and the token's position. All storage is
/// allocated once by [`BlockPool::new`]; blocks are handed out from a free list, so storing a
/// token never reallocates.
pub struct BlockPool {
    block_tokens: usize,
    row: usize,
    num_blocks: usize,
    precision: KvPrecision,
    store: Store,
    pos: Vec<u32>,
    free: Vec<u32>,
    allocated: Vec<bool>,
    tokens: usize,
}

impl fmt::Debug for BlockPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockPool")
            .field("block_tokens", &self.block_tokens)
            .field("row", &self.row)
            .field("num_blocks", &self.num_blocks)
            .field("precision", &self.precision)
            .field("free_blocks", &self.free.len())
            .field("tokens_stored", &self.tokens)
            .finish()
    }
}

/// The blocks of one (request, slot) and how many tokens they hold.
///
/// A page belongs to the pool it was filled from; hand it back with [`BlockPool::release`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    blocks: Vec<u32>,
    len: usize,
}

impl Page {
    /// An empty page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the page holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The page table: block ids in token order.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
}

fn alloc_zeroed<T: Copy + Default>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|e| invalid(format!("cannot allocate {n} {what} for the pool: {e}")))?;
    v.resize(n, T::default());
    Ok(v)
}

impl BlockPool {
    /// A pool of `num_blocks` blocks of `block_tokens` tokens with K and V rows of `row`
    /// floats, all allocated now.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `block_tokens` or `row` is 0, when the sizes overflow, when
    /// `num_blocks` exceeds `u32::MAX`, or when the memory cannot be allocated.
    pub fn new(block_tokens: usize, row: usize, num_blocks: usize) -> Result<Self> {
        Self::with_precision(block_tokens, row, num_blocks, KvPrecision::F32)
    }

    /// [`BlockPool::new`] storing K and V in `precision`.
    ///
    /// # Errors
    /// As [`BlockPool::new`].
    pub fn with_precision(
        block_tokens: usize,
        row: usize,
        num_blocks: usize,
        precision: KvPrecision,
    ) -> Result<Self> {
        if block_tokens == 0 || row == 0 {
            return Err(invalid(format!(
                "block_tokens ({block_tokens}) and row ({row}) must be >= 1"
            )));
        }
        if u32::try_from(num_blocks).is_err() {
            return Err(invalid(format!(
                "{num_blocks} blocks exceed the u32 block id range"
            )));
        }
        let tokens = num_blocks.checked_mul(block_tokens).ok_or_else(|| {
            invalid(format!(
                "{num_blocks} blocks × {block_tokens} tokens overflows"
            ))
        })?;
        let floats = tokens
            .checked_mul(row)
            .and_then(|f| f.checked_mul(8).map(|_| f))
            .ok_or_else(|| invalid(format!("{tokens} tokens × {row} floats overflows")))?;
        Ok(BlockPool {
            block_tokens,
            row,
            num_blocks,
            precision,
            store: match precision {
                KvPrecision::F32 => Store::F32 {
                    k: alloc_zeroed(floats, "K floats")?,
                    v: alloc_zeroed(floats, "V floats")?,
                },
                KvPrecision::Bf16 => Store::Bf16 {
                    k: alloc_zeroed(floats, "K bf16 values")?,
                    v: alloc_zeroed(floats, "V bf16 values")?,
                },
            },
            pos: alloc_zeroed(tokens, "positions")?,
            // Pop from the end: low ids are handed out first.
            free: (0..num_blocks as u32).rev().collect(),
            allocated: vec![false; num_blocks],
            tokens: 0,
        })
    }

    /// How K and V are stored.
    pub fn precision(&self) -> KvPrecision {
        self.precision
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Floats per K (or V) row, `hkv · dh`.
    pub fn row(&self) -> usize {
        self.row
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks on the free list.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks in use.
    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free.len()
    }

    /// Bytes of one block: `block_tokens × 2 × row × e` with `e` = 4 bytes per element in
    /// f32, 2 in bf16 (K and V; the positions are bookkeeping and not counted).
    pub fn block_bytes(&self) -> usize {
        self.block_tokens * 2 * self.row * self.precision.bytes()
    }

    /// Bytes of the whole pool.
    pub fn bytes_reserved(&self) -> usize {
        self.num_blocks * self.block_bytes()
    }

    /// Bytes of the blocks in use.
    pub fn bytes_used(&self) -> usize {
        self.used_blocks() * self.block_bytes()
    }

    /// Tokens stored over all pages.
    pub fn tokens_stored(&self) -> usize {
        self.tokens
    }

    /// Exact bytes of the stored tokens: `tokens × 2 × row × e` (`e` as in
    /// [`BlockPool::block_bytes`]).
    pub fn bytes_stored(&self) -> usize {
        self.tokens * 2 * self.row * self.precision.bytes()
    }

    /// Whether storing one more token in `page` takes a new block.
    pub fn needs_block(&self, page: &Page) -> bool {
        page.len.is_multiple_of(self.block_tokens)
    }

    /// Appends one token to `page`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `k` or `v` is not `row` long; [`Error::Exhausted`] when a new
    /// block is needed and none is free. On error nothing changes.
    pub fn push(&mut self, page: &mut Page, pos: u32, k: &[f32], v: &[f32]) -> Result<()> {
        if k.len() != self.row || v.len() != self.row {
            return Err(invalid(format!(
                "k and v must hold hkv·dh = {} floats, got {} and {}",
                self.row,
                k.len(),
                v.len()
            )));
        }
        if self.needs_block(page) {
            let id = self.free.pop().ok_or(Error::Exhausted {
                needed: 1,
                free: 0,
                total: self.num_blocks,
            })?;
            self.allocated[id as usize] = true;
            page.blocks.push(id);
        }
        let t = self.token_index(page, page.len);
        let r = t * self.row..(t + 1) * self.row;
        match &mut self.store {
            Store::F32 { k: ks, v: vs } => {
                ks[r.clone()].copy_from_slice(k);
                vs[r].copy_from_slice(v);
            }
            Store::Bf16 { k: ks, v: vs } => {
                for (d, &x) in ks[r.clone()].iter_mut().zip(k) {
                    *d = to_bf16(x);
                }
                for (d, &x) in vs[r].iter_mut().zip(v) {
                    *d = to_bf16(x);
                }
            }
        }
        self.pos[t] = pos;
        page.len += 1;
        self.tokens += 1;
        Ok(())
    }

    /// Returns every block of `page` to the free list and empties it.
    pub fn release(&mut self, page: &mut Page) {
        for &id in &page.blocks {
            // A page only ever holds blocks this pool handed out; the check keeps a page
            // from another pool from corrupting the free list.
            if let Some(a) = self.allocated.get_mut(id as usize) {
                if *a {
                    *a = false;
                    self.free.push(id);
                }
            }
        }
        self.tokens -= page.len.min(self.tokens);
        page.blocks.clear();
        page.len = 0;
    }

    /// The view of `page` (positions ascending) with rows split into `num_kv_heads` heads.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `num_kv_heads` is 0 or does not divide the row length, or when
    /// `page` holds a block this pool does not have.
    pub fn view<'a>(&'a self, page: &'a Page, num_kv_heads: usize) -> Result<KvView<'a>> {
        if num_kv_heads == 0 || !self.row.is_multiple_of(num_kv_heads) {
            return Err(invalid(format!(
                "{num_kv_heads} kv heads do not divide the row of {} floats",
                self.row
            )));
        }
        if page.blocks.iter().any(|&b| b as usize >= self.num_blocks)
            || page.len > page.blocks.len() * self.block_tokens
        {
            return Err(invalid("the page does not belong to this pool"));
        }
        Ok(KvView::new(
            self,
            page,
            None,
            num_kv_heads,
            self.row / num_kv_heads,
        ))
    }

    /// Index of token `i` of `page` in the flat storage.
    fn token_index(&self, page: &Page, i: usize) -> usize {
        page.blocks[i / self.block_tokens] as usize * self.block_tokens + i % self.block_tokens
    }

    /// Position of token `i` of `page` (`i < page.len()`).
    pub(crate) fn pos_at(&self, page: &Page, i: usize) -> u32 {
        self.pos[self.token_index(page, i)]
    }

    /// The last position stored in `page`.
    pub fn last_pos(&self, page: &Page) -> Option<u32> {
        (page.len > 0).then(|| self.pos_at(page, page.len - 1))
    }

    /// Whether `page` (positions ascending) holds position `p`.
    pub fn contains_pos(&self, page: &Page, p: u32) -> bool {
        let (mut lo, mut hi) = (0, page.len);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.pos_at(page, mid).cmp(&p) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return true,
            }
        }
        false
    }

    /// The K and V rows of the flat tokens `t0..t1`.
    fn rows(&self, t0: usize, t1: usize) -> (Rows<'_>, Rows<'_>) {
        let r = t0 * self.row..t1 * self.row;
        match &self.store {
            Store::F32 { k, v } => (Rows::F32(&k[r.clone()]), Rows::F32(&v[r])),
            Store::Bf16 { k, v } => (Rows::Bf16(&k[r.clone()]), Rows::Bf16(&v[r])),
        }
    }

    /// Token `i` of `page`: its position, K row and V row (`i < page.len()`).
    pub(crate) fn token(&self, page: &Page, i: usize) -> (u32, Rows<'_>, Rows<'_>) {
        let t = self.token_index(page, i);
        let (k, v) = self.rows(t, t + 1);
        (self.pos[t], k, v)
    }

    /// Block `b` of `page`: the positions, K rows and V rows of its tokens.
    pub(crate) fn block(&self, page: &Page, b: usize) -> (&[u32], Rows<'_>, Rows<'_>) {
        let n = (page.len - b * self.block_tokens).min(self.block_tokens);
        let t = page.blocks[b] as usize * self.block_tokens;
        let (k, v) = self.rows(t, t + n);
        (&self.pos[t..t + n], k, v)
    }
}
