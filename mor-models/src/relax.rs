//! Relaxation of the shared weights per recursion depth (spec §6.4, relaxation table;
//! Relaxed Recursive Transformers, Bae et al. 2024, arXiv 2410.20672, which gives each
//! depth its own adapters on top of the shared block): a learned recursion encoding added
//! to the hidden state entering each step, or per depth and layer of the shared block a
//! LoRA, a DoRA or an adaption prompt.
//!
//! Per recursion slot (depth `r`, layer of the shared block), with `s = alpha / rank`:
//!
//! - **LoRA**: `y = W x + s · B_r (A_r x)` on each target projection.
//! - **DoRA** (Liu et al. 2024, arXiv 2402.09353): the same low-rank update, then each output
//!   row rescaled to a learned magnitude, `W'_r = diag(m_r / n_r) (W + s · B_r A_r)` with
//!   `n_r = ‖W + s · B_r A_r‖_row` (the L2 norm of every output row of the `[d_out, d_in]`
//!   weight), so `y = (m_r / n_r) ⊙ (W x + s · B_r (A_r x))`; `m_r: [d_out]` starts at the
//!   row norms of `W`. The training forward lets the gradient flow through `n_r` (the exact
//!   gradient of the formula); PEFT's DoRA detaches the norm (the paper's §4.3 memory
//!   saving), which changes the gradients of `A_r`, `B_r` but not the forward values.
//! - **Adaption prompt** (LLaMA-Adapter, Zhang et al. 2023, arXiv 2303.16199): a learned
//!   prefix `P_r: [P, d]` and a per-head gate `g_r: [n_head]`. The prefix keys and values
//!   are the layer's own projections `K_p = P_r W_kᵀ`, `V_p = P_r W_vᵀ` (no norm and no RoPE
//!   on the prefix; query head `h` reads KV head `h / (n_head / n_kv_head)`, as the GQA
//!   attention does). Every query (after its RoPE) attends to all `P` entries with a softmax
//!   of its own, and the attention output before `o_proj` gains
//!   `tanh(g_{r,h}) · softmax(q_h K_{p,h}ᵀ / √d_head) V_{p,h}` per head. The prefix K/V are
//!   recomputed from the shared weights at every forward (the decode engine computes them
//!   once per depth and layer at load), never stored in a KV cache, so KV sharing does not
//!   touch them: a step that reuses the step-1 K/V of its tokens still attends to its own
//!   depth's prefix.
//!
//! Every relaxation starts as the identity, so that an untrained relaxed model equals its
//! base model: the encoding, every `B_r` and every gate `g_r` start at zero, and DoRA's
//! `m_r` at the row norms of `W`. `A_r` and the prefix are N(0, init_std).

use crate::error::Result;
use crate::model::NamedVar;
use candle_core::{DType, Device, Tensor, Var};
use mor_core::config::{Relaxation, ResolvedConfig};
use mor_core::plan::Segment;
use mor_core::rng::Rng;
use mor_kernels::Backend;

/// The low-rank adapter of one projection: `A: [rank, d_in]`, `B: [d_out, rank]`, and for a
/// DoRA the magnitude `m: [d_out]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Down projection `A_r: [rank, d_in]`, N(0, init_std).
    pub a: Var,
    /// Up projection `B_r: [d_out, rank]`, zero-initialised.
    pub b: Var,
    /// DoRA's magnitude `m_r: [d_out]` (the row norms of `W` at initialisation); `None`
    /// for a LoRA.
    pub magnitude: Option<Var>,
}

/// The LoRA (or DoRA) adapters of one recursion slot (one depth r, one layer of the shared
/// block).
#[derive(Debug, Clone, Default)]
pub struct SlotLora {
    /// On `q_proj`.
    pub q: Option<LoraPair>,
    /// On `k_proj`.
    pub k: Option<LoraPair>,
    /// On `v_proj`.
    pub v: Option<LoraPair>,
    /// On `o_proj`.
    pub o: Option<LoraPair>,
}

