//! The decode-time computation shared by [`Decoder`](super::Decoder) and
//! [`Engine`](super::Engine): prepared weights, one decoder layer over a batch of tokens
//! (each attending to its own request's cache), the causal routing decisions and the hidden
//! state update of every routing family.
//!
//! A batch is a matrix `h: [n, d]` of tokens of *different* requests, possibly at different
//! recursion steps. At layer position `j` every token runs its own slot `slots_i[j]`; tokens
//! whose slots use the same block (always the case for the steps of a cyclic plan, whose
//! step-r layer j is block j for every r) share one matmul per projection. Attention is per
//! token over the [`KvView`](mor_kvcache::KvView) of its request and slot.

use super::device::DeviceCompute;
use crate::model::MorModel;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use mor_core::config::Precision;
use mor_core::plan::Segment;
use mor_kernels::cpu::{rms_norm_rows, swiglu_rows, PackedMatrix};
use mor_kvcache::decode::KvPrecision;
use mor_kvcache::{attend_into, DecodeCache, DecodeCacheSpec, DecodeMode, KvPolicy};
use mor_router::{RouteMode, RoutingKind, Update};

/// When an expert-choice token leaves the recursion (early exit).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ExitRule {
    /// The router's own causal rule, exactly what a [`RouteMode::Causal`] forward applies
    /// (by default `σ(z_r) ≥ threshold` on the aux-loss-trained router, or the auxiliary
    /// router; spec §3.1). Token-choice routers always use their up-front depth.
    #[default]
    Router,
    /// Expert-choice only: continue to step `r` iff the gate `g_r = α·G(z_r)` is at least
    /// `thresholds[r - 1]`. `G` is monotone, so this is a threshold on the router logit;
    /// benchmarks calibrate it so that the share of tokens continuing matches `cap_r` on an
    /// untrained router (see `mor-bench`).
    GateThresholds(Vec<f64>),
}

/// How a token's hidden state is merged after a recursion step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Merge {
    /// No router: `h ← y` (vanilla, recursive baseline; spec §2).
    Plain,
    /// Expert-choice: `h ← h + g·y` (spec Eq. 2.1; `g = 1` for additive gating).
    Gated(f32),
    /// Token-choice (spec §3.2, code form): at the token's last step `h ← H¹ + g·y`;
    /// before it `h ← y` (or `g·y` with `gate_intermediate`).
    Token {
        /// The token's depth.
        depth: usize,
        /// Its gate `g_t = p_{t, i_t}`.
        gate: f32,
        /// Gate the continuing branch too.
        gate_intermediate: bool,
    },
}

/// The up-front decision of a token-choice router for one token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TokenChoice {
    pub depth: usize,
    pub gate: f32,
    pub gate_intermediate: bool,
}

/// The expert-choice decision for one token at one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ExpertDecision {
    /// The gate `g_r`, when the router scored the token (always under
    /// [`ExitRule::GateThresholds`]; only for kept tokens under [`ExitRule::Router`]).
    pub gate: Option<f32>,
    /// Run the step.
    pub run: bool,
}

/// The position of one token in its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tok {
    pub req: u64,
    pub pos: u32,
}

/// The weights of one unique block, packed (in the engine's precision) for products with
/// few rows.
#[derive(Debug)]
struct BlockWeights {
    /// `[q; k; v]`: one product when the token stores K/V at this slot.
    qkv: PackedMatrix,
    /// Queries alone (recursive sharing projects no K/V at steps >= 2, spec §4).
    q: PackedMatrix,
    /// `[k; v]` of the tokens that store.
    kv: PackedMatrix,
    o: PackedMatrix,
    /// `[gate; up]`.
    gate_up: PackedMatrix,
    down: PackedMatrix,
}

/// Host copy of one LoRA or DoRA adapter (spec §6.4): `A: [rank, d_in]`, `B: [d_out,
/// rank]`, and a DoRA's output scale `m / ‖W + s·B A‖_row: [d_out]`, fixed at load (the
/// weights do not change while decoding).
#[derive(Debug)]
struct HostLora {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    dora: Option<Vec<f32>>,
}

impl HostLora {
    fn new(relax: &crate::relax::Relax, w: &Tensor, p: &crate::relax::LoraPair) -> Result<Self> {
        Ok(HostLora {
            a: host(p.a.as_tensor())?,
            b: host(p.b.as_tensor())?,
            rank: p.a.as_tensor().dim(0)?,
            dora: relax.dora_scale(w, p)?.as_ref().map(host).transpose()?,
        })
    }

    /// Multiply-adds of one row.
    fn macs(&self) -> usize {
        self.a.len() + self.b.len()
    }

    /// Elementwise multiplies of one row (a DoRA's output scale).
    fn scales(&self) -> usize {
        self.dora.as_ref().map_or(0, Vec::len)
    }

    /// `out += scale · B (A x)` for one row `out` that holds the shared product `W x`, then
    /// for a DoRA `out ⊙= m / n`: `out` becomes this item's relaxed projection.
    fn add(&self, x: &[f32], out: &mut [f32], scale: f32) {
        let d_in = x.len();
        let t: Vec<f32> = self
            .a
            .chunks_exact(d_in)
            .map(|a| a.iter().zip(x).map(|(p, q)| p * q).sum::<f32>())
            .collect();
        for (o, b) in out.iter_mut().zip(self.b.chunks_exact(self.rank)) {
            *o += scale * b.iter().zip(&t).map(|(p, q)| p * q).sum::<f32>();
        }
        if let Some(c) = &self.dora {
            out.iter_mut().zip(c).for_each(|(o, c)| *o *= c);
        }
    }
}

