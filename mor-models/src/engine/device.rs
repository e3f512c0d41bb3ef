//! The decode computation on a candle device: the same continuous depth-wise batching as
//! the host path, with the layer and LM-head weights and the paged KV pool resident on the
//! model's device (CUDA, or the CPU in tests: the code is device-generic candle).
//!
//! - Weights: per unique block `q: [hq·dh, d]`, `[k; v]: [2·hkv·dh, d]`, `o`, `[gate; up]`,
//!   `down`, in the engine's [`Precision`]. Norms, RoPE tables and the residual stream stay
//!   f32. RMSNorm and SwiGLU are the fused `mor_kernels` ops (their kernels on CUDA, their
//!   CPU bodies on the CPU).
//! - What bf16 rounds (`Precision::Bf16`): each layer product (q, k/v, o, gate/up, down)
//!   takes its input rounded to bf16 and returns its output in bf16 (candle's bf16 matmul;
//!   cuBLAS accumulates in f32), cast back to f32. The LM head's inputs are rounded to bf16
//!   the same way, but its product runs in f32 on those bf16 values (its weights are kept
//!   as f32 copies of the bf16 weights), so the logits are not rounded to bf16 (greedy
//!   choices are not decided by bf16 ties). With bf16 K/V (`KvPrecision::Bf16`) the
//!   stored K/V, the queries (rounded to the pool's dtype before the kernel) and the
//!   attention output (returned in the pool's dtype) are bf16.
//! - Batch invariance: every product runs with exactly [`PRODUCT_ROWS`] rows (zero rows pad
//!   the last chunk), so a token's logits are the same bits at every batch size, and
//!   batched decoding equals sequential decoding (see [`fixed_rows_mm`]).
//! - KV: one pool `k, v: [num_blocks, block_tokens, hkv, dh]` in the cache's
//!   [`KvPrecision`] ([`DeviceKvCache`]). Appends are one `scatter_set` per layer for the
//!   batch's new rows; decode attention is
//!   [`paged_decode_attention`](mor_kernels::cuda::paged_decode_attention): one thread
//!   block per (part of the sequence, query head, request), query head `h` reading KV head
//!   `h / (hq / hkv)` through the request's block table, so each K/V row is read
//!   `hq / hkv` times (once per query head of its group). The block bookkeeping (free
//!   list, page tables, positions) stays on the host; the tables of a layer call are
//!   uploaded as small `u32` tensors.
//! - Routing, merges and sampling stay on the host scheduler (they need the decisions
//!   there): the hidden rows of a phase travel once each way.
//!
//! # Transfers per phase (one [`run_layers`](DeviceCompute::run_layers) call of `n` items)
//! Up: the hidden rows `[n, d]` f32; per layer, the positions `[n]`, the rows that store
//! (`[n_w]`, only when not all do), their flat write indices (`[n_w]`, broadcast on the
//! device), the block table `[n, max_blocks]` and the visible lengths `[n]` (u32). Down:
//! the output rows `[n, d]` f32. The LM head uploads `[n, d]` and downloads the logits
//! `[n, vocab]` f32; an expert-choice routing decision uploads `[n, d]` and downloads `n`
//! gates. Embedding rows are read from a host copy of the table and travel up with the
//! prelude's input. A phase without layers moves nothing. Every download goes through
//! `mor_kernels::host_sync` and is counted there, on one counter: one read per phase with
//! layers, one per LM-head call, and per routing decision the router's own reads (its
//! `route` reads through `host_sync`) plus one read of the gates.
//!
//! # Not covered (refused with an error naming it)
//! A relaxation (LoRA / DoRA, adaption prompt, recursion encoding), the hybrid KV policy
//! (its overlay view has no paged kernel) and KV policies other than the built-in
//! `recursion_wise` and `recursive_sharing`.

use super::runner::{Flops, Tok};
use crate::model::MorModel;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use mor_core::config::Precision;
use mor_kvcache::decode::KvPrecision;
use mor_kvcache::{DecodeCache, DecodeCacheSpec, DecodeMode, KvView};
use std::cell::Cell;
use std::collections::HashMap;

const CACHE: &str = "device_kv";

/// Rows of every product of the device path: a product of `n` rows runs as
/// `ceil(n / PRODUCT_ROWS)` products of exactly this many rows (the last one padded with
/// zero rows).
pub(crate) const PRODUCT_ROWS: usize = 64;

/// `x: [n, k] · wt: [k, m]`, computed as products of exactly [`PRODUCT_ROWS`] rows.
///
/// A BLAS picks its algorithm by the product's shape (cuBLAS splits the reduction for small
/// `n`, CPU kernels tile by `n`), so the same row can come out with other roundings at
/// another batch size. With one shape for every call, each output row depends only on its
/// own input row: a token's logits are the same bits whatever else shares its batch, which is
/// what makes batched decoding equal sequential decoding token for token on the device path
/// (as the host path's packed products do). The padding costs nothing where decoding is
/// bound by reading the weights, which is the case at the batch sizes of decoding.
fn fixed_rows_mm(x: &Tensor, wt: &Tensor) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let mut outs = Vec::with_capacity(n.div_ceil(PRODUCT_ROWS));
    let mut start = 0;
    while start < n {
        let take = PRODUCT_ROWS.min(n - start);
        let mut chunk = x.narrow(0, start, take)?;
        if take < PRODUCT_ROWS {
            let pad = Tensor::zeros((PRODUCT_ROWS - take, k), x.dtype(), x.device())?;
            chunk = Tensor::cat(&[&chunk, &pad], 0)?;
        }
        outs.push(chunk.contiguous()?.matmul(wt)?.narrow(0, 0, take)?);
        start += take;
    }
    match outs.len() {
        0 => Ok(Tensor::zeros((0, wt.dim(1)?), x.dtype(), x.device())?),
        1 => Ok(outs.swap_remove(0)),
        _ => Ok(Tensor::cat(&outs, 0)?),
    }
}

