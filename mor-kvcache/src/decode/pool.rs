//! The block pool: preallocated fixed-size blocks of K, V and positions, with a free list.

use super::KvView;
use crate::{Error, Result};
use std::fmt;

const POOL: &str = "block_pool";

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid {
        policy: POOL,
        msg: msg.into(),
    }
}

/// Preallocated storage for decode-time K/V in blocks of `block_tokens` tokens.
///
/// A block holds, for each of its tokens, one K row and one V row of `row = hkv · dh` f32
/// (token-major, head-major inside a row) and the token's position. All storage is
/// allocated once by [`BlockPool::new`]; blocks are handed out from a free list, so storing a
/// token never reallocates.
pub struct BlockPool {
    block_tokens: usize,
    row: usize,
    num_blocks: usize,
    k: Vec<f32>,
    v: Vec<f32>,
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
            k: alloc_zeroed(floats, "K floats")?,
            v: alloc_zeroed(floats, "V floats")?,
            pos: alloc_zeroed(tokens, "positions")?,
            // Pop from the end: low ids are handed out first.
            free: (0..num_blocks as u32).rev().collect(),
            allocated: vec![false; num_blocks],
            tokens: 0,
        })
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

    /// Bytes of one block: `block_tokens × 2 × row × 4` (K and V in f32; the positions are
    /// bookkeeping and not counted).
    pub fn block_bytes(&self) -> usize {
        self.block_tokens * 2 * self.row * 4
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

    /// Exact bytes of the stored tokens: `tokens × 2 × row × 4`.
    pub fn bytes_stored(&self) -> usize {
        self.tokens * 2 * self.row * 4
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
        self.k[t * self.row..(t + 1) * self.row].copy_from_slice(k);
        self.v[t * self.row..(t + 1) * self.row].copy_from_slice(v);
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

    /// Token `i` of `page`: its position, K row and V row (`i < page.len()`).
    pub(crate) fn token(&self, page: &Page, i: usize) -> (u32, &[f32], &[f32]) {
        let t = self.token_index(page, i);
        (
            self.pos[t],
            &self.k[t * self.row..(t + 1) * self.row],
            &self.v[t * self.row..(t + 1) * self.row],
        )
    }

    /// Block `b` of `page`: the positions, K rows and V rows of its tokens.
    pub(crate) fn block(&self, page: &Page, b: usize) -> (&[u32], &[f32], &[f32]) {
        let n = (page.len - b * self.block_tokens).min(self.block_tokens);
        let t = page.blocks[b] as usize * self.block_tokens;
        (
            &self.pos[t..t + n],
            &self.k[t * self.row..(t + n) * self.row],
            &self.v[t * self.row..(t + n) * self.row],
        )
    }
}