/// The adaption prompt of one recursion slot (one depth r, one layer of the shared block).
#[derive(Debug, Clone)]
pub struct SlotPrompt {
    /// The learned prefix `P_r: [P, d]`, N(0, init_std).
    pub prefix: Var,
    /// The per-head gate `g_r: [n_head]` (zero-initialised; the output is scaled by
    /// `tanh(g_r)`).
    pub gate: Var,
}

/// Every relaxation parameter of a model.
#[derive(Debug, Clone)]
pub struct Relax {
    /// Per recursion step r = 1..=N_r (index r − 1), the encoding `e_r: [d]`.
    encoding: Vec<Var>,
    /// Per plan slot, the LoRA / DoRA of that slot (recursion slots only).
    lora: Vec<Option<SlotLora>>,
    /// Per plan slot, the adaption prompt of that slot (recursion slots only).
    prompt: Vec<Option<SlotPrompt>>,
    /// `alpha / rank`.
    scale: f64,
    /// Per plan slot, `(step, block)` of a recursion slot, for names.
    labels: Vec<Option<(usize, usize)>>,
}

/// The row norms `‖w_o‖₂` of `w: [d_out, d_in]` → `[d_out]`.
fn row_norms(w: &Tensor) -> Result<Tensor> {
    Ok(w.sqr()?.sum(1)?.sqrt()?)
}

impl Relax {
    /// Builds the relaxation of `cfg` (`None` when it has none). `projects_kv(step)` tells
    /// whether recursion step `step` projects K/V (a step that reuses the step-1 K/V gets no
    /// K/V adapters: nothing would read them). `weight(block, target)` is the shared weight
    /// `[d_out, d_in]` of `target` (`q_proj`, `k_proj`, `v_proj` or `o_proj`) in `block`,
    /// which a DoRA's magnitudes start from.
    ///
    /// # Errors
    /// Tensor creation.
    pub fn new(
        cfg: &ResolvedConfig,
        dtype: DType,
        dev: &Device,
        projects_kv: &dyn Fn(usize) -> bool,
        weight: &dyn Fn(usize, &str) -> Option<Tensor>,
    ) -> Result<Option<Self>> {
        let Some(kind) = &cfg.recursion.relaxation else {
            return Ok(None);
        };
        let m = &cfg.model;
        let d = m.hidden_size;
        let labels: Vec<Option<(usize, usize)>> = cfg
            .plan
            .slots
            .iter()
            .map(|s| match s.segment {
                Segment::Recursion { step, .. } => Some((step, s.block)),
                _ => None,
            })
            .collect();
        let mut relax = Relax {
            encoding: Vec::new(),
            lora: vec![None; labels.len()],
            prompt: vec![None; labels.len()],
            scale: 0.0,
            labels: labels.clone(),
        };
        let normal = |name: &str, shape: (usize, usize)| -> Result<Var> {
            let data = Rng::derive(cfg.seed, name).normal_vec(shape.0 * shape.1, m.init_std);
            let t = Tensor::from_vec(data, shape, dev)?.to_dtype(dtype)?;
            Ok(Var::from_tensor(&t)?)
        };
        match kind {
            Relaxation::RecursionEncoding => {
                for _ in 0..cfg.plan.num_recursions {
                    relax
                        .encoding
                        .push(Var::from_tensor(&Tensor::zeros(d, dtype, dev)?)?);
                }
            }
            Relaxation::AdaptionPrompt { prompt_len } => {
                for (slot, label) in labels.iter().enumerate() {
                    let Some((step, block)) = label else { continue };
                    relax.prompt[slot] = Some(SlotPrompt {
                        prefix: normal(&prompt_name(*step, *block, "prefix"), (*prompt_len, d))?,
                        gate: Var::from_tensor(&Tensor::zeros(m.num_heads, dtype, dev)?)?,
                    });
                }
            }
            Relaxation::Lora { .. } | Relaxation::Dora { .. } => {
                let Some((rank, alpha, targets)) = kind.low_rank() else {
                    return Ok(None);
                };
                let dora = matches!(kind, Relaxation::Dora { .. });
                relax.scale = alpha / rank as f64;
                let (qd, kvd) = (m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim);
                for (slot, label) in labels.iter().enumerate() {
                    let Some((step, block)) = label else { continue };
                    let mut sl = SlotLora::default();
                    for t in targets {
                        if matches!(t.as_str(), "k_proj" | "v_proj") && !projects_kv(*step) {
                            continue;
                        }
                        let (d_in, d_out) = match t.as_str() {
                            "q_proj" => (d, qd),
                            "k_proj" | "v_proj" => (d, kvd),
                            _ => (qd, d),
                        };
                        let name = |which: &str| {
                            if dora {
                                dora_name(*step, *block, t, which)
                            } else {
                                lora_name(*step, *block, t, which)
                            }
                        };
                        let magnitude = if dora {
                            let w = weight(*block, t).ok_or_else(|| {
                                crate::error::Error::msg(format!(
                                    "DoRA on {t} of block {block}: the model has no such weight"
                                ))
                            })?;
                            Some(Var::from_tensor(&row_norms(&w)?.to_dtype(dtype)?)?)
                        } else {
                            None
                        };
                        let pair = LoraPair {
                            a: normal(&name("A"), (rank, d_in))?,
                            b: Var::from_tensor(&Tensor::zeros((d_out, rank), dtype, dev)?)?,
                            magnitude,
                        };
                        match t.as_str() {
                            "q_proj" => sl.q = Some(pair),
                            "k_proj" => sl.k = Some(pair),
                            "v_proj" => sl.v = Some(pair),
                            _ => sl.o = Some(pair),
                        }
                    }
                    relax.lora[slot] = Some(sl);
                }
            }
        }
        Ok(Some(relax))
    }

