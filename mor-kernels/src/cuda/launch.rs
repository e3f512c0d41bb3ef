//! Launch-configuration maths of the CUDA kernels: grid and block sizes, shared memory, and
//! the work plans of the top-k and decode-attention kernels.
//!
//! Everything here is plain Rust on plain numbers, so it is tested on machines without a
//! GPU. Each plan validates its input and returns an error instead of a launch that the
//! driver would refuse (a zero-sized grid, a grid dimension over its limit, shared memory
//! over the default 48 KiB, a dimension that does not fit the kernels' `u32` arguments).

use crate::{Error, Result};

/// Threads in a warp.
pub const WARP: u32 = 32;
/// The most threads a block may have.
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;
/// The largest `gridDim.x`.
pub const MAX_GRID_X: u64 = (1 << 31) - 1;
/// The largest `gridDim.y` and `gridDim.z`.
pub const MAX_GRID_YZ: u64 = 65_535;
/// Shared memory a block may use without opting in to more (48 KiB on every architecture
/// since sm_70).
pub const SHARED_MEM_LIMIT: u32 = 48 * 1024;
/// Threads per block of the elementwise (grid-stride) kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Cap on the blocks of a grid-stride kernel: enough to fill any current GPU several times.
pub const ELEMENTWISE_MAX_BLOCKS: u64 = 65_536;
/// Threads per block of the warp-per-row kernels (8 rows per block).
pub const WARP_ROW_THREADS: u32 = 256;
/// Blocks of the RMSNorm backward, each writing one partial sum of the weight gradient.
pub const RMS_NORM_BWD_MAX_BLOCKS: u64 = 256;
/// Bins of one radix-select pass (8 bits of the key).
pub const TOPK_RADIX_BINS: u32 = 256;
/// Radix-select passes over a 32-bit key.
pub const TOPK_PASSES: u32 = 4;
/// Threads per block of the decode-attention kernels.
pub const DECODE_THREADS: u32 = 128;
/// The largest head dimension of the decode-attention kernel (8 values per lane).
pub const DECODE_MAX_HEAD_DIM: usize = 256;
/// Tokens per split-K part of decode attention, unless the caller picks another size.
pub const DECODE_DEFAULT_PART_TOKENS: usize = 256;

/// Grid, block and dynamic shared memory of one kernel launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    /// `gridDim` (x, y, z).
    pub grid: (u32, u32, u32),
    /// `blockDim` (x, y, z).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes.
    pub shared_mem_bytes: u32,
}

impl LaunchDims {
    /// Blocks in the grid.
    pub fn blocks(&self) -> u64 {
        self.grid.0 as u64 * self.grid.1 as u64 * self.grid.2 as u64
    }

    /// Threads in one block.
    pub fn threads_per_block(&self) -> u32 {
        self.block.0 * self.block.1 * self.block.2
    }

    /// Threads in the whole grid.
    pub fn threads(&self) -> u64 {
        self.blocks() * self.threads_per_block() as u64
    }

    fn one_d(blocks: u64, threads: u32, shared: u32, what: &'static str) -> Result<Self> {
        if blocks == 0 {
            return Err(invalid(what, "nothing to launch (zero blocks)".into()));
        }
        if blocks > MAX_GRID_X {
            return Err(invalid(
                what,
                format!("{blocks} blocks exceed the grid limit {MAX_GRID_X}"),
            ));
        }
        Ok(LaunchDims {
            grid: (blocks as u32, 1, 1),
            block: (threads, 1, 1),
            shared_mem_bytes: shared,
        })
    }
}

fn invalid(op: &'static str, msg: String) -> Error {
    Error::Invalid { op, msg }
}

/// Converts a size to the `u32` the kernels take, or fails naming the size.
pub fn to_u32(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        invalid(
            op,
            format!("{what} = {v} does not fit the kernel's u32 argument"),
        )
    })
}

/// Rounds `v` up to a multiple of `m` (`m > 0`).
pub fn round_up(v: u64, m: u64) -> u64 {
    v.div_ceil(m) * m
}