/// The LoRA / DoRA adapters of one recursion slot, on the host.
#[derive(Debug, Default)]
struct SlotHostLora {
    q: Option<HostLora>,
    k: Option<HostLora>,
    v: Option<HostLora>,
    o: Option<HostLora>,
}

/// The adaption prompt of one recursion slot on the host (spec §6.4): the prefix keys and
/// values `[P, kv_heads · d_head]` projected once at load by the slot's shared `W_k`, `W_v`
/// (no RoPE), and `tanh(g): [n_head]`.
#[derive(Debug)]
struct HostPrompt {
    k: Vec<f32>,
    v: Vec<f32>,
    gate: Vec<f32>,
    len: usize,
}

impl HostPrompt {
    /// `out_h += tanh(g_h) · softmax(q_h K_{p,h}ᵀ · scale) V_{p,h}` for every query head `h`
    /// of one token (`q`, `out`: `[n_head · d_head]`, `q` after RoPE), query head `h`
    /// reading KV head `h / (n_head / kv_heads)`.
    fn add(&self, q: &[f32], out: &mut [f32], dh: usize, kv_heads: usize, scale: f32) {
        let hq = self.gate.len();
        let group = hq / kv_heads.max(1);
        let kvd = kv_heads * dh;
        let mut w = vec![0f32; self.len];
        for h in 0..hq {
            let off = (h / group) * dh;
            let qh = &q[h * dh..(h + 1) * dh];
            for (p, wp) in w.iter_mut().enumerate() {
                let k = &self.k[p * kvd + off..p * kvd + off + dh];
                *wp = scale * qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>();
            }
            let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0f32;
            for wp in w.iter_mut() {
                *wp = (*wp - max).exp();
                z += *wp;
            }
            let g = self.gate[h] / z;
            let oh = &mut out[h * dh..(h + 1) * dh];
            for (p, wp) in w.iter().enumerate() {
                let v = &self.v[p * kvd + off..p * kvd + off + dh];
                oh.iter_mut().zip(v).for_each(|(o, v)| *o += g * wp * v);
            }
        }
    }
}

/// Floating-point operations done so far (2 per multiply-add): layer projections, attention
/// over the caches (scores and weighted values), LM head.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Flops {
    pub linear: u64,
    pub attention: u64,
    pub head: u64,
}

/// Prepared weights and the plan's stages.
#[derive(Debug)]
pub(crate) struct Runner<'m> {
    pub model: &'m MorModel,
    /// Work counters.
    pub flops: std::cell::Cell<Flops>,
    blocks: Vec<BlockWeights>,
    /// Per slot: (attention norm, MLP norm) and a grouping key (equal keys = equal norms).
    norms: Vec<(Vec<f32>, Vec<f32>, usize)>,
    final_norm: Vec<f32>,
    /// `[vocab, d]`.
    embed: Vec<f32>,
    /// The packed LM head (`None` on the device path).
    head: Option<PackedMatrix>,
    /// The device path (weights and KV pool on the model's device, see
    /// [`device`](super::device)); `None` for the host path.
    dev: Option<DeviceCompute>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    pub d: usize,
    hq: usize,
    hkv: usize,
    dh: usize,
    pub vocab: usize,
    eps: f32,
    ff: usize,
    scale: f32,
    /// Context length (the trained `seq_len`).
    pub context: usize,
    pub prelude: Vec<usize>,
    pub coda: Vec<usize>,
    /// Slots of each stage: stage `s` is recursion step `s + 1` of a cyclic plan; a
    /// non-cyclic plan (sequence sharing) has one stage of all its recursion slots.
    pub stages: Vec<Vec<usize>>,
    /// Depth reported after stage `s` (`s + 1`, or `N_r` for the single stage of a
    /// non-cyclic plan).
    pub stage_depth: Vec<usize>,
    pub routing: Option<RoutingKind>,
    pub exit: ExitRule,
    /// Deepest stage a token may run (test-time scaling; `stages.len()` by default).
    pub max_stages: usize,
    /// Per slot, the relaxation's LoRA / DoRA adapters (spec §6.4): the shared packed
    /// products run once per batch, each item then adds its own slot's (its depth's)
    /// low-rank terms and, for a DoRA, applies its output scale.
    lora: Vec<Option<SlotHostLora>>,
    /// `alpha / rank` of the LoRA / DoRA.
    lora_scale: f32,
    /// Per slot, the relaxation's adaption prompt (spec §6.4): each item adds its own
    /// slot's (its depth's) prefix attention to its attention output.
    prompt: Vec<Option<HostPrompt>>,
    /// Per recursion step (index `r − 1`), the recursion encoding added to the hidden
    /// state entering the step's first layer (empty without one).
    encoding: Vec<Vec<f32>>,
    /// Work buffers of [`Runner::layer`], kept between calls (no allocation or zeroing
    /// per layer).
    scratch: std::cell::RefCell<Scratch>,
}