    /// Sets every DoRA magnitude `m_r` to the row norms of its current shared weight
    /// `weight(block, target)`, so that a model whose shared weights were replaced after
    /// construction (an uptraining initialisation) again starts equal to its base model. A
    /// no-op without DoRA.
    ///
    /// # Errors
    /// A missing weight, or tensor operations.
    pub fn reset_magnitudes(&self, weight: &dyn Fn(usize, &str) -> Option<Tensor>) -> Result<()> {
        for (slot, l) in self.lora.iter().enumerate() {
            let (Some(l), Some((_, block))) = (l, self.labels[slot]) else {
                continue;
            };
            for (t, p) in l.targets() {
                let Some(m) = &p.magnitude else { continue };
                let w = weight(block, t).ok_or_else(|| {
                    crate::error::Error::msg(format!(
                        "DoRA on {t} of block {block}: the model has no such weight"
                    ))
                })?;
                m.set(&row_norms(&w)?.to_dtype(m.dtype())?)?;
            }
        }
        Ok(())
    }

    /// The parameters with their checkpoint names: `model.relax.encoding.{step}`,
    /// `model.relax.lora.{step}.{block}.{target}.{A,B}`,
    /// `model.relax.dora.{step}.{block}.{target}.{A,B,m}` and
    /// `model.relax.prompt.{step}.{block}.{prefix,gate}`.
    pub fn named_vars(&self) -> Vec<NamedVar> {
        let mut v = Vec::new();
        for (i, e) in self.encoding.iter().enumerate() {
            v.push((format!("model.relax.encoding.{}", i + 1), e.clone()));
        }
        for (slot, l) in self.lora.iter().enumerate() {
            let (Some(l), Some((step, block))) = (l, self.labels[slot]) else {
                continue;
            };
            for (t, p) in l.targets() {
                match &p.magnitude {
                    None => {
                        v.push((lora_name(step, block, t, "A"), p.a.clone()));
                        v.push((lora_name(step, block, t, "B"), p.b.clone()));
                    }
                    Some(m) => {
                        v.push((dora_name(step, block, t, "A"), p.a.clone()));
                        v.push((dora_name(step, block, t, "B"), p.b.clone()));
                        v.push((dora_name(step, block, t, "m"), m.clone()));
                    }
                }
            }
        }
        for (slot, p) in self.prompt.iter().enumerate() {
            let (Some(p), Some((step, block))) = (p, self.labels[slot]) else {
                continue;
            };
            v.push((prompt_name(step, block, "prefix"), p.prefix.clone()));
            v.push((prompt_name(step, block, "gate"), p.gate.clone()));
        }
        v
    }