fn invalid(msg: String) -> mor_kvcache::Error {
    mor_kvcache::Error::Invalid { policy: CACHE, msg }
}

fn kv_dtype(p: KvPrecision) -> DType {
    match p {
        KvPrecision::F32 => DType::F32,
        KvPrecision::Bf16 => DType::BF16,
    }
}

/// What one slot does: whether it stores and which slot's page its queries read.
#[derive(Debug, Clone, Copy)]
struct Rule {
    writes: bool,
    base: usize,
}

/// The blocks of one (request, slot) and the positions stored in them.
#[derive(Debug, Clone, Default)]
struct Page {
    blocks: Vec<u32>,
    pos: Vec<u32>,
}

/// A paged KV cache whose K/V storage lives on a candle device; the bookkeeping (free
/// list, page tables, positions) is on the host. It follows the slot rules of the KV
/// policy's own decode cache (which slots store, which slot a query reads) and is used
/// through [`DecodeCache`] by the scheduler; the device runner writes and reads the
/// storage directly. It has no host [`KvView`]: [`DecodeCache::view`] is an error.
#[derive(Debug)]
pub(crate) struct DeviceKvCache {
    policy: &'static str,
    mode: DecodeMode,
    rules: Vec<Rule>,
    block_tokens: usize,
    hkv: usize,
    dh: usize,
    num_blocks: usize,
    precision: KvPrecision,
    device: Device,
    /// `[num_blocks, block_tokens, hkv, dh]`.
    k: Tensor,
    v: Tensor,
    free: Vec<u32>,
    reqs: HashMap<u64, Vec<Page>>,
    tokens: usize,
}

impl DeviceKvCache {
    /// A cache on `device` with the slot rules of `policy` for `spec`, its pool allocated
    /// once in `precision`.
    ///
    /// # Errors
    /// A policy other than the built-in `recursion_wise` / `recursive_sharing` (hybrid's
    /// overlay view has no paged kernel), bad sizes, or a failed device allocation.
    pub fn new(
        policy: &dyn mor_kvcache::KvPolicy,
        spec: &DecodeCacheSpec,
        precision: KvPrecision,
        device: &Device,
    ) -> Result<Self> {
        // The policy's own cache, one block, tells which slots store and what they read.
        let probe = policy.new_decode_cache(&DecodeCacheSpec {
            max_blocks: 1,
            ..spec.clone()
        })?;
        let name = probe.policy();
        let mode = probe.mode();
        if !matches!(name, "recursion_wise" | "recursive_sharing") || mode == DecodeMode::Hybrid {
            return Err(Error::msg(format!(
                "the device decode path supports the recursion_wise and recursive_sharing KV \
                 policies, not `{name}` ({mode} decode); use one of them, or decode a CPU model \
                 on the host engine"
            )));
        }
        let rules = (0..probe.num_slots())
            .map(|s| Rule {
                writes: probe.writes(s),
                base: probe.source_slot(s).unwrap_or(s),
            })
            .collect();
        // Token rows are addressed by u32 flat indices.
        let tokens = spec.max_blocks.checked_mul(spec.block_tokens);
        if spec.max_blocks == 0 || tokens.is_none_or(|t| u32::try_from(t).is_err()) {
            return Err(Error::msg(format!(
                "the device KV pool of {} blocks of {} tokens must hold 1..=u32::MAX tokens \
                 (lower kv_blocks or block_tokens)",
                spec.max_blocks, spec.block_tokens
            )));
        }
        let mut c = DeviceKvCache {
            policy: name,
            mode,
            rules,
            block_tokens: spec.block_tokens,
            hkv: spec.num_kv_heads,
            dh: spec.head_dim,
            num_blocks: spec.max_blocks,
            precision,
            device: device.clone(),
            k: Tensor::zeros(1, DType::F32, device)?,
            v: Tensor::zeros(1, DType::F32, device)?,
            free: (0..spec.max_blocks as u32).rev().collect(),
            reqs: HashMap::new(),
            tokens: 0,
        };
        c.allocate()?;
        Ok(c)
    }

    fn allocate(&mut self) -> Result<()> {
        let shape = (self.num_blocks, self.block_tokens, self.hkv, self.dh);
        let dt = kv_dtype(self.precision);
        self.k = Tensor::zeros(shape, dt, &self.device)?;
        self.v = Tensor::zeros(shape, dt, &self.device)?;
        Ok(())
    }

    fn row(&self) -> usize {
        self.hkv * self.dh
    }

    fn rule(&self, slot: usize) -> mor_kvcache::Result<Rule> {
        self.rules.get(slot).copied().ok_or_else(|| {
            invalid(format!(
                "slot {slot} is out of range (the plan has {} slots)",
                self.rules.len()
            ))
        })
    }