/// A grid-stride elementwise launch over `n` elements: [`ELEMENTWISE_THREADS`] threads per
/// block and at most [`ELEMENTWISE_MAX_BLOCKS`] blocks; each thread then loops.
pub fn elementwise(n: u64) -> Result<LaunchDims> {
    let blocks = n
        .div_ceil(ELEMENTWISE_THREADS as u64)
        .min(ELEMENTWISE_MAX_BLOCKS);
    LaunchDims::one_d(blocks, ELEMENTWISE_THREADS, 0, "elementwise launch")
}

/// Iterations of the grid-stride loop that each thread of `dims` runs to cover `n` elements.
pub fn grid_stride_iterations(dims: &LaunchDims, n: u64) -> u64 {
    n.div_ceil(dims.threads().max(1))
}

/// One warp per row, [`WARP_ROW_THREADS`] threads (8 rows) per block.
pub fn warp_per_row(rows: u64) -> Result<LaunchDims> {
    let per_block = (WARP_ROW_THREADS / WARP) as u64;
    LaunchDims::one_d(
        rows.div_ceil(per_block),
        WARP_ROW_THREADS,
        0,
        "warp-per-row launch",
    )
}

/// Rows that one block of a [`warp_per_row`] launch handles.
pub fn rows_per_block_warp(dims: &LaunchDims) -> u64 {
    (dims.block.0 / WARP) as u64
}

/// Threads of a block that reduces rows of `cols` elements: one thread per element up to
/// [`MAX_THREADS_PER_BLOCK`], rounded up to whole warps.
pub fn row_block_threads(cols: u64) -> u32 {
    round_up(cols.max(1), WARP as u64).min(MAX_THREADS_PER_BLOCK as u64) as u32
}

/// Threads per block of the row-loop kernels (gather and scatter of token rows).
pub const ROW_LOOP_MAX_THREADS: u32 = 256;

/// Blocks stride over `rows` rows and threads over the `cols` columns of a row: one
/// division per row instead of per element. At most [`ELEMENTWISE_MAX_BLOCKS`] blocks of at
/// most [`ROW_LOOP_MAX_THREADS`] threads.
pub fn row_loop(rows: u64, cols: u64) -> Result<LaunchDims> {
    if cols == 0 {
        return Err(invalid("row-loop launch", "rows have zero columns".into()));
    }
    let threads = row_block_threads(cols).min(ROW_LOOP_MAX_THREADS);
    LaunchDims::one_d(
        rows.min(ELEMENTWISE_MAX_BLOCKS),
        threads,
        0,
        "row-loop launch",
    )
}

/// One block per row (grid-stride over rows past the grid limit), for the RMSNorm forward.
pub fn block_per_row(rows: u64, cols: u64) -> Result<LaunchDims> {
    if cols == 0 {
        return Err(invalid(
            "block-per-row launch",
            "rows have zero columns".into(),
        ));
    }
    LaunchDims::one_d(
        rows.min(MAX_GRID_X),
        row_block_threads(cols),
        0,
        "block-per-row launch",
    )
}

/// The RMSNorm backward: at most [`RMS_NORM_BWD_MAX_BLOCKS`] blocks, each looping over rows
/// and writing one partial row of the weight gradient.
pub fn rms_norm_bwd(rows: u64, cols: u64) -> Result<LaunchDims> {
    if cols == 0 {
        return Err(invalid(
            "rms_norm backward launch",
            "rows have zero columns".into(),
        ));
    }
    LaunchDims::one_d(
        rows.min(RMS_NORM_BWD_MAX_BLOCKS),
        row_block_threads(cols),
        0,
        "rms_norm backward launch",
    )
}

/// Work plan of the per-sequence top-k kernel (`mor_topk_sorted_*`).
///
/// One block per row sweeps the row in chunks of `chunk` elements (one per thread): four
/// radix passes of 8 bits find the k-th largest key, and one compaction sweep writes the
/// chosen positions in ascending order. Nothing scales with the row length except the
/// number of chunks, so rows of any length up to `u32::MAX` work without a host round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopkPlan {
    /// Rows (sequences).
    pub rows: u64,
    /// Candidates per row.
    pub n: u64,
    /// Tokens kept per row.
    pub k: u64,
    /// Elements one block sweep covers (= threads per block).
    pub chunk: u64,
    /// Chunks per sweep, `ceil(n / chunk)`.
    pub n_chunks: u64,
    /// Sweeps over the row: the radix passes plus the compaction.
    pub sweeps: u32,
    /// The launch.
    pub dims: LaunchDims,
    /// Static shared memory of the kernel in bytes (histogram, per-warp counts, five
    /// scalars); checked against [`SHARED_MEM_LIMIT`].
    pub static_shared_bytes: u32,
}