    /// The encoding of recursion step `step` (1-based), if the relaxation has one.
    pub fn encoding(&self, step: usize) -> Option<&Var> {
        step.checked_sub(1).and_then(|i| self.encoding.get(i))
    }

    /// The LoRA (or DoRA) of plan slot `slot`, if any.
    pub fn lora(&self, slot: usize) -> Option<&SlotLora> {
        self.lora.get(slot).and_then(Option::as_ref)
    }

    /// The adaption prompt of plan slot `slot`, if any.
    pub fn prompt(&self, slot: usize) -> Option<&SlotPrompt> {
        self.prompt.get(slot).and_then(Option::as_ref)
    }

    /// Whether plan slot `slot` has adapters that enter its layer (LoRA, DoRA or an
    /// adaption prompt); the encoding enters before the layer.
    pub fn adapts_slot(&self, slot: usize) -> bool {
        self.lora(slot).is_some() || self.prompt(slot).is_some()
    }

    /// `alpha / rank` (0 without LoRA or DoRA).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `W x + scale · B (A x)` on `x: [.., d_in]`, with `W: [d_out, d_in]`; for a DoRA pair
    /// that times `m / ‖W + scale · B A‖_row` per output (gradients flow through the norm).
    pub fn project(
        &self,
        be: &dyn Backend,
        x: &Tensor,
        w: &Tensor,
        pair: Option<&LoraPair>,
    ) -> Result<Tensor> {
        let base = be.linear(x, w)?;
        let Some(p) = pair else {
            return Ok(base);
        };
        let (a, b) = (p.a.as_tensor(), p.b.as_tensor());
        let low = be.linear(&be.linear(x, a)?, b)?;
        let y = (base + (low * self.scale)?)?;
        match &p.magnitude {
            None => Ok(y),
            Some(m) => {
                let merged = (w + (b.matmul(a)? * self.scale)?)?;
                let col = (m.as_tensor() / row_norms(&merged)?)?;
                Ok(y.broadcast_mul(&col)?)
            }
        }
    }

    /// The DoRA output scale `m / ‖W + scale · B A‖_row: [d_out]` of `pair` over `w` (no
    /// graph), `None` for a LoRA pair: the decode engine fixes it at load.
    ///
    /// # Errors
    /// Tensor operations.
    pub fn dora_scale(&self, w: &Tensor, pair: &LoraPair) -> Result<Option<Tensor>> {
        let Some(m) = &pair.magnitude else {
            return Ok(None);
        };
        let (a, b) = (pair.a.as_tensor().detach(), pair.b.as_tensor().detach());
        let merged = (w.detach() + (b.matmul(&a)? * self.scale)?)?;
        Ok(Some((m.as_tensor().detach() / row_norms(&merged)?)?))
    }

