//! `reference` backend: plain candle ops, written to be obviously correct.
//!
//! This is the oracle every other backend is tested against. It only uses candle ops whose
//! backward is known to be right (see `PITFALLS.md`): explicit formulas instead of the fused
//! candle-nn ops (which silently drop gradients), `candle_nn::ops::softmax` instead of
//! `softmax_last_dim`, `index_select` for gathers and `index_add` for scatters (never
//! `scatter_add`). It runs on any candle device.
//!
//! # Conventions shared by every backend
//! - A query whose position is [`PAD_POS`] attends to nothing; a query with no visible key
//!   (padding query, or every key in its future or padded) returns zeros, and its gradient is
//!   zero.
//! - Empty selections are not errors: `gather_tokens` with `k = 0` returns an empty
//!   `[b, 0, d]` tensor, `scatter_add_tokens` with `k = 0` returns `h` unchanged, `attention`
//!   with `t = 0` returns an empty `[b, hq, 0, dh]` tensor and with `s = 0` returns zeros.
//! - RoPE tables of another float dtype than `x` are converted to the dtype of `x`.

use crate::validate;
use crate::{Backend, BackendCtx, BackendPlugin, Result, PAD_POS};
use candle_core::{Device, Tensor, D};
use mor_core::registry::{Family, Plugin};
use serde::{Deserialize, Serialize};

/// The `reference` backend: plain, differentiable candle ops on any device.
#[derive(Debug, Clone)]
pub struct ReferenceBackend {
    device: Device,
}

/// Parameters of the `reference` backend: there are none, and any field is rejected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceParams {}

impl ReferenceBackend {
    /// A reference backend on `device`.
    pub fn new(device: Device) -> Self {
        ReferenceBackend { device }
    }
}

impl Plugin for ReferenceBackend {
    const FAMILY: Family = Family::Backend;
    const NAME: &'static str = "reference";
    const DESCRIPTION: &'static str =
        "Plain candle ops, written for clarity: the oracle of every other backend";
    type Params = ReferenceParams;
}

impl BackendPlugin for ReferenceBackend {
    fn build(_params: ReferenceParams, ctx: &BackendCtx) -> Result<Self> {
        // The oracle computes in the dtype of its tensors; it has no mixed precision.
        ctx.require_f32("reference")?;
        Ok(ReferenceBackend::new(ctx.device.clone()))
    }
}

crate::register_backend!(ReferenceBackend);

/// Value given to masked attention scores before the softmax. It is finite so that a row with
/// every key masked stays free of NaN (its probabilities are zeroed by the mask afterwards).
const MASKED_SCORE: f64 = -1e30;

/// `x` with its last dimension halves swapped and the new first half negated:
/// `[x1, x2] -> [-x2, x1]` (HF `rotate_half`).
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let dh = x.dim(D::Minus1)?;
    let half = dh / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// Flat row indices `b * l + idx[b, i]` into a `[b * l, ..]` view, as a u32 tensor.
fn flat_rows(idx: &[u32], b: usize, k: usize, l: usize, device: &Device) -> Result<Tensor> {
    let flat: Vec<u32> = idx
        .iter()
        .enumerate()
        .map(|(n, &i)| ((n / k.max(1)) * l) as u32 + i)
        .collect();
    Ok(Tensor::from_vec(flat, b * k, device)?)
}

impl Backend for ReferenceBackend {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn device(&self) -> &Device {
        &self.device
    }