    /// Takes the storage row of the token at `pos` of `req` in `slot` (a new block when
    /// the page's last one is full) and returns its flat token index `block · block_tokens
    /// + offset`. On error nothing changes.
    pub fn reserve(&mut self, req: u64, slot: usize, pos: u32) -> mor_kvcache::Result<u32> {
        let rule = self.rule(slot)?;
        if !rule.writes {
            return Err(invalid(format!(
                "slot {slot} stores no K/V under {}: it reads slot {}",
                self.mode, rule.base
            )));
        }
        if pos == mor_kernels::PAD_POS {
            return Err(invalid(format!("position {pos} is reserved for padding")));
        }
        let bt = self.block_tokens;
        let total = self.num_blocks;
        let pages = self
            .reqs
            .get_mut(&req)
            .ok_or_else(|| invalid(format!("request {req} is not active")))?;
        let page = &mut pages[slot];
        if let Some(&last) = page.pos.last() {
            if pos <= last {
                return Err(invalid(format!(
                    "request {req}, slot {slot}: position {pos} is not after the last stored position {last}"
                )));
            }
        }
        let i = page.pos.len();
        if i.is_multiple_of(bt) {
            let id = self.free.pop().ok_or(mor_kvcache::Error::Exhausted {
                needed: 1,
                free: 0,
                total,
            })?;
            page.blocks.push(id);
        }
        page.pos.push(pos);
        self.tokens += 1;
        Ok(page.blocks[i / bt] * bt as u32 + (i % bt) as u32)
    }

    /// Undoes the last [`DeviceKvCache::reserve`] of `req` in `slot`: its position is
    /// dropped and a block it opened goes back to the free list.
    fn unreserve(&mut self, req: u64, slot: usize) {
        let bt = self.block_tokens;
        let Some(page) = self.reqs.get_mut(&req).and_then(|p| p.get_mut(slot)) else {
            return;
        };
        if page.pos.pop().is_some() {
            self.tokens = self.tokens.saturating_sub(1);
            if page.pos.len().is_multiple_of(bt) {
                if let Some(b) = page.blocks.pop() {
                    self.free.push(b);
                }
            }
        }
    }

    /// Writes K and V rows `[m, hkv·dh]` (any float dtype, on the cache's device) at the
    /// flat token indices `rows` (from [`DeviceKvCache::reserve`]), in place.
    pub fn write(&self, rows: &[u32], k: &Tensor, v: &Tensor) -> Result<()> {
        let m = rows.len();
        if m == 0 {
            return Ok(());
        }
        let row = self.row();
        let idx = Tensor::from_vec(rows.to_vec(), (m, 1), &self.device)?
            .broadcast_as((m, row))?
            .contiguous()?;
        let dt = kv_dtype(self.precision);
        let tokens = self.num_blocks * self.block_tokens;
        for (cache, x) in [(&self.k, k), (&self.v, v)] {
            let x = x.reshape((m, row))?.to_dtype(dt)?.contiguous()?;
            // The reshape of the contiguous pool shares its storage: the write lands in it.
            cache.reshape((tokens, row))?.scatter_set(&idx, &x, 0)?;
        }
        Ok(())
    }

    /// The page table a query of `req` at `slot` reads (the slot's own page, or the
    /// step-1 page it shares) and how many of its tokens are at positions `<= pos`.
    pub fn table(&self, req: u64, slot: usize, pos: u32) -> mor_kvcache::Result<(&[u32], u32)> {
        let rule = self.rule(slot)?;
        let pages = self
            .reqs
            .get(&req)
            .ok_or_else(|| invalid(format!("request {req} is not active")))?;
        let page = &pages[rule.base];
        let visible = page.pos.partition_point(|&p| p <= pos);
        Ok((&page.blocks, visible as u32))
    }

    /// The K and V pools `[num_blocks, block_tokens, hkv, dh]`.
    pub fn storage(&self) -> (&Tensor, &Tensor) {
        (&self.k, &self.v)
    }

    fn release(&mut self, pages: Vec<Page>) {
        for p in pages {
            self.tokens -= p.pos.len().min(self.tokens);
            self.free.extend(p.blocks);
        }
    }
}