    /// The adaption prompt's term of plan slot `slot` on the queries `q: [b, n_head, t,
    /// d_head]` (after RoPE): `tanh(g) · softmax(q K_pᵀ / √d_head) V_p` per head, with `K_p
    /// = P wkᵀ`, `V_p = P wvᵀ` split into `kv_heads` heads (no RoPE) and each KV head read
    /// by its group of query heads. `None` when the slot has no prompt.
    ///
    /// # Errors
    /// Shapes that do not fit, tensor operations.
    pub fn prompt_attention(
        &self,
        be: &dyn Backend,
        slot: usize,
        q: &Tensor,
        wk: &Tensor,
        wv: &Tensor,
        kv_heads: usize,
    ) -> Result<Option<Tensor>> {
        let Some(p) = self.prompt(slot) else {
            return Ok(None);
        };
        let (_, hq, _, dh) = q.dims4()?;
        let plen = p.prefix.as_tensor().dim(0)?;
        let group = hq / kv_heads.max(1);
        // [P, kv_heads·dh] → [hq, P, dh], KV head j repeated for query heads j·group..
        let heads = |x: Tensor| -> Result<Tensor> {
            Ok(x.reshape((plen, kv_heads, dh))?
                .transpose(0, 1)?
                .unsqueeze(1)?
                .broadcast_as((kv_heads, group, plen, dh))?
                .contiguous()?
                .reshape((1, hq, plen, dh))?)
        };
        let kp = heads(be.linear(p.prefix.as_tensor(), wk)?)?;
        let vp = heads(be.linear(p.prefix.as_tensor(), wv)?)?;
        let scores = (q
            .contiguous()?
            .broadcast_matmul(&kp.transpose(2, 3)?.contiguous()?)?
            * (1.0 / (dh as f64).sqrt()))?;
        let w = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
        let out = w.broadcast_matmul(&vp)?;
        let gate = p.gate.as_tensor().tanh()?.reshape((1, hq, 1, 1))?;
        Ok(Some(out.broadcast_mul(&gate)?))
    }

    /// The prefix keys and values `(K_p, V_p)`, each `[P, kv_heads · d_head]` (no graph), of
    /// plan slot `slot`'s prompt over the shared weights `wk`, `wv`, and `tanh(g): [n_head]`;
    /// `None` without a prompt. The decode engine computes them once at load.
    ///
    /// # Errors
    /// Tensor operations.
    pub fn prompt_kv(
        &self,
        be: &dyn Backend,
        slot: usize,
        wk: &Tensor,
        wv: &Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let Some(p) = self.prompt(slot) else {
            return Ok(None);
        };
        let x = p.prefix.as_tensor().detach();
        Ok(Some((
            be.linear(&x, &wk.detach())?,
            be.linear(&x, &wv.detach())?,
            p.gate.as_tensor().detach().tanh()?,
        )))
    }

    /// Adds the encoding of step `step` to `h: [.., d]` (identity without an encoding).
    pub fn encode(&self, h: &Tensor, step: usize) -> Result<Tensor> {
        match self.encoding(step) {
            Some(e) => Ok(h.broadcast_add(e.as_tensor())?),
            None => Ok(h.clone()),
        }
    }
}

impl SlotLora {
    /// `(target, adapter)` of every adapted projection, in the order q, k, v, o.
    pub fn targets(&self) -> Vec<(&'static str, &LoraPair)> {
        [
            ("q_proj", &self.q),
            ("k_proj", &self.k),
            ("v_proj", &self.v),
            ("o_proj", &self.o),
        ]
        .into_iter()
        .filter_map(|(t, p)| p.as_ref().map(|p| (t, p)))
        .collect()
    }
}

/// Checkpoint name of a LoRA matrix.
pub fn lora_name(step: usize, block: usize, target: &str, which: &str) -> String {
    format!("model.relax.lora.{step}.{block}.{target}.{which}")
}

/// Checkpoint name of a DoRA tensor (`A`, `B` or the magnitude `m`).
pub fn dora_name(step: usize, block: usize, target: &str, which: &str) -> String {
    format!("model.relax.dora.{step}.{block}.{target}.{which}")
}

/// Checkpoint name of an adaption-prompt tensor (`prefix` or `gate`).
pub fn prompt_name(step: usize, block: usize, which: &str) -> String {
    format!("model.relax.prompt.{step}.{block}.{which}")
}