    /// `x / sqrt(mean(x²) + eps) * w` (spec §1.1), over the last dimension.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        validate::rms_norm(x, w, eps)?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let rms = (ms + eps)?.sqrt()?;
        Ok(x.broadcast_div(&rms)?.broadcast_mul(w)?)
    }

    /// `x * cos + rotate_half(x) * sin` with the table rows gathered at `pos` (spec §1.1, HF
    /// "rotate_half" form); rows at [`PAD_POS`] are passed through.
    fn rope(&self, x: &Tensor, pos: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let dims = validate::rope(x, pos, cos, sin)?;
        let (b, t) = (dims.b, dims.t);
        let device = x.device();
        let is_pad: Vec<u8> = dims.pos.iter().map(|&p| u8::from(p == PAD_POS)).collect();
        let safe: Vec<u32> = dims
            .pos
            .iter()
            .map(|&p| if p == PAD_POS { 0 } else { p })
            .collect();
        let safe = Tensor::from_vec(safe, b * t, device)?;
        let cos = cos.to_dtype(x.dtype())?;
        let sin = sin.to_dtype(x.dtype())?;
        // [b*t, dh/2] -> [b, 1, t, dh] with both halves holding the same angle.
        let gather = |table: &Tensor| -> Result<Tensor> {
            let rows = table.index_select(&safe, 0)?;
            let full = Tensor::cat(&[&rows, &rows], D::Minus1)?;
            Ok(full.reshape((b, 1, t, dims.dh))?)
        };
        let c = gather(&cos)?;
        let s = gather(&sin)?;
        let rotated = (x.broadcast_mul(&c)? + rotate_half(x)?.broadcast_mul(&s)?)?;
        let pad = Tensor::from_vec(is_pad, (b, 1, t, 1), device)?.broadcast_as(x.shape())?;
        Ok(pad.where_cond(x, &rotated)?)
    }

    /// Repeats K/V over the query groups, masks the scores by positions, applies the softmax
    /// and multiplies by V. Rows with no visible key come out as zeros through the mask.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        q_pos: &Tensor,
        k_pos: &Tensor,
    ) -> Result<Tensor> {
        let dims = validate::attention(q, k, v, q_pos, k_pos)?;
        let (b, hq, hkv, t, s, dh) = (dims.b, dims.hq, dims.hkv, dims.t, dims.s, dims.dh);
        if t == 0 || s == 0 {
            // Nothing to attend to: zeros (an empty tensor when t = 0), with zero gradient.
            return Ok(q.affine(0.0, 0.0)?);
        }
        let group = hq / hkv;
        let repeat = |x: &Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(2)?
                .broadcast_as((b, hkv, group, s, dh))?
                .reshape((b, hq, s, dh))?)
        };
        let k = repeat(k)?;
        let v = repeat(v)?;
        let scale = 1.0 / (dh as f64).sqrt();
        let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?; // [b, hq, t, s]

        // allowed[b, 0, i, j] = k_pos[j] <= q_pos[i] && k_pos[j] != PAD && q_pos[i] != PAD.
        let mut allowed = Vec::with_capacity(b * t * s);
        for bi in 0..b {
            for i in 0..t {
                let qp = dims.q_pos[bi * t + i];
                for j in 0..s {
                    let kp = dims.k_pos[bi * s + j];
                    allowed.push(u8::from(qp != PAD_POS && kp != PAD_POS && kp <= qp));
                }
            }
        }
        let allowed =
            Tensor::from_vec(allowed, (b, 1, t, s), q.device())?.broadcast_as((b, hq, t, s))?;
        let fill = Tensor::new(MASKED_SCORE, q.device())?
            .to_dtype(q.dtype())?
            .broadcast_as((b, hq, t, s))?;
        let masked = allowed.where_cond(&scores, &fill)?;
        let probs = candle_nn::ops::softmax(&masked, D::Minus1)?;
        // A row with every key masked has uniform probabilities here; the mask zeroes it.
        let probs = (probs * allowed.to_dtype(q.dtype())?)?;
        Ok(probs.matmul(&v)?)
    }

    /// `silu(gate) * up` with candle's differentiable `silu`.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        validate::swiglu(gate, up)?;
        Ok((gate.silu()? * up)?)
    }

    /// `index_select` of flat row indices.
    fn gather_tokens(&self, h: &Tensor, idx: &Tensor) -> Result<Tensor> {
        let td = validate::gather_tokens(h, idx)?;
        if td.k == 0 {
            return Ok(Tensor::zeros((td.b, 0, td.d), h.dtype(), h.device())?);
        }
        let rows = flat_rows(&td.idx, td.b, td.k, td.l, h.device())?;
        let flat = h.reshape((td.b * td.l, td.d))?;
        Ok(flat.index_select(&rows, 0)?.reshape((td.b, td.k, td.d))?)
    }

    /// `index_add` of `w * y` at flat row indices.
    fn scatter_add_tokens(
        &self,
        h: &Tensor,
        idx: &Tensor,
        y: &Tensor,
        w: Option<&Tensor>,
    ) -> Result<Tensor> {
        let td = validate::scatter_add_tokens(h, idx, y, w)?;
        if td.k == 0 {
            return Ok(h.clone());
        }
        let upd = match w {
            Some(w) => y.broadcast_mul(&w.unsqueeze(2)?)?,
            None => y.clone(),
        };
        let rows = flat_rows(&td.idx, td.b, td.k, td.l, h.device())?;
        let flat = h.reshape((td.b * td.l, td.d))?;
        let upd = upd.reshape((td.b * td.k, td.d))?;
        Ok(flat
            .index_add(&rows, &upd, 0)?
            .reshape((td.b, td.l, td.d))?)
    }
}