impl TopkPlan {
    /// Plans top-k of `k` out of `n` candidates for each of `rows` rows.
    pub fn new(rows: u64, n: u64, k: u64) -> Result<Self> {
        const OP: &str = "topk plan";
        if n == 0 || rows == 0 {
            return Err(invalid(
                OP,
                format!("nothing to select from ({rows} rows of {n} candidates)"),
            ));
        }
        if k == 0 || k > n {
            return Err(invalid(
                OP,
                format!("k = {k} must be in 1..={n} (the candidates per row)"),
            ));
        }
        if n > u32::MAX as u64 {
            return Err(invalid(
                OP,
                format!("{n} candidates per row exceed u32::MAX"),
            ));
        }
        let threads = row_block_threads(n);
        let dims = LaunchDims::one_d(rows, threads, 0, OP)?;
        let static_shared_bytes = 4 * (TOPK_RADIX_BINS + MAX_THREADS_PER_BLOCK / WARP + 5);
        if static_shared_bytes > SHARED_MEM_LIMIT {
            return Err(invalid(
                OP,
                format!("{static_shared_bytes} B of shared memory"),
            ));
        }
        let chunk = threads as u64;
        Ok(TopkPlan {
            rows,
            n,
            k,
            chunk,
            n_chunks: n.div_ceil(chunk),
            sweeps: TOPK_PASSES + 1,
            dims,
            static_shared_bytes,
        })
    }

    /// The half-open element range `[start, end)` of chunk `c` of a row.
    pub fn chunk_range(&self, c: u64) -> (u64, u64) {
        let start = c * self.chunk;
        (start.min(self.n), (start + self.chunk).min(self.n))
    }

    /// Global-memory reads of scores per row over the whole kernel.
    pub fn reads_per_row(&self) -> u64 {
        self.sweeps as u64 * self.n
    }
}

/// Shapes of a paged decode-attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeShape {
    /// Requests (one query token each).
    pub batch: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads (`q_heads % kv_heads == 0`).
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Tokens per cache block.
    pub block_tokens: usize,
    /// Columns of the block table (blocks per request at most).
    pub max_blocks: usize,
    /// Blocks in the cache pool.
    pub num_blocks: usize,
}

/// Work plan of split-K paged decode attention (`mor_paged_decode_partial_*` then
/// `mor_paged_decode_combine_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    /// The shapes planned for.
    pub shape: DecodeShape,
    /// Tokens per part.
    pub part_tokens: usize,
    /// Parts per request: `ceil(max_blocks * block_tokens / part_tokens)`, at least 1.
    pub n_parts: usize,
    /// Launch of the partial kernel: grid (parts, query heads, requests).
    pub partial: LaunchDims,
    /// Launch of the combine kernel: grid (query heads, requests).
    pub combine: LaunchDims,
    /// f32 elements of the partial buffer: `batch * q_heads * n_parts * (head_dim + 2)`.
    pub partial_len: usize,
}

