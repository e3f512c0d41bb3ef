//! Relaxation of the shared weights per recursion depth (spec §6, relaxation table):
//! a learned recursion encoding added to the hidden state entering each step, or a LoRA per
//! depth on chosen attention projections of each recursion layer.
//!
//! Both are initialised so that an untrained relaxed model equals its base model (the
//! encoding and every `B_r` start at zero).

use crate::error::Result;
use crate::model::NamedVar;
use candle_core::{DType, Device, Tensor, Var};
use mor_core::config::{Relaxation, ResolvedConfig};
use mor_core::plan::Segment;
use mor_core::rng::Rng;
use mor_kernels::Backend;

/// The low-rank adapter of one projection: `A: [rank, d_in]`, `B: [d_out, rank]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Down projection `A_r: [rank, d_in]`, N(0, init_std).
    pub a: Var,
    /// Up projection `B_r: [d_out, rank]`, zero-initialised.
    pub b: Var,
}

/// The LoRA adapters of one recursion slot (one depth r, one layer of the shared block).
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

/// Every relaxation parameter of a model.
#[derive(Debug, Clone)]
pub struct Relax {
    /// Per recursion step r = 1..=N_r (index r − 1), the encoding `e_r: [d]`.
    encoding: Vec<Var>,
    /// Per plan slot, the LoRA of that slot (recursion slots only).
    lora: Vec<Option<SlotLora>>,
    /// `alpha / rank`.
    scale: f64,
    /// Per plan slot, `(step, block)` of a recursion slot, for names.
    labels: Vec<Option<(usize, usize)>>,
}

impl Relax {
    /// Builds the relaxation of `cfg` (`None` when it has none). `projects_kv(step)` tells
    /// whether recursion step `step` projects K/V (a step that reuses the step-1 K/V gets no
    /// K/V adapters: nothing would read them).
    ///
    /// # Errors
    /// Tensor creation.
    pub fn new(
        cfg: &ResolvedConfig,
        dtype: DType,
        dev: &Device,
        projects_kv: &dyn Fn(usize) -> bool,
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
            scale: 0.0,
            labels: labels.clone(),
        };
        match kind {
            Relaxation::RecursionEncoding => {
                for _ in 0..cfg.plan.num_recursions {
                    relax
                        .encoding
                        .push(Var::from_tensor(&Tensor::zeros(d, dtype, dev)?)?);
                }
            }
            Relaxation::Lora {
                rank,
                alpha,
                targets,
            } => {
                relax.scale = alpha / *rank as f64;
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
                        let name = lora_name(*step, *block, t, "A");
                        let n = rank * d_in;
                        let data = Rng::derive(cfg.seed, &name).normal_vec(n, m.init_std);
                        let a = Tensor::from_vec(data, (*rank, d_in), dev)?.to_dtype(dtype)?;
                        let pair = LoraPair {
                            a: Var::from_tensor(&a)?,
                            b: Var::from_tensor(&Tensor::zeros((d_out, *rank), dtype, dev)?)?,
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

    /// The parameters with their checkpoint names: `model.relax.encoding.{step}` and
    /// `model.relax.lora.{step}.{block}.{target}.{A,B}`.
    pub fn named_vars(&self) -> Vec<NamedVar> {
        let mut v = Vec::new();
        for (i, e) in self.encoding.iter().enumerate() {
            v.push((format!("model.relax.encoding.{}", i + 1), e.clone()));
        }
        for (slot, l) in self.lora.iter().enumerate() {
            let (Some(l), Some((step, block))) = (l, self.labels[slot]) else {
                continue;
            };
            for (t, p) in [
                ("q_proj", &l.q),
                ("k_proj", &l.k),
                ("v_proj", &l.v),
                ("o_proj", &l.o),
            ] {
                if let Some(p) = p {
                    v.push((lora_name(step, block, t, "A"), p.a.clone()));
                    v.push((lora_name(step, block, t, "B"), p.b.clone()));
                }
            }
        }
        v
    }

    /// The encoding of recursion step `step` (1-based), if the relaxation has one.
    pub fn encoding(&self, step: usize) -> Option<&Var> {
        step.checked_sub(1).and_then(|i| self.encoding.get(i))
    }

    /// The LoRA of plan slot `slot`, if any.
    pub fn lora(&self, slot: usize) -> Option<&SlotLora> {
        self.lora.get(slot).and_then(Option::as_ref)
    }

    /// `alpha / rank` (0 without LoRA).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `W x + scale · B (A x)` on `x: [.., d_in]`, with `W: [d_out, d_in]`.
    pub fn project(
        &self,
        be: &dyn Backend,
        x: &Tensor,
        w: &Tensor,
        pair: Option<&LoraPair>,
    ) -> Result<Tensor> {
        let base = be.linear(x, w)?;
        match pair {
            None => Ok(base),
            Some(p) => {
                let low = be.linear(&be.linear(x, p.a.as_tensor())?, p.b.as_tensor())?;
                Ok((base + (low * self.scale)?)?)
            }
        }
    }

    /// Adds the encoding of step `step` to `h: [.., d]` (identity without an encoding).
    pub fn encode(&self, h: &Tensor, step: usize) -> Result<Tensor> {
        match self.encoding(step) {
            Some(e) => Ok(h.broadcast_add(e.as_tensor())?),
            None => Ok(h.clone()),
        }
    }
}

/// Checkpoint name of a LoRA matrix.
pub fn lora_name(step: usize, block: usize, target: &str, which: &str) -> String {
    format!("model.relax.lora.{step}.{block}.{target}.{which}")
}
