//! Training memory estimate: parameters, gradients, AdamW moments, the activations the
//! autograd graph keeps for one micro-batch, and the logits.
//!
//! Every tensor is f32 (4 bytes; the only training precision). Per layer slot, per
//! sequence, with `k` tokens running the slot and `c` keys per query (`k`, or `L` when the
//! step's queries read the full context under KV sharing or hybrid, spec §4), the graph
//! keeps:
//!
//! ```text
//! 6·d            residual input, attention norm output, o output, residual after attention,
//!                MLP norm output, down output
//! 2·hq·dh        queries and the attention output before o
//! 2·hkv·dh       keys and values
//! 4·d_inter      gate, up, silu(gate) and their product
//! hq·c           attention probabilities (per query)
//! ```
//!
//! so a slot keeps `k·(6d + 2·hq·dh + 2·hkv·dh + 4·d_inter + hq·c)` values; the embedding
//! output and the final norm add `2·L·d` per sequence, and everything is multiplied by the
//! micro-batch. The logits of one micro-batch and their gradient are `2·B·L·V`. Gradients
//! take one copy of the parameters, two while micro-batches are accumulated (the running
//! sum and the new micro-batch's); AdamW keeps two moments per parameter.
//!
//! It is an estimate of the peak, not a measurement: fused backends keep less (they never
//! store the attention probabilities), the allocator and the data pipeline add some.

use super::{hints, param_counts_with, router_params, slot_shape, step_tokens};
use crate::config::ResolvedConfig;
use serde::{Deserialize, Serialize};

/// Bytes of one f32 value.
const BYTES: f64 = 4.0;

/// The estimated peak memory of training a config, in bytes, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    /// Every parameter (model and routers).
    pub parameters: u64,
    /// Gradients: one copy of the parameters, two with gradient accumulation.
    pub gradients: u64,
    /// AdamW first and second moments.
    pub optimizer: u64,
    /// What the autograd graph keeps of one micro-batch (see the module docs).
    pub activations: u64,
    /// Logits of one micro-batch and their gradient.
    pub logits: u64,
    /// The sum of the parts.
    pub total: u64,
}

/// `x` values of 4 bytes, saturating at `u64::MAX`.
fn bytes(x: f64) -> u64 {
    // `as` saturates for finite values above the range.
    (x * BYTES).ceil() as u64
}

/// The training memory estimate of `cfg` (see the module docs).
pub fn memory_estimate(cfg: &ResolvedConfig) -> MemoryEstimate {
    let m = &cfg.model;
    let h = hints(cfg.router.as_ref(), &cfg.kv, &cfg.check_ctx()).unwrap_or_default();
    let params = param_counts_with(m, &cfg.plan, cfg.recursion.ln_share, h.kv_sharing);
    let n_params = params.non_embedding as f64
        + params.embedding as f64
        + router_params(m, cfg.recursion.num_recursions, cfg.router.as_ref()) as f64
        + super::relaxation_params(
            m,
            &cfg.plan,
            cfg.recursion.relaxation.as_ref(),
            h.kv_sharing,
        ) as f64;
    let accum = cfg.train.grad_accum();
    let k_steps = step_tokens(&h, cfg.plan.num_recursions, m.seq_len)
        .unwrap_or_else(|_| vec![m.seq_len; cfg.plan.num_recursions]);
    let (d, di, l) = (
        m.hidden_size as f64,
        m.intermediate_size as f64,
        m.seq_len as f64,
    );
    let (q, kv, hq) = (
        (m.num_heads * m.head_dim) as f64,
        (m.num_kv_heads * m.head_dim) as f64,
        m.num_heads as f64,
    );
    let per_seq: f64 = cfg
        .plan
        .slots
        .iter()
        .map(|s| {
            let shape = slot_shape(m, s, &k_steps, &h);
            let keys = if shape.full_context { l } else { shape.k };
            shape.k * (6.0 * d + 2.0 * q + 2.0 * kv + 4.0 * di + hq * keys)
        })
        .sum::<f64>()
        + 2.0 * l * d;
    let b = cfg.train.micro_batch_seqs as f64;
    let parameters = bytes(n_params);
    let gradients = bytes(n_params * if accum > 1 { 2.0 } else { 1.0 });
    let optimizer = bytes(2.0 * n_params);
    let activations = bytes(b * per_seq);
    let logits = bytes(2.0 * b * l * m.vocab_size as f64);
    let total = [parameters, gradients, optimizer, activations, logits]
        .iter()
        .fold(0u64, |a, &x| a.saturating_add(x));
    MemoryEstimate {
        parameters,
        gradients,
        optimizer,
        activations,
        logits,
        total,
    }
}

/// `n` bytes in binary units (`1.5 GiB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

impl MemoryEstimate {
    /// One line: the total and its parts.
    pub fn summary(&self) -> String {
        format!(
            "{} ({} bytes: parameters {}, gradients {}, AdamW moments {}, activations {}, logits {})",
            human_bytes(self.total),
            self.total,
            human_bytes(self.parameters),
            human_bytes(self.gradients),
            human_bytes(self.optimizer),
            human_bytes(self.activations),
            human_bytes(self.logits),
        )
    }
}

/// Whether training `cfg` is estimated to fit in `available_bytes`.
///
/// # Errors
/// A message with the model's size (hidden size, layer slots, micro-batch), the estimate
/// by part and the available memory, and what to lower.
pub fn check_fits(cfg: &ResolvedConfig, available_bytes: u64) -> Result<(), String> {
    let est = memory_estimate(cfg);
    if est.total <= available_bytes {
        return Ok(());
    }
    let m = &cfg.model;
    Err(format!(
        "training this model needs about {} but only {} ({available_bytes} bytes) of memory is \
         available: hidden_size {}, num_layers {} ({} layer slots), micro-batch {} × {} tokens; \
         lower model.hidden_size, model.num_layers, model.seq_len or train.micro_batch_seqs",
        est.summary(),
        human_bytes(available_bytes),
        m.hidden_size,
        m.num_layers,
        cfg.plan.num_slots(),
        cfg.train.micro_batch_seqs,
        m.seq_len,
    ))
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut parts = line["MemAvailable:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// The memory available to a new process (`MemAvailable` of `/proc/meminfo`), in bytes;
/// `None` where there is no such file (not Linux) or it cannot be read.
pub fn available_memory() -> Option<u64> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}