impl DecodeCache for DeviceKvCache {
    fn policy(&self) -> &'static str {
        self.policy
    }

    fn mode(&self) -> DecodeMode {
        self.mode
    }

    fn num_slots(&self) -> usize {
        self.rules.len()
    }

    fn writes(&self, slot: usize) -> bool {
        self.rules.get(slot).is_some_and(|r| r.writes)
    }

    fn source_slot(&self, slot: usize) -> Option<usize> {
        self.rules.get(slot).map(|r| r.base)
    }

    fn start(&mut self, req: u64) -> mor_kvcache::Result<()> {
        if self.reqs.contains_key(&req) {
            return Err(invalid(format!("request {req} is already active")));
        }
        self.reqs
            .insert(req, vec![Page::default(); self.rules.len()]);
        Ok(())
    }

    fn end(&mut self, req: u64) -> mor_kvcache::Result<()> {
        let pages = self
            .reqs
            .remove(&req)
            .ok_or_else(|| invalid(format!("request {req} is not active")))?;
        self.release(pages);
        Ok(())
    }

    fn is_active(&self, req: u64) -> bool {
        self.reqs.contains_key(&req)
    }

    fn append(
        &mut self,
        req: u64,
        slot: usize,
        pos: u32,
        k: &[f32],
        v: &[f32],
    ) -> mor_kvcache::Result<()> {
        let row = self.row();
        if k.len() != row || v.len() != row {
            return Err(invalid(format!(
                "k and v must hold hkv·dh = {row} floats, got {} and {}",
                k.len(),
                v.len()
            )));
        }
        let upload = |x: &[f32]| Tensor::from_slice(x, (1, row), &self.device);
        let (kt, vt) = match (upload(k), upload(v)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return Err(invalid(format!("upload failed: {e}"))),
        };
        let t = self.reserve(req, slot, pos)?;
        self.write(&[t], &kt, &vt)
            .map_err(|e| invalid(format!("device write failed: {e}")))
    }

    fn blocks_needed(&self, req: u64, slots: &[usize]) -> mor_kvcache::Result<usize> {
        let pages = self
            .reqs
            .get(&req)
            .ok_or_else(|| invalid(format!("request {req} is not active")))?;
        let mut n = 0;
        for &s in slots {
            let rule = self.rule(s)?;
            if rule.writes && pages[s].pos.len().is_multiple_of(self.block_tokens) {
                n += 1;
            }
        }
        Ok(n)
    }

    fn view(&self, _req: u64, _slot: usize) -> mor_kvcache::Result<KvView<'_>> {
        Err(invalid(format!(
            "the K/V of this cache live on {:?}; there is no host view (decode attention \
             reads them with paged_decode_attention)",
            self.device
        )))
    }

    fn free_blocks(&self) -> usize {
        self.free.len()
    }

    fn total_blocks(&self) -> usize {
        self.num_blocks
    }

    fn block_bytes(&self) -> usize {
        self.block_tokens * 2 * self.row() * self.precision.bytes()
    }

    fn bytes_used(&self) -> usize {
        (self.num_blocks - self.free.len()) * self.block_bytes()
    }

    fn bytes_reserved(&self) -> usize {
        self.num_blocks * self.block_bytes()
    }

    fn tokens_stored(&self) -> usize {
        self.tokens
    }

    fn bytes_stored(&self) -> usize {
        self.tokens * 2 * self.row() * self.precision.bytes()
    }

    fn release_all(&mut self) {
        let all: Vec<Vec<Page>> = self.reqs.drain().map(|(_, p)| p).collect();
        for pages in all {
            self.release(pages);
        }
    }

    fn kv_precision(&self) -> KvPrecision {
        self.precision
    }

    fn set_kv_precision(&mut self, precision: KvPrecision) -> mor_kvcache::Result<()> {
        if precision == self.precision {
            return Ok(());
        }
        if !self.reqs.is_empty() {
            return Err(invalid(format!(
                "cannot change the K/V precision to {precision} while {} request(s) are active",
                self.reqs.len()
            )));
        }
        self.precision = precision;
        self.allocate()
            .map_err(|e| invalid(format!("cannot allocate the {precision} pool: {e}")))
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

/// The weights of one unique block on the device.
#[derive(Debug)]
struct DevBlock {
    /// `[hq·dh, d]`.
    q: Tensor,
    /// `[k; v]`: `[2·hkv·dh, d]`.
    kv: Tensor,
    /// `[d, hq·dh]`.
    o: Tensor,
    /// `[gate; up]`: `[2·ff, d]`.
    gate_up: Tensor,
    /// `[d, ff]`.
    down: Tensor,
}

/// Weights on the model's device and the decoder layer over a batch (see the module docs).
#[derive(Debug)]
pub(crate) struct DeviceCompute {
    device: Device,
    /// Dtype of the products' weights and inputs.
    wdtype: DType,
    blocks: Vec<DevBlock>,
    /// Per slot: its block.
    block_of: Vec<usize>,
    /// Per slot: (attention norm, MLP norm) f32 and a grouping key (equal keys = equal
    /// norms).
    norms: Vec<(Tensor, Tensor, usize)>,
    final_norm: Tensor,
    /// `[vocab, d]` f32: the weights rounded to the products' dtype, kept in f32 so that
    /// the logits are an f32 product (see the module docs).
    head: Tensor,
    /// `[positions, dh / 2]` f32.
    cos: Tensor,
    sin: Tensor,
    max_pos: usize,
    d: usize,
    hq: usize,
    hkv: usize,
    dh: usize,
    ff: usize,
    vocab: usize,
    eps: f64,
}

impl DeviceCompute {
    /// The weights of `model` on its device, the products' in `precision`.
    ///
    /// # Errors
    /// A model with a relaxation (LoRA / DoRA, adaption prompt or recursion encoding: the
    /// device path does not apply them), or a failing op.
    pub fn new(model: &MorModel, precision: Precision) -> Result<Self> {
        if model.relaxation().is_some() {
            return Err(Error::msg(
                "the device decode path does not support relaxation (LoRA / DoRA, adaption \
                 prompt, recursion encoding); decode this model on the host engine (a CPU model)",
            ));
        }
        let cfg = model.config();
        let m = &cfg.model;
        let plan = model.plan();
        let device = model.embedding().as_tensor().device().clone();
        let wdtype = match precision {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        };
        let w = |t: &Tensor| -> Result<Tensor> {
            Ok(t.detach()
                .to_device(&device)?
                .to_dtype(wdtype)?
                .contiguous()?)
        };
        let f = |t: &Tensor| -> Result<Tensor> {
            Ok(t.detach()
                .to_device(&device)?
                .to_dtype(DType::F32)?
                .contiguous()?)
        };
        let mut blocks = Vec::with_capacity(model.blocks().len());
        for p in model.blocks() {
            blocks.push(DevBlock {
                q: w(p.q.as_tensor())?,
                kv: w(&Tensor::cat(&[p.k.as_tensor(), p.v.as_tensor()], 0)?)?,
                o: w(p.o.as_tensor())?,
                gate_up: w(&Tensor::cat(&[p.gate.as_tensor(), p.up.as_tensor()], 0)?)?,
                down: w(p.down.as_tensor())?,
            });
        }
        let norms = super::runner::slot_norms(model)?
            .into_iter()
            .map(|(a, b, key)| Ok((f(a)?, f(b)?, key)))
            .collect::<Result<Vec<_>>>()?;
        let half = (m.head_dim / 2).max(1);
        let (cos, sin) = model.rope_tables();
        let cos = f(cos)?.reshape(((), half))?;
        let sin = f(sin)?.reshape(((), half))?;
        let max_pos = cos.dim(0)?;
        Ok(DeviceCompute {
            wdtype,
            blocks,
            block_of: plan.slots.iter().map(|s| s.block).collect(),
            norms,
            final_norm: f(model.final_norm_weight().as_tensor())?,
            head: w(model.lm_head_weight().as_tensor())?.to_dtype(DType::F32)?,
            cos,
            sin,
            max_pos,
            d: m.hidden_size,
            hq: m.num_heads,
            hkv: m.num_kv_heads,
            dh: m.head_dim,
            ff: m.intermediate_size,
            vocab: m.vocab_size,
            eps: m.rms_eps,
            device,
        })
    }

    /// The device KV cache for `spec` under `policy`, its pool in `precision`.
    ///
    /// # Errors
    /// As [`DeviceKvCache::new`].
    pub fn new_cache(
        &self,
        policy: &dyn mor_kvcache::KvPolicy,
        spec: &DecodeCacheSpec,
        precision: KvPrecision,
    ) -> Result<Box<dyn DecodeCache>> {
        Ok(Box::new(DeviceKvCache::new(
            policy,
            spec,
            precision,
            &self.device,
        )?))
    }

    /// `x · wᵀ` with `x` rounded to the weights' dtype, computed and returned in that dtype
    /// (bf16 for bf16 weights), then cast to f32. Batch-invariant: see [`fixed_rows_mm`].
    fn mm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(fixed_rows_mm(&x.to_dtype(self.wdtype)?, &w.t()?)?.to_dtype(DType::F32)?)
    }

    /// RMSNorm of the rows of `x: [n, d]` f32: the fused op (its kernel on CUDA, its CPU
    /// body on the CPU, so the tests run the op the GPU runs).
    fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(mor_kernels::cuda::rms_norm(x, w, self.eps)?)
    }

    /// The RoPE rows `cos, sin: [m, 1, dh / 2]` of the positions `pos` (one upload).
    fn rope_rows(&self, pos: &[u32]) -> Result<(Tensor, Tensor)> {
        let p = Tensor::from_slice(pos, pos.len(), &self.device)?;
        Ok((
            self.cos.index_select(&p, 0)?.unsqueeze(1)?,
            self.sin.index_select(&p, 0)?.unsqueeze(1)?,
        ))
    }

    /// `x: [m, heads, dh]` rotated by the RoPE rows `(cos, sin)` of its positions (HF
    /// rotate-half form).
    fn rope(&self, x: &Tensor, (c, s): (&Tensor, &Tensor)) -> Result<Tensor> {
        let half = self.dh / 2;
        let x1 = x.narrow(2, 0, half)?;
        let x2 = x.narrow(2, half, half)?;
        let o1 = (x1.broadcast_mul(c)? - x2.broadcast_mul(s)?)?;
        let o2 = (x2.broadcast_mul(c)? + x1.broadcast_mul(s)?)?;
        Ok(Tensor::cat(&[o1, o2], 2)?)
    }

    /// Logits (one row of `vocab` per token) of the final hidden states `h: [n, d]`.
    pub fn head(&self, h: &[f32], flops: &Cell<Flops>) -> Result<Vec<Vec<f32>>> {
        let n = h.len() / self.d;
        if n == 0 {
            return Ok(Vec::new());
        }
        let x = Tensor::from_slice(h, (n, self.d), &self.device)?;
        let x = self.norm(&x, &self.final_norm)?;
        // Inputs rounded as the layers' products round them; product and output in f32.
        let x = x.to_dtype(self.wdtype)?.to_dtype(DType::F32)?;
        let logits = fixed_rows_mm(&x, &self.head.t()?)?;
        let mut f = flops.get();
        f.head += 2 * (h.len() * self.vocab) as u64;
        flops.set(f);
        // One read (counted by `host_sync`): the logits, for sampling on the host.
        let flat = mor_kernels::host_sync::to_host::<f32>(&logits)?;
        Ok(flat.chunks_exact(self.vocab).map(<[f32]>::to_vec).collect())
    }

    /// Runs every token through the layer slots `slots[i]` (already checked by the
    /// caller: one list per token, all of one length), appending K/V where the cache
    /// stores and attending over the paged pool. `h: [n, d]` → `[n, d]`.
    pub fn run_layers(
        &self,
        cache: &mut dyn DecodeCache,
        h: Vec<f32>,
        toks: &[Tok],
        slots: &[&[usize]],
        flops: &Cell<Flops>,
    ) -> Result<Vec<f32>> {
        let depth = slots.first().map_or(0, |s| s.len());
        if depth == 0 {
            // No layer (an empty prelude or coda): nothing travels.
            return Ok(h);
        }
        let cache = cache
            .as_any_mut()
            .and_then(|a| a.downcast_mut::<DeviceKvCache>())
            .ok_or_else(|| {
                Error::msg(
                    "the device decode path needs its own KV cache (Runner::new_cache of a \
                     device runner), not a host cache",
                )
            })?;
        let n = toks.len();
        if let Some(t) = toks.iter().find(|t| t.pos as usize >= self.max_pos) {
            return Err(Error::msg(format!(
                "position {} is beyond the RoPE table of {} positions",
                t.pos, self.max_pos
            )));
        }
        let mut x = Tensor::from_vec(h, (n, self.d), &self.device)?;
        for j in 0..depth {
            let slot_j: Vec<usize> = slots.iter().map(|s| s[j]).collect();
            let key = |i: usize| (self.block_of[slot_j[i]], self.norms[slot_j[i]].2);
            let first = key(0);
            if (1..n).all(|i| key(i) == first) {
                x = self.layer(cache, &x, toks, &slot_j, flops)?;
                continue;
            }
            // Tokens whose slots use different blocks or norms: one group per block.
            let mut groups: Vec<((usize, usize), Vec<usize>)> = Vec::new();
            for i in 0..n {
                let k = key(i);
                match groups.iter_mut().find(|g| g.0 == k) {
                    Some(g) => g.1.push(i),
                    None => groups.push((k, vec![i])),
                }
            }
            let mut outs = Vec::with_capacity(groups.len());
            let mut order = Vec::with_capacity(n);
            for (_, members) in &groups {
                let idx: Vec<u32> = members.iter().map(|&i| i as u32).collect();
                let xg = x.index_select(&Tensor::from_vec(idx, members.len(), &self.device)?, 0)?;
                let tg: Vec<Tok> = members.iter().map(|&i| toks[i]).collect();
                let sg: Vec<usize> = members.iter().map(|&i| slot_j[i]).collect();
                outs.push(self.layer(cache, &xg, &tg, &sg, flops)?);
                order.extend(members.iter().copied());
            }
            let mut inv = vec![0u32; n];
            for (r, &i) in order.iter().enumerate() {
                inv[i] = r as u32;
            }
            x = Tensor::cat(&outs, 0)?.index_select(&Tensor::from_vec(inv, n, &self.device)?, 0)?;
        }
        // One read (counted by `host_sync`): the output rows.
        Ok(mor_kernels::host_sync::to_host::<f32>(&x)?)
    }

    /// One decoder layer (pre-norm attention and SwiGLU MLP, spec §1.1) on `h: [n, d]` f32
    /// for tokens whose slots share one block and norms.
    fn layer(
        &self,
        cache: &mut DeviceKvCache,
        h: &Tensor,
        toks: &[Tok],
        slots: &[usize],
        flops: &Cell<Flops>,
    ) -> Result<Tensor> {
        let n = toks.len();
        let dev = &self.device;
        let bw = &self.blocks[self.block_of[slots[0]]];
        let (an, mn, _) = &self.norms[slots[0]];
        let (qd, kvd) = (self.hq * self.dh, self.hkv * self.dh);
        let x = self.norm(h, an)?;
        let pos: Vec<u32> = toks.iter().map(|t| t.pos).collect();
        let (cos, sin) = self.rope_rows(&pos)?;
        let q = self.rope(
            &self.mm(&x, &bw.q)?.reshape((n, self.hq, self.dh))?,
            (&cos, &sin),
        )?;
        // K/V of the tokens that store here (recursive sharing projects none at steps >= 2).
        let w_idx: Vec<usize> = (0..n).filter(|&i| cache.writes(slots[i])).collect();
        let nw = w_idx.len();
        if nw > 0 {
            // The storing rows, and their RoPE rows (no second upload of positions).
            let (xs, wc, ws) = if nw == n {
                (x.clone(), cos.clone(), sin.clone())
            } else {
                let idx: Vec<u32> = w_idx.iter().map(|&i| i as u32).collect();
                let idx = Tensor::from_vec(idx, nw, dev)?;
                (
                    x.index_select(&idx, 0)?,
                    cos.index_select(&idx, 0)?,
                    sin.index_select(&idx, 0)?,
                )
            };
            let kv = self.mm(&xs, &bw.kv)?;
            let k = self.rope(
                &kv.narrow(1, 0, kvd)?.reshape((nw, self.hkv, self.dh))?,
                (&wc, &ws),
            )?;
            let v = kv.narrow(1, kvd, kvd)?;
            let mut rows = Vec::with_capacity(nw);
            let mut failed = None;
            for &i in &w_idx {
                match cache.reserve(toks[i].req, slots[i], toks[i].pos) {
                    Ok(r) => rows.push(r),
                    Err(e) => {
                        failed = Some(Error::from(e));
                        break;
                    }
                }
            }
            if failed.is_none() {
                failed = cache.write(&rows, &k, &v).err();
            }
            if let Some(e) = failed {
                // Nothing half done: the rows reserved so far give their positions back
                // (in reverse, so each drop undoes the last reservation of its page).
                for &i in w_idx[..rows.len()].iter().rev() {
                    cache.unreserve(toks[i].req, slots[i]);
                }
                return Err(e);
            }
        }
        // Every token's K/V is stored before any token attends; each query sees its
        // request's entries at positions up to its own.
        let mut tables = Vec::with_capacity(n);
        let mut lens = Vec::with_capacity(n);
        let mut visible = 0usize;
        for (t, &s) in toks.iter().zip(slots) {
            let (blocks, len) = cache.table(t.req, s, t.pos)?;
            tables.push(blocks.to_vec());
            lens.push(len);
            visible += len as usize;
        }
        let max_blocks = tables.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut flat = vec![0u32; n * max_blocks];
        for (i, t) in tables.iter().enumerate() {
            flat[i * max_blocks..i * max_blocks + t.len()].copy_from_slice(t);
        }
        let table = Tensor::from_vec(flat, (n, max_blocks), dev)?;
        let lens = Tensor::from_vec(lens, n, dev)?;
        let (kc, vc) = cache.storage();
        let att = mor_kernels::cuda::paged_decode_attention(
            &q.to_dtype(kc.dtype())?,
            kc,
            vc,
            &table,
            &lens,
            None,
        )?
        .to_dtype(DType::F32)?
        .reshape((n, qd))?;
        let h = (h + self.mm(&att, &bw.o)?)?;
        let x = self.norm(&h, mn)?;
        let gu = self.mm(&x, &bw.gate_up)?;
        let s = mor_kernels::cuda::swiglu(
            &gu.narrow(1, 0, self.ff)?,
            &gu.narrow(1, self.ff, self.ff)?,
        )?;
        let h = (h + self.mm(&s, &bw.down)?)?;
        let macs = |w: &Tensor| w.elem_count();
        let linear = n * (macs(&bw.q) + macs(&bw.o) + macs(&bw.gate_up) + macs(&bw.down))
            + nw * macs(&bw.kv);
        let mut f = flops.get();
        f.linear += 2 * linear as u64;
        f.attention += 4 * (qd * visible) as u64;
        flops.set(f);
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::super::runner::{ExitRule, Runner, Tok};
    use super::DeviceKvCache;
    use crate::model::MorModel;
    use candle_core::Device;
    use mor_core::config::{Config, Precision};
    use mor_kvcache::decode::KvPrecision;
    use mor_kvcache::{DecodeCache, DecodeCacheSpec, RecursionWise};

    /// The books of the device cache: blocks are taken per `block_tokens` tokens of a page
    /// and returned at `end`, rows land at their flat token index, an append past the pool
    /// is `Exhausted` and changes nothing, bytes follow the K/V precision.
    #[test]
    fn device_cache_books_and_rows() {
        let spec = DecodeCacheSpec::vanilla(2, 1, 2, 2, 3);
        let policy = RecursionWise::new(1).unwrap();
        let mut c = DeviceKvCache::new(&policy, &spec, KvPrecision::F32, &Device::Cpu).unwrap();
        c.start(7).unwrap();
        assert_eq!(c.blocks_needed(7, &[0, 1]).unwrap(), 2);
        for p in 0..3u32 {
            let k = [p as f32, 10.0 + p as f32];
            c.append(7, 0, p, &k, &[-(p as f32), 1.0]).unwrap();
        }
        // Slot 0 holds 3 tokens in 2 blocks; slot 1 takes the last block.
        assert_eq!((c.free_blocks(), c.tokens_stored()), (1, 3));
        assert!(
            c.append(7, 0, 2, &[0.0; 2], &[0.0; 2]).is_err(),
            "positions must grow"
        );
        c.append(7, 1, 0, &[5.0, 6.0], &[7.0, 8.0]).unwrap();
        c.append(7, 1, 1, &[15.0, 16.0], &[17.0, 18.0]).unwrap();
        let e = c.append(7, 1, 2, &[0.0; 2], &[0.0; 2]).unwrap_err();
        assert!(matches!(e, mor_kvcache::Error::Exhausted { .. }), "{e}");
        assert_eq!((c.free_blocks(), c.tokens_stored()), (0, 5));
        let (blocks, visible) = c.table(7, 0, 1).unwrap();
        assert_eq!((blocks.to_vec(), visible), (vec![0, 1], 2));
        let (blocks, visible) = c.table(7, 1, 5).unwrap();
        assert_eq!((blocks.to_vec(), visible), (vec![2], 2));
        let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (k, v) = (flat(c.storage().0), flat(c.storage().1));
        // Token 2 of slot 0 is offset 0 of block 1: flat row 2, K and V.
        assert_eq!(&k[2 * 2..3 * 2], &[2.0, 12.0]);
        assert_eq!(&v[2 * 2..3 * 2], &[-2.0, 1.0]);
        // Slot 1's tokens 0 and 1 are offsets 0 and 1 of block 2: flat rows 4 and 5.
        assert_eq!(&k[4 * 2..6 * 2], &[5.0, 6.0, 15.0, 16.0]);
        assert_eq!(&v[4 * 2..6 * 2], &[7.0, 8.0, 17.0, 18.0]);
        // Token 1 of slot 0 (block 0, offset 1): flat row 1.
        assert_eq!((&k[2..4], &v[2..4]), (&[1.0, 11.0][..], &[-1.0, 1.0][..]));
        assert_eq!(c.bytes_stored(), 5 * 2 * 2 * 4);
        assert!(
            c.set_kv_precision(KvPrecision::Bf16).is_err(),
            "not while active"
        );
        c.end(7).unwrap();
        assert_eq!((c.free_blocks(), c.tokens_stored()), (3, 0));
        c.set_kv_precision(KvPrecision::Bf16).unwrap();
        assert_eq!(c.block_bytes(), 2 * 2 * 2 * 2);
        assert!(c.view(7, 0).is_err());
    }

    /// The pool is allocated once, in the precision it is given; a pool whose tokens exceed
    /// the u32 flat indices (or one of no blocks) is refused naming kv_blocks, before any
    /// allocation.
    #[test]
    fn device_cache_precision_and_size_refusals() {
        let policy = RecursionWise::new(1).unwrap();
        let spec = DecodeCacheSpec::vanilla(2, 1, 2, 2, 3);
        let c = DeviceKvCache::new(&policy, &spec, KvPrecision::Bf16, &Device::Cpu).unwrap();
        assert_eq!(c.storage().0.dtype(), candle_core::DType::BF16);
        assert_eq!(c.storage().1.dims(), &[3, 2, 1, 2]);
        assert_eq!(c.kv_precision(), KvPrecision::Bf16);
        // 2^30 blocks of 8 tokens: 2^33 rows (a pool that large would not be allocated).
        for (blocks, tokens) in [(1usize << 30, 8usize), (0, 8)] {
            let spec = DecodeCacheSpec::vanilla(2, 1, 2, tokens, blocks);
            let e = DeviceKvCache::new(&policy, &spec, KvPrecision::F32, &Device::Cpu)
                .unwrap_err()
                .to_string();
            assert!(e.contains("kv_blocks") && e.contains("u32::MAX"), "{e}");
        }
    }

    /// A layer call whose second row finds the pool exhausted leaves nothing half done: the
    /// first row's reservation is rolled back (no position without K/V), and a later call
    /// that fits runs.
    #[test]
    fn a_failed_reservation_rolls_back_the_layer_call() {
        let _ = crate::builtin::link();
        let cfg = Config::from_toml_str(
            "[model]\npreset = \"micro\"\nnum_layers = 4\nseq_len = 16\n\
             [train]\nbudget = { steps = 1 }",
        )
        .unwrap();
        let model = MorModel::new(&cfg).unwrap();
        let r = Runner::new_on(&model, ExitRule::Router, None, Precision::F32, true).unwrap();
        // One block of one token: the first layer's first row takes it, the second fails.
        let mut cache = r.new_cache(1, 1, KvPrecision::F32).unwrap();
        cache.start(0).unwrap();
        cache.start(1).unwrap();
        let h = r.embed(&[3, 5]).unwrap();
        let toks = [Tok { req: 0, pos: 0 }, Tok { req: 1, pos: 0 }];
        let slots: Vec<&[usize]> = vec![r.stages[0].as_slice(); 2];
        let e = r
            .run_layers(cache.as_mut(), h.clone(), &toks, &slots)
            .unwrap_err();
        assert!(
            matches!(e, crate::Error::Kv(mor_kvcache::Error::Exhausted { .. })),
            "{e}"
        );
        assert_eq!((cache.free_blocks(), cache.tokens_stored()), (1, 0));
        // Request 0 alone at position 0 again: accepted (its slot holds no stale position);
        // one layer stores, the next finds the pool exhausted and rolls back its own row
        // only.
        assert!(slots[0].len() >= 2);
        let e = r
            .run_layers(cache.as_mut(), h[..r.d].to_vec(), &toks[..1], &slots[..1])
            .unwrap_err();
        assert!(
            matches!(e, crate::Error::Kv(mor_kvcache::Error::Exhausted { .. })),
            "{e}"
        );
        assert_eq!((cache.free_blocks(), cache.tokens_stored()), (0, 1));
    }

    /// One layer call whose items mix norm groups in an order that is not its own inverse
    /// (stages 0, 1, 1, 0 with per-slot norms): every row comes back where it belongs, equal
    /// to running each item alone.
    #[test]
    fn mixed_groups_come_back_in_item_order() {
        let _ = crate::builtin::link();
        let cfg = Config::from_toml_str(
            "[model]\npreset = \"micro\"\nnum_layers = 8\nseq_len = 16\ninit_std = 0.2\n\
             [recursion]\nnum_recursions = 3\nsharing = { kind = \"middle_cycle\" }\nln_share = false\n\
             [train]\nbudget = { steps = 1 }",
        )
        .unwrap();
        let model = MorModel::new(&cfg).unwrap();
        let r = Runner::new_on(&model, ExitRule::Router, None, Precision::F32, true).unwrap();
        let mut cache = r.new_cache(4, 256, KvPrecision::F32).unwrap();
        let stages = [0usize, 1, 1, 0];
        let ids = [3u32, 5, 7, 9];
        let h = r.embed(&ids).unwrap();
        for req in (0..4).chain(10..14) {
            cache.start(req).unwrap();
        }
        let toks: Vec<Tok> = (0..4).map(|i| Tok { req: i, pos: 0 }).collect();
        let slots: Vec<&[usize]> = stages.iter().map(|&s| r.stages[s].as_slice()).collect();
        let batched = r
            .run_layers(cache.as_mut(), h.clone(), &toks, &slots)
            .unwrap();
        let d = r.d;
        for i in 0..4 {
            let alone = r
                .run_layers(
                    cache.as_mut(),
                    h[i * d..(i + 1) * d].to_vec(),
                    &[Tok {
                        req: 10 + i as u64,
                        pos: 0,
                    }],
                    &[slots[i]],
                )
                .unwrap();
            let gap = alone
                .iter()
                .zip(&batched[i * d..(i + 1) * d])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Rounding of the batched products only (a misplaced row differs by O(10)).
            assert!(gap < 1e-4, "item {i} differs by {gap}");
        }
        // The stages really differ: the items of stage 0 and 1 give different rows.
        let gap = batched[..d]
            .iter()
            .zip(&batched[d..2 * d])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(gap > 1e-3);
    }
}