/// The work buffers of one decoder layer; every use overwrites the part it reads.
#[derive(Debug, Default)]
struct Scratch {
    x: Vec<f32>,
    q: Vec<f32>,
    xs: Vec<f32>,
    kv: Vec<f32>,
    att: Vec<f32>,
    k: Vec<f32>,
    gu: Vec<f32>,
    s: Vec<f32>,
}

/// The first `len` values of `v`, grown (never shrunk or cleared) to hold them: the values
/// are whatever the last use left, for a caller that overwrites them all.
fn work(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// The values of `t` as host f32 (row-major).
fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.detach()
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Per slot of `model`'s plan: its attention and MLP norm weights and a grouping key
/// (equal keys = equal norms: the slot's block under `ln_share`, else the slot itself).
pub(super) fn slot_norms(model: &MorModel) -> Result<Vec<(&Tensor, &Tensor, usize)>> {
    let plan = model.plan();
    let ln_share = model.config().recursion.ln_share;
    (0..plan.num_slots())
        .map(|s| {
            let (a, b) = model
                .slot_norm_weights(s)
                .ok_or_else(|| Error::msg(format!("slot {s} has no norm weights")))?;
            let key = if ln_share {
                plan.slots[s].block
            } else {
                plan.num_blocks + s
            };
            Ok((a.as_tensor(), b.as_tensor(), key))
        })
        .collect()
}

/// Linear weights `[out_i, k]` stacked along the outputs, packed in `precision`.
fn packed(parts: &[&Tensor], precision: Precision) -> Result<PackedMatrix> {
    let k = parts[0].dim(1)?;
    let vals = parts.iter().map(|t| host(t)).collect::<Result<Vec<_>>>()?;
    let refs: Vec<&[f32]> = vals.iter().map(Vec::as_slice).collect();
    Ok(PackedMatrix::stacked_with_precision(&refs, k, precision)?)
}

impl<'m> Runner<'m> {
    /// Prepares `model` for decoding, its linear weights (layers and LM head) in
    /// `precision` (bf16: the products round their inputs to bf16 and accumulate in f32;
    /// embeddings, norms, attention, routers and the residual stream stay f32): on the host
    /// path (`device = false`: packed weights, host KV pool) or on the device path
    /// (`device = true`: candle tensors on the model's device, the CPU included, see
    /// [`device`](super::device)).
    ///
    /// # Errors
    /// The host path with a model not on the CPU; the device path with a model it does
    /// not cover (relaxation); a router on a non-cyclic plan, bad `max_depth` or exit
    /// thresholds.
    pub fn new_on(
        model: &'m MorModel,
        exit: ExitRule,
        max_depth: Option<usize>,
        precision: Precision,
        device: bool,
    ) -> Result<Self> {
        if !device && !model.embedding().as_tensor().device().is_cpu() {
            return Err(Error::msg(
                "the host inference engine runs on the CPU; build the model with Device::Cpu \
                 (a model on another device decodes on the device path)",
            ));
        }
        let dev = device
            .then(|| DeviceCompute::new(model, precision))
            .transpose()?;
        let cfg = model.config();
        let m = &cfg.model;
        let plan = model.plan();
        let mut blocks = Vec::with_capacity(model.blocks().len());
        // The device path keeps its own weights: no packed host copy.
        for p in model.blocks().iter().filter(|_| dev.is_none()) {
            let q = p.q.as_tensor();
            let k = p.k.as_tensor();
            let v = p.v.as_tensor();
            blocks.push(BlockWeights {
                qkv: packed(&[q, k, v], precision)?,
                q: packed(&[q], precision)?,
                kv: packed(&[k, v], precision)?,
                o: packed(&[p.o.as_tensor()], precision)?,
                gate_up: packed(&[p.gate.as_tensor(), p.up.as_tensor()], precision)?,
                down: packed(&[p.down.as_tensor()], precision)?,
            });
        }
        let norms = slot_norms(model)?
            .into_iter()
            .map(|(a, b, key)| Ok((host(a)?, host(b)?, key)))
            .collect::<Result<Vec<_>>>()?;
        let (cos, sin) = model.rope_tables();
        let cos = host(cos)?;
        let sin = host(sin)?;
        let slots_where = |f: &dyn Fn(&Segment) -> bool| -> Vec<usize> {
            (0..plan.num_slots())
                .filter(|&s| f(&plan.slots[s].segment))
                .collect()
        };
        let prelude = slots_where(&|s| *s == Segment::Prelude);
        let coda = slots_where(&|s| *s == Segment::Coda);
        let n_r = plan.num_recursions;
        let (stages, stage_depth) = if plan.is_cyclic() {
            let st: Vec<Vec<usize>> = (1..=n_r)
                .map(|r| {
                    slots_where(&|s| matches!(s, Segment::Recursion { step, .. } if *step == r))
                })
                .collect();
            (st, (1..=n_r).collect())
        } else {
            (
                vec![slots_where(&|s| matches!(s, Segment::Recursion { .. }))],
                vec![n_r],
            )
        };
        let routing = model.routing_kind();
        if routing.is_some() && !plan.is_cyclic() {
            return Err(Error::msg(
                "routing needs a cyclic plan (cycle or middle_cycle)",
            ));
        }
        let max_stages = match max_depth {
            None => stages.len(),
            Some(d) if (1..=n_r).contains(&d) && plan.is_cyclic() => d,
            Some(d) if d == n_r => stages.len(),
            Some(d) => {
                return Err(Error::msg(format!(
                "max_depth {d} is not allowed: use 1..={n_r} (a non-cyclic plan allows only {n_r})"
            )))
            }
        };
        if let ExitRule::GateThresholds(t) = &exit {
            if routing != Some(RoutingKind::ExpertChoice) {
                return Err(Error::msg(
                    "gate thresholds apply to expert-choice routers only",
                ));
            }
            if t.len() != n_r || t.iter().any(|x| x.is_nan()) {
                return Err(Error::msg(format!(
                    "gate thresholds must be {n_r} numbers (one per recursion step), got {t:?}"
                )));
            }
        }
        let mut lora: Vec<Option<SlotHostLora>> = (0..plan.num_slots()).map(|_| None).collect();
        let mut prompt: Vec<Option<HostPrompt>> = (0..plan.num_slots()).map(|_| None).collect();
        let mut encoding = Vec::new();
        let mut lora_scale = 0f32;
        if let Some(relax) = model.relaxation() {
            lora_scale = relax.scale() as f32;
            let cpu = mor_kernels::reference::ReferenceBackend::new(Device::Cpu);
            for s in 0..plan.num_slots() {
                let bp = &model.blocks()[plan.slots[s].block];
                if let Some(sl) = relax.lora(s) {
                    let h = |p: &Option<crate::relax::LoraPair>, w: &candle_core::Var| {
                        p.as_ref()
                            .map(|p| HostLora::new(relax, w.as_tensor(), p))
                            .transpose()
                    };
                    lora[s] = Some(SlotHostLora {
                        q: h(&sl.q, &bp.q)?,
                        k: h(&sl.k, &bp.k)?,
                        v: h(&sl.v, &bp.v)?,
                        o: h(&sl.o, &bp.o)?,
                    });
                }
                if let Some((k, v, gate)) =
                    relax.prompt_kv(&cpu, s, bp.k.as_tensor(), bp.v.as_tensor())?
                {
                    prompt[s] = Some(HostPrompt {
                        len: k.dim(0)?,
                        k: host(&k)?,
                        v: host(&v)?,
                        gate: host(&gate)?,
                    });
                }
            }
            for step in 1..=n_r {
                match relax.encoding(step) {
                    Some(e) => encoding.push(host(e.as_tensor())?),
                    None => break,
                }
            }
        }
        Ok(Runner {
            lora,
            lora_scale,
            prompt,
            encoding,
            scratch: Default::default(),
            model,
            flops: Default::default(),
            blocks,
            norms,
            final_norm: host(model.final_norm_weight().as_tensor())?,
            embed: host(model.embedding().as_tensor())?,
            head: match dev {
                None => Some(packed(&[model.lm_head_weight().as_tensor()], precision)?),
                Some(_) => None,
            },
            dev,
            cos,
            sin,
            d: m.hidden_size,
            hq: m.num_heads,
            hkv: m.num_kv_heads,
            dh: m.head_dim,
            vocab: m.vocab_size,
            eps: m.rms_eps as f32,
            ff: m.intermediate_size,
            scale: 1.0 / (m.head_dim as f32).sqrt(),
            context: m.seq_len,
            prelude,
            coda,
            stages,
            stage_depth,
            routing,
            exit,
            max_stages,
        })
    }

    /// A decode cache for this model: the KV policy's own cache for cyclic plans; a
    /// recursion-wise cache for non-cyclic plans, whose full forward gives every slot its
    /// own K/V whatever the policy (see `MorModel::forward`); K/V stored in `kv_precision`
    /// (a device cache allocates its pool once, in that precision).
    pub fn new_cache(
        &self,
        block_tokens: usize,
        max_blocks: usize,
        kv_precision: KvPrecision,
    ) -> Result<Box<dyn DecodeCache>> {
        let m = &self.model.config().model;
        let spec = DecodeCacheSpec {
            plan: self.model.plan().clone(),
            num_kv_heads: m.num_kv_heads,
            head_dim: m.head_dim,
            block_tokens,
            max_blocks,
        };
        // Every plan: under recursive sharing the cache maps a step >= 2 slot to the step-1
        // slot of the same layer, as the model's forward does (spec §4).
        if let Some(dev) = &self.dev {
            return dev.new_cache(self.model.kv_policy().as_ref(), &spec, kv_precision);
        }
        let mut cache = self.model.kv_policy().new_decode_cache(&spec)?;
        cache.set_kv_precision(kv_precision)?;
        Ok(cache)
    }

    /// Whether this runner computes on the device path.
    pub fn on_device(&self) -> bool {
        self.dev.is_some()
    }

    /// The slots a token of stage `s` writes to in `cache`.
    pub fn writing(&self, cache: &dyn DecodeCache, slots: &[usize]) -> Vec<usize> {
        slots.iter().copied().filter(|&s| cache.writes(s)).collect()
    }

    /// Hidden states `[n, d]` (row-major) from rows of `d`.
    pub fn stack(&self, rows: &[&[f32]]) -> Vec<f32> {
        let mut flat = Vec::with_capacity(rows.len() * self.d);
        for r in rows {
            flat.extend_from_slice(r);
        }
        flat
    }

    /// The rows of `h: [n, d]`.
    pub fn unstack(&self, h: &[f32]) -> Vec<Vec<f32>> {
        h.chunks_exact(self.d).map(<[f32]>::to_vec).collect()
    }

    /// `h: [n, d]` as a tensor `[n, 1, d]` on the model's device (n one-token rows, for
    /// the routers).
    fn rows_tensor(&self, h: &[f32]) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            h,
            (h.len() / self.d, 1, self.d),
            self.model.embedding().as_tensor().device(),
        )?)
    }

    /// Embeddings `[n, d]` of `ids`.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut h = Vec::with_capacity(ids.len() * self.d);
        for &i in ids {
            let i = i as usize;
            if i >= self.vocab {
                return Err(Error::msg(format!(
                    "token id {i} is outside the vocabulary of {} ids",
                    self.vocab
                )));
            }
            h.extend_from_slice(&self.embed[i * self.d..(i + 1) * self.d]);
        }
        Ok(h)
    }

    /// Logits (one row of `vocab` per token) of the final hidden states `h: [n, d]`: final
    /// RMSNorm, LM head.
    pub fn head(&self, h: &[f32]) -> Result<Vec<Vec<f32>>> {
        let head = match (&self.dev, &self.head) {
            (Some(dev), _) => return dev.head(h, &self.flops),
            (None, Some(head)) => head,
            (None, None) => return Err(Error::msg("the host runner has no packed LM head")),
        };
        let mut x = vec![0f32; h.len()];
        rms_norm_rows(h, &self.final_norm, self.eps, &mut x)?;
        let mut logits = vec![0f32; (h.len() / self.d) * self.vocab];
        head.matmul(&x, &mut logits, false)?;
        let mut f = self.flops.get();
        f.head += 2 * (h.len() * self.vocab) as u64;
        self.flops.set(f);
        Ok(logits
            .chunks_exact(self.vocab)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// Runs every token through the layer slots `slots[i]` (one list per token, all of the
    /// same length), appending K/V where the cache stores and attending over the views.
    ///
    /// The caller makes sure the cache has the blocks the appends need
    /// ([`DecodeCache::blocks_needed`]); an append that fails anyway is returned as an
    /// error.
    ///
    /// # Shapes
    /// `h: [n, d]` → `[n, d]` (row-major).
    pub fn run_layers(
        &self,
        cache: &mut dyn DecodeCache,
        h: Vec<f32>,
        toks: &[Tok],
        slots: &[&[usize]],
    ) -> Result<Vec<f32>> {
        let n = toks.len();
        if h.len() != n * self.d {
            return Err(Error::msg(format!(
                "hidden states of {} values for {n} tokens of {}",
                h.len(),
                self.d
            )));
        }
        if n == 0 {
            return Ok(h);
        }
        let depth = slots[0].len();
        if slots.len() != n || slots.iter().any(|s| s.len() != depth) {
            return Err(Error::msg(
                "every token of a batch must run the same number of layer slots",
            ));
        }
        if let Some(dev) = &self.dev {
            return dev.run_layers(cache, h, toks, slots, &self.flops);
        }
        let d = self.d;
        let mut h = h;
        for j in 0..depth {
            let slot_j: Vec<usize> = slots.iter().map(|s| s[j]).collect();
            // The recursion encoding of step r enters with the hidden state of the step's
            // first layer (spec §6), as in `MorModel::forward`.
            if !self.encoding.is_empty() {
                for (i, &s) in slot_j.iter().enumerate() {
                    if let Segment::Recursion { step, layer: 0 } =
                        self.model.plan().slots[s].segment
                    {
                        if let Some(e) = self.encoding.get(step - 1) {
                            h[i * d..(i + 1) * d]
                                .iter_mut()
                                .zip(e)
                                .for_each(|(a, b)| *a += b);
                        }
                    }
                }
            }
            let key = |i: usize| {
                let s = slot_j[i];
                (self.model.plan().slots[s].block, self.norms[s].2)
            };
            let first = key(0);
            if (1..n).all(|i| key(i) == first) {
                self.layer(cache, &mut h, toks, &slot_j)?;
            } else {
                // Tokens whose slots use different blocks (a non-cyclic plan mixed with
                // another, or per-slot norms): one product group per block.
                let mut groups: Vec<((usize, usize), Vec<usize>)> = Vec::new();
                for i in 0..n {
                    let k = key(i);
                    match groups.iter_mut().find(|g| g.0 == k) {
                        Some(g) => g.1.push(i),
                        None => groups.push((k, vec![i])),
                    }
                }
                for (_, members) in groups {
                    let mut hg: Vec<f32> = Vec::with_capacity(members.len() * d);
                    for &i in &members {
                        hg.extend_from_slice(&h[i * d..(i + 1) * d]);
                    }
                    let tg: Vec<Tok> = members.iter().map(|&i| toks[i]).collect();
                    let sg: Vec<usize> = members.iter().map(|&i| slot_j[i]).collect();
                    self.layer(cache, &mut hg, &tg, &sg)?;
                    for (row, &i) in hg.chunks_exact(d).zip(&members) {
                        h[i * d..(i + 1) * d].copy_from_slice(row);
                    }
                }
            }
        }
        Ok(h)
    }

    /// Rotates `x` (`heads` heads of `dh`, head-major) to position `pos`, HF rotate_half
    /// form (spec §1.1).
    fn rope(&self, x: &mut [f32], pos: u32) {
        let half = self.dh / 2;
        let p = pos as usize;
        let (c, s) = (
            &self.cos[p * half..(p + 1) * half],
            &self.sin[p * half..(p + 1) * half],
        );
        for head in x.chunks_exact_mut(self.dh) {
            let (x1, x2) = head.split_at_mut(half);
            for k in 0..half {
                let (a, b) = (x1[k], x2[k]);
                x1[k] = a * c[k] - b * s[k];
                x2[k] = b * c[k] + a * s[k];
            }
        }
    }

    /// One decoder layer (pre-norm attention and SwiGLU MLP, spec §1.1), in place on `h:
    /// [n, d]`, for tokens whose slots all use the same block and norms.
    fn layer(
        &self,
        cache: &mut dyn DecodeCache,
        h: &mut [f32],
        toks: &[Tok],
        slots: &[usize],
    ) -> Result<()> {
        let n = toks.len();
        let plan = self.model.plan();
        let bw = &self.blocks[plan.slots[slots[0]].block];
        let (an, mn, _) = &self.norms[slots[0]];
        let (qd, kvd) = (self.hq * self.dh, self.hkv * self.dh);
        let max_pos = self.cos.len() / (self.dh / 2).max(1);
        if let Some(t) = toks.iter().find(|t| t.pos as usize >= max_pos) {
            return Err(Error::msg(format!(
                "position {} is beyond the RoPE table of {max_pos} positions",
                t.pos
            )));
        }
        // The buffers go back in the cell at the end (an error leaves fresh ones there).
        let mut scratch = self.scratch.take();
        let Scratch {
            x,
            q: q_buf,
            xs,
            kv: kv_buf,
            att,
            k,
            gu,
            s,
        } = &mut scratch;
        let x = work(x, h.len());
        rms_norm_rows(h, an, self.eps, x)?;
        let writes: Vec<bool> = slots.iter().map(|&s| cache.writes(s)).collect();
        // Rows of `[q | k | v]` when every token stores K/V here; otherwise queries for
        // all and `[k | v]` for the tokens that store (recursive sharing projects no K/V at
        // steps >= 2, spec §4).
        let all_write = writes.iter().all(|&w| w);
        let (q, q_ld, kv, kv_ld, kv_row): (&mut [f32], usize, &mut [f32], usize, Vec<usize>) =
            if all_write {
                let ld = bw.qkv.n();
                let qkv = work(q_buf, n * ld);
                bw.qkv.matmul(x, qkv, false)?;
                (qkv, ld, &mut [], ld, (0..n).collect())
            } else {
                let q = work(q_buf, n * qd);
                bw.q.matmul(x, q, false)?;
                let w_idx: Vec<usize> = (0..n).filter(|&i| writes[i]).collect();
                xs.clear();
                for &i in &w_idx {
                    xs.extend_from_slice(&x[i * self.d..(i + 1) * self.d]);
                }
                let kv = work(kv_buf, w_idx.len() * 2 * kvd);
                bw.kv.matmul(xs, kv, false)?;
                let mut row = vec![usize::MAX; n];
                for (r, &i) in w_idx.iter().enumerate() {
                    row[i] = r;
                }
                (q, qd, kv, 2 * kvd, row)
            };
        let n_writes = writes.iter().filter(|&&w| w).count();
        let macs = |m: &PackedMatrix| m.n() * m.k();
        let mut linear = n * (macs(&bw.q) + macs(&bw.o) + macs(&bw.gate_up) + macs(&bw.down))
            + n_writes * macs(&bw.kv);
        // Elementwise multiplies (a DoRA's output scales), one FLOP each.
        let mut scales = 0usize;
        // Each item's own (depth's) low-rank terms on top of the shared products (spec §6).
        let d = self.d;
        for i in 0..n {
            let Some(l) = &self.lora[slots[i]] else {
                continue;
            };
            let xi = &x[i * d..(i + 1) * d];
            if let Some(p) = &l.q {
                p.add(xi, &mut q[i * q_ld..i * q_ld + qd], self.lora_scale);
                linear += p.macs();
                scales += p.scales();
            }
            if writes[i] {
                let row = if all_write {
                    &mut q[i * q_ld + qd..(i + 1) * q_ld]
                } else {
                    &mut kv[kv_row[i] * kv_ld..(kv_row[i] + 1) * kv_ld]
                };
                let (kr, vr) = row.split_at_mut(kvd);
                if let Some(p) = &l.k {
                    p.add(xi, kr, self.lora_scale);
                    linear += p.macs();
                    scales += p.scales();
                }
                if let Some(p) = &l.v {
                    p.add(xi, vr, self.lora_scale);
                    linear += p.macs();
                    scales += p.scales();
                }
            }
        }
        let mut attention = 0usize;
        let att = work(att, n * qd);
        let k = work(k, kvd);
        // Every token's K/V is stored before any token attends. A query sees only the
        // positions up to its own, and the tokens of one request are stored in position
        // order as before, so each view shows the entries it showed when tokens stored and
        // attended in turn; this way the next token's blocks can be fetched from memory
        // while the current one attends.
        for i in 0..n {
            let Tok { req, pos } = toks[i];
            let qi = &mut q[i * q_ld..i * q_ld + qd];
            self.rope(qi, pos);
            if writes[i] {
                let row = if all_write {
                    &q[i * q_ld + qd..(i + 1) * q_ld]
                } else {
                    &kv[kv_row[i] * kv_ld..(kv_row[i] + 1) * kv_ld]
                };
                let (kr, v) = row.split_at(kvd);
                k.copy_from_slice(kr);
                self.rope(k, pos);
                cache.append(req, slots[i], pos, k, v)?;
            }
        }
        if let Some(t) = toks.first() {
            cache.view(t.req, slots[0])?.prefetch(t.pos);
        }
        for i in 0..n {
            let Tok { req, pos } = toks[i];
            if let Some(t) = toks.get(i + 1) {
                cache.view(t.req, slots[i + 1])?.prefetch(t.pos);
            }
            let view = cache.view(req, slots[i])?;
            attention += 2 * qd * view.visible_len(pos);
            attend_into(
                &view,
                &q[i * q_ld..i * q_ld + qd],
                pos,
                self.hq,
                self.scale,
                &mut att[i * qd..(i + 1) * qd],
            )?;
            // This item's depth's adaption prompt, with a softmax of its own (spec §6.4).
            if let Some(p) = &self.prompt[slots[i]] {
                p.add(
                    &q[i * q_ld..i * q_ld + qd],
                    &mut att[i * qd..(i + 1) * qd],
                    self.dh,
                    self.hkv,
                    self.scale,
                );
                attention += 2 * qd * p.len;
            }
        }
        let o_lora = |i: usize| self.lora[slots[i]].as_ref().and_then(|l| l.o.as_ref());
        if (0..n).any(|i| o_lora(i).is_some_and(|p| p.dora.is_some())) {
            // A DoRA on o_proj scales the whole projection: the shared product into its own
            // rows, each item's low-rank term and scale, then the residual.
            let mut o = vec![0f32; n * d];
            bw.o.matmul(att, &mut o, false)?;
            for i in 0..n {
                let row = &mut o[i * d..(i + 1) * d];
                if let Some(p) = o_lora(i) {
                    p.add(&att[i * qd..(i + 1) * qd], row, self.lora_scale);
                    linear += p.macs();
                    scales += p.scales();
                }
                h[i * d..(i + 1) * d]
                    .iter_mut()
                    .zip(row.iter())
                    .for_each(|(a, b)| *a += b);
            }
        } else {
            bw.o.matmul(att, h, true)?;
            for i in 0..n {
                if let Some(p) = o_lora(i) {
                    p.add(
                        &att[i * qd..(i + 1) * qd],
                        &mut h[i * d..(i + 1) * d],
                        self.lora_scale,
                    );
                    linear += p.macs();
                }
            }
        }
        rms_norm_rows(h, mn, self.eps, x)?;
        let gu = work(gu, n * 2 * self.ff);
        bw.gate_up.matmul(x, gu, false)?;
        let s = work(s, n * self.ff);
        swiglu_rows(gu, self.ff, s)?;
        bw.down.matmul(s, h, true)?;
        self.scratch.replace(scratch);
        linear = 2 * linear + scales;
        let mut f = self.flops.get();
        f.linear += linear as u64;
        f.attention += 2 * attention as u64;
        self.flops.set(f);
        Ok(())
    }

    /// Expert-choice decisions of recursion step `step` for tokens with hidden states `h:
    /// [n, d]`, each active at step `step - 1`.
    ///
    /// Each token is its own one-token row, so the decision depends on its own hidden state
    /// only. [`ExitRule::Router`] runs the router in [`RouteMode::Causal`]: exactly the rule
    /// of a causal forward. [`ExitRule::GateThresholds`] runs it in
    /// [`RouteMode::FullSequence`], whose top-`max(1, ⌊cap·1⌋)` of a one-token row keeps
    /// the token, so the router returns the gate of every token; the thresholds then decide.
    pub fn route_expert(&self, step: usize, h: &[f32]) -> Result<Vec<ExpertDecision>> {
        let router = self.model.router().ok_or_else(|| Error::msg("no router"))?;
        let n = h.len() / self.d;
        if n == 0 {
            return Ok(Vec::new());
        }
        let h3 = self.rows_tensor(h)?;
        let mode = match self.exit {
            ExitRule::Router => RouteMode::Causal,
            ExitRule::GateThresholds(_) => RouteMode::FullSequence,
        };
        let mut st = router.begin(&h3, mode)?;
        let empty = vec![Vec::new(); n];
        for s in 1..step {
            router.route(s, &h3, &empty, &mut st, mode)?;
        }
        let rt = router.route(step, &h3, &vec![vec![0u32]; n], &mut st, mode)?;
        if !matches!(rt.update, Update::Residual) {
            return Err(Error::msg(format!(
                "expert-choice router `{}` returned a non-residual update",
                router.name()
            )));
        }
        let gates = match &rt.gate {
            Some(g) => Some(mor_kernels::host_sync::to_host::<f32>(g)?),
            None => None,
        };
        let mut out = vec![
            ExpertDecision {
                gate: None,
                run: false
            };
            n
        ];
        let mut k = 0;
        for (i, row) in rt.selected.iter().enumerate().take(n) {
            if !row.is_empty() {
                let g = match &gates {
                    Some(g) => *g
                        .get(k)
                        .ok_or_else(|| Error::msg("router returned fewer gates than tokens"))?,
                    None => 1.0,
                };
                k += 1;
                out[i] = ExpertDecision {
                    gate: Some(g),
                    run: true,
                };
            }
        }
        if let ExitRule::GateThresholds(t) = &self.exit {
            if gates.is_none() {
                return Err(Error::msg(
                    "gate thresholds need a gated router (gating = \"weighted\")",
                ));
            }
            let th = t[step - 1];
            for o in out.iter_mut() {
                o.run = o.gate.is_some_and(|g| g as f64 >= th);
            }
        }
        Ok(out)
    }

    /// Token-choice decisions of tokens whose recursion input is `h1: [n, d]`: depth (0 when
    /// the router sends a token nowhere), gate and the intermediate gating flag, read from
    /// the router's own `route` calls.
    pub fn route_token(&self, h1: &[f32]) -> Result<Vec<TokenChoice>> {
        let router = self.model.router().ok_or_else(|| Error::msg("no router"))?;
        let n = h1.len() / self.d;
        let mut out = vec![
            TokenChoice {
                depth: 0,
                gate: 1.0,
                gate_intermediate: false
            };
            n
        ];
        if n == 0 {
            return Ok(out);
        }
        let h3 = self.rows_tensor(h1)?;
        let mut st = router.begin(&h3, RouteMode::Causal)?;
        let mut active = vec![vec![0u32]; n];
        for s in 1..=self.stages.len() {
            let rt = router.route(s, &h3, &active, &mut st, RouteMode::Causal)?;
            let gi = match &rt.update {
                Update::TokenChoice {
                    gate_intermediate, ..
                } => *gate_intermediate,
                Update::Residual => {
                    return Err(Error::msg(format!(
                        "token-choice router `{}` returned a residual update",
                        router.name()
                    )))
                }
            };
            let gates = match &rt.gate {
                Some(g) => Some(mor_kernels::host_sync::to_host::<f32>(g)?),
                None => None,
            };
            let mut k = 0;
            for (i, row) in rt.selected.iter().enumerate().take(n) {
                if !row.is_empty() {
                    out[i].depth = s;
                    out[i].gate = gates
                        .as_ref()
                        .and_then(|g| g.get(k).copied())
                        .unwrap_or(1.0);
                    out[i].gate_intermediate = gi;
                    k += 1;
                }
            }
            active = rt.selected;
        }
        Ok(out)
    }

    /// Merges the output `y` of stage `stage` (0-based) into `h`.
    pub fn merge(
        &self,
        merge: Merge,
        stage: usize,
        h: &mut [f32],
        y: &[f32],
        h1: Option<&[f32]>,
    ) -> Result<()> {
        match merge {
            Merge::Plain => h.copy_from_slice(y),
            Merge::Gated(g) => h.iter_mut().zip(y).for_each(|(a, b)| *a += g * b),
            Merge::Token {
                depth,
                gate,
                gate_intermediate,
            } => {
                if stage + 1 == depth {
                    let h1 = h1.ok_or_else(|| Error::msg("token-choice merge needs H¹"))?;
                    for ((a, b), c) in h.iter_mut().zip(y).zip(h1) {
                        *a = c + gate * b;
                    }
                } else if gate_intermediate {
                    h.iter_mut().zip(y).for_each(|(a, b)| *a = gate * b);
                } else {
                    h.copy_from_slice(y);
                }
            }
        }
        Ok(())
    }

    /// Whether a token that skipped stage 0 would break the cache (sharing and hybrid read
    /// the step-1 K/V of every earlier token, spec §4).
    pub fn needs_first_stage(&self, cache: &dyn DecodeCache) -> bool {
        cache.mode() != DecodeMode::RecursionWise
            && self.model.plan().is_cyclic()
            && self.stages.len() > 1
    }

    /// An error for a token that skipped step 1 under a policy that needs it.
    pub fn first_stage_error(&self) -> Error {
        Error::msg(format!(
            "KV policy `{}` reuses the step-1 keys/values, so every token must run step 1 \
             (set the router's first capacity to 1)",
            self.model.kv_policy().name()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{ExitRule, Runner};
    use crate::model::MorModel;
    use mor_core::config::{Config, Precision};
    use mor_kernels::host_sync::Scope;
    use mor_router::RouteMode;

    /// An expert-choice decision reads through `host_sync` only: the router's own reads plus
    /// one read of the gates, on the one counter.
    #[test]
    fn routing_reads_are_counted_through_host_sync() {
        let _ = crate::builtin::link();
        let cfg = Config::from_toml_str(
            "[model]\npreset = \"micro\"\nnum_layers = 8\nseq_len = 16\n\
             [recursion]\nnum_recursions = 3\nsharing = { kind = \"middle_cycle\" }\n\
             [router]\nkind = \"expert_choice\"\n[train]\nbudget = { steps = 1 }",
        )
        .unwrap();
        let model = MorModel::new(&cfg).unwrap();
        let r = Runner::new_on(&model, ExitRule::Router, None, Precision::F32, true).unwrap();
        let h = r.embed(&[3, 5, 7]).unwrap();
        // The router's own reads for the same decision.
        let router = model.router().unwrap();
        let h3 = r.rows_tensor(&h).unwrap();
        let s = Scope::start();
        let mut st = router.begin(&h3, RouteMode::Causal).unwrap();
        let rt = router
            .route(1, &h3, &vec![vec![0u32]; 3], &mut st, RouteMode::Causal)
            .unwrap();
        let own = s.counts().reads;
        assert!(rt.gate.is_some());
        let s = Scope::start();
        let d = r.route_expert(1, &h).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(s.counts().reads, own + 1, "the gates' read is counted");
    }
}