impl DecodePlan {
    /// Plans decode attention for `shape`, with `part_tokens` tokens per split-K part.
    pub fn new(shape: DecodeShape, part_tokens: usize) -> Result<Self> {
        const OP: &str = "paged decode attention plan";
        let s = shape;
        if s.batch == 0
            || s.q_heads == 0
            || s.kv_heads == 0
            || s.block_tokens == 0
            || part_tokens == 0
        {
            return Err(invalid(
                OP,
                format!("every size must be positive: {s:?}, part_tokens = {part_tokens}"),
            ));
        }
        if !s.q_heads.is_multiple_of(s.kv_heads) {
            return Err(invalid(
                OP,
                format!(
                    "q_heads = {} is not a multiple of kv_heads = {}",
                    s.q_heads, s.kv_heads
                ),
            ));
        }
        if s.head_dim == 0 || s.head_dim > DECODE_MAX_HEAD_DIM {
            return Err(invalid(
                OP,
                format!(
                    "head_dim = {} must be in 1..={DECODE_MAX_HEAD_DIM}",
                    s.head_dim
                ),
            ));
        }
        let capacity = s
            .max_blocks
            .checked_mul(s.block_tokens)
            .ok_or_else(|| invalid(OP, "max_blocks * block_tokens overflows".into()))?;
        let n_parts = capacity.div_ceil(part_tokens).max(1);
        if n_parts as u64 > MAX_GRID_X {
            return Err(invalid(
                OP,
                format!("{n_parts} parts exceed the grid limit"),
            ));
        }
        if s.q_heads as u64 > MAX_GRID_YZ || s.batch as u64 > MAX_GRID_YZ {
            return Err(invalid(
                OP,
                format!(
                    "q_heads = {} and batch = {} must each be at most {MAX_GRID_YZ}",
                    s.q_heads, s.batch
                ),
            ));
        }
        let warps = DECODE_THREADS / WARP;
        let shared = warps as usize * (s.head_dim + 2) * 4;
        if shared > SHARED_MEM_LIMIT as usize {
            return Err(invalid(OP, format!("{shared} B of shared memory")));
        }
        for (what, v) in [
            ("q_heads", s.q_heads),
            ("kv_heads", s.kv_heads),
            ("block_tokens", s.block_tokens),
            ("max_blocks", s.max_blocks),
            ("num_blocks", s.num_blocks),
            ("part_tokens", part_tokens),
            ("capacity", capacity),
        ] {
            to_u32(OP, what, v)?;
        }
        let partial_len = s
            .batch
            .checked_mul(s.q_heads)
            .and_then(|v| v.checked_mul(n_parts))
            .and_then(|v| v.checked_mul(s.head_dim + 2))
            .ok_or_else(|| invalid(OP, "the partial buffer size overflows".into()))?;
        Ok(DecodePlan {
            shape: s,
            part_tokens,
            n_parts,
            partial: LaunchDims {
                grid: (n_parts as u32, s.q_heads as u32, s.batch as u32),
                block: (DECODE_THREADS, 1, 1),
                shared_mem_bytes: shared as u32,
            },
            combine: LaunchDims {
                grid: (s.q_heads as u32, s.batch as u32, 1),
                block: (DECODE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            partial_len,
        })
    }

    /// The token range `[start, end)` that part `p` covers for a request of `seq_len`
    /// cached tokens (empty when the request is shorter); mirrors the kernel.
    pub fn part_range(&self, p: usize, seq_len: usize) -> (usize, usize) {
        let len = seq_len.min(self.shape.max_blocks * self.shape.block_tokens);
        let start = p * self.part_tokens;
        (start.min(len), (start + self.part_tokens).min(len))
    }
}

/// Largest head dimension of the flash-attention kernels (`MOR_FA_MAX_DH`).
pub const FLASH_MAX_HEAD_DIM: usize = 128;
/// Warps per block of the flash-attention kernels (`MOR_FA_WARPS`).
pub const FLASH_WARPS: u32 = 4;
/// Keys per shared-memory tile of the forward and dQ kernels (`MOR_FA_BK`, one per lane).
pub const FLASH_KEY_TILE: usize = 32;
/// Query rows per warp of the forward kernel (`MOR_FA_FWD_ROWS`).
pub const FLASH_FWD_ROWS: usize = 4;
/// Query rows per warp of the dQ kernel (`MOR_FA_DQ_ROWS`).
pub const FLASH_DQ_ROWS: usize = 3;
/// Keys per warp of the dK/dV kernel (`MOR_FA_DKV_KEYS`).
pub const FLASH_DKV_KEYS: usize = 3;
/// Query rows per tile of the dK/dV kernel (one per lane).
pub const FLASH_QUERY_TILE: usize = 32;

/// Shapes of one flash-attention call: `q: [batch, q_heads, t, head_dim]`,
/// `k, v: [batch, kv_heads, s, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashShape {
    /// Batch rows.
    pub batch: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads (`q_heads % kv_heads == 0`).
    pub kv_heads: usize,
    /// Queries per row.
    pub t: usize,
    /// Keys per row.
    pub s: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// The launches of flash attention: forward, dQ and dK/dV (the kernels of
/// `flash_attention.cu`), with the shared memory each needs for the head dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashPlan {
    /// The shapes planned for.
    pub shape: FlashShape,
    /// `mor_flash_attn_fwd`: one block per [`FLASH_WARPS`] × [`FLASH_FWD_ROWS`] query rows
    /// of one (head, batch row).
    pub fwd: LaunchDims,
    /// `mor_flash_attn_bwd_dq`: one block per [`FLASH_WARPS`] × [`FLASH_DQ_ROWS`] query
    /// rows of one (head, batch row).
    pub dq: LaunchDims,
    /// `mor_flash_attn_bwd_dkv`: one block per [`FLASH_WARPS`] × [`FLASH_DKV_KEYS`] keys of
    /// one (key/value head, batch row).
    pub dkv: LaunchDims,
}

impl FlashPlan {
    /// Plans the three kernels for `shape`.
    ///
    /// # Errors
    /// An empty shape, `q_heads % kv_heads != 0`, a head dimension past
    /// [`FLASH_MAX_HEAD_DIM`], heads or batch rows past the grid's y/z limit, or shared
    /// memory past [`SHARED_MEM_LIMIT`].
    pub fn new(shape: FlashShape) -> Result<Self> {
        const OP: &str = "flash_attention";
        let s = shape;
        if s.batch == 0 || s.q_heads == 0 || s.kv_heads == 0 || s.t == 0 || s.s == 0 {
            return Err(invalid(OP, format!("an empty shape {s:?}")));
        }
        if !s.q_heads.is_multiple_of(s.kv_heads) {
            return Err(invalid(
                OP,
                format!(
                    "q_heads = {} is not a multiple of kv_heads = {}",
                    s.q_heads, s.kv_heads
                ),
            ));
        }
        if s.head_dim == 0 || s.head_dim > FLASH_MAX_HEAD_DIM {
            return Err(invalid(
                OP,
                format!(
                    "head_dim = {} must be in 1..={FLASH_MAX_HEAD_DIM}",
                    s.head_dim
                ),
            ));
        }
        for (what, v) in [
            ("batch", s.batch),
            ("q_heads", s.q_heads),
            ("kv_heads", s.kv_heads),
        ] {
            if v as u64 > MAX_GRID_YZ {
                return Err(invalid(
                    OP,
                    format!("{what} = {v} exceeds the grid limit {MAX_GRID_YZ}"),
                ));
            }
        }
        for (what, v) in [("t", s.t), ("s", s.s)] {
            to_u32(OP, what, v)?;
        }
        let dh = s.head_dim;
        let warps = FLASH_WARPS as usize;
        let bk = FLASH_KEY_TILE;
        // Shared memory in f32 words, as laid out by the kernels.
        let fwd_words = bk * (dh + 1) + bk * dh + warps * FLASH_FWD_ROWS * dh + bk;
        let dq_words = 2 * bk * (dh + 1) + 2 * warps * FLASH_DQ_ROWS * dh + bk;
        let qt = FLASH_QUERY_TILE;
        let dkv_words = 2 * qt * (dh + 1) + 2 * warps * FLASH_DKV_KEYS * dh + 3 * qt;
        let dims = |blocks: usize, heads: usize, words: usize| -> Result<LaunchDims> {
            let bytes = words * 4;
            if bytes > SHARED_MEM_LIMIT as usize {
                return Err(invalid(
                    OP,
                    format!("{bytes} bytes of shared memory exceed {SHARED_MEM_LIMIT}"),
                ));
            }
            if blocks as u64 > MAX_GRID_X {
                return Err(invalid(
                    OP,
                    format!("{blocks} blocks exceed the grid limit {MAX_GRID_X}"),
                ));
            }
            Ok(LaunchDims {
                grid: (blocks as u32, heads as u32, s.batch as u32),
                block: (FLASH_WARPS * WARP, 1, 1),
                shared_mem_bytes: bytes as u32,
            })
        };
        Ok(FlashPlan {
            shape,
            fwd: dims(s.t.div_ceil(warps * FLASH_FWD_ROWS), s.q_heads, fwd_words)?,
            dq: dims(s.t.div_ceil(warps * FLASH_DQ_ROWS), s.q_heads, dq_words)?,
            dkv: dims(s.s.div_ceil(warps * FLASH_DKV_KEYS), s.kv_heads, dkv_words)?,
        })
    }
}
