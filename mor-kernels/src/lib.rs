//! The compute backends of mor.
//!
//! The [`Backend`] trait is the hot path of one recursion step: RMSNorm, RoPE at gathered
//! positions, causal attention with GQA, SwiGLU and the gather → block → weighted
//! scatter-add of routing. Implementations:
//! - `reference`: plain candle ops written for clarity; the oracle every other backend is
//!   tested against;
//! - `cpu`: fused CPU ops, each a candle `CustomOp` with an analytic backward;
//! - `cuda`: PTX kernels behind the `cuda` feature (without it, the name resolves to a
//!   clear "rebuild with `--features cuda`" error).
//!
//! Every op takes and returns candle [`Tensor`]s and must be differentiable through candle's
//! autograd (`Tensor::backward`).

#![warn(missing_docs)]

use candle_core::{DType, Device, Tensor};
use std::fmt;
use std::sync::Arc;

pub mod error;
pub use error::{CudaCause, Error, Result, NOT_COMPILED_MESSAGE};

mod backend_registry;
pub use backend_registry::{build_backend, BackendCtx, BackendEntry, BackendPlugin};

pub mod cpu;
pub mod cuda;
pub mod host_sync;
pub mod loss;
pub mod reference;
pub mod testing;
pub mod validate;

/// Position value marking a padded key or query: never attended to, never attends.
pub const PAD_POS: u32 = u32::MAX;

/// The compute backend of the hot path.
///
/// # Contract
/// - Every op is differentiable with respect to every floating-point tensor input
///   (gradients flow through candle autograd), and matches [`reference`](mod@reference) within f32
///   tolerance, forward and backward.
/// - Ops never panic on well-shaped input; shape errors are returned as `Err`.
/// - Position tensors are `u32`; [`PAD_POS`] marks padding.
/// - Floating-point inputs are f32 or f64 (f64 is used by finite-difference tests);
///   outputs have the input dtype.
///
/// # Examples
/// Build a backend by name and run the gather → block → weighted scatter-add of one
/// recursion step on plain candle tensors:
/// ```
/// use candle_core::{Device, Tensor};
/// use mor_kernels::{build_backend, Backend, BackendCtx};
///
/// let be = build_backend("cpu", &toml::Table::new(), &BackendCtx::new(Device::Cpu))?;
/// let h = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((1, 4, 3))?; // [b, l, d]
/// let idx = Tensor::new(&[[1u32, 3]], &Device::Cpu)?; // the selected tokens, ascending
/// let x = be.gather_tokens(&h, &idx)?; // [1, 2, 3]
/// let w = be.rms_norm(&x, &Tensor::ones(3, candle_core::DType::F32, &Device::Cpu)?, 1e-5)?;
/// let g = Tensor::new(&[[0.5f32, 0.1]], &Device::Cpu)?; // router gates
/// let out = be.scatter_add_tokens(&h, &idx, &w, Some(&g))?;
/// let rows = out.to_vec3::<f32>()?;
/// assert_eq!(rows[0][0], [0.0, 1.0, 2.0]); // unselected tokens are unchanged
/// assert!((rows[0][1][0] - (3.0 + 0.5 * w.to_vec3::<f32>()?[0][0][0])).abs() < 1e-6);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Backend: Send + Sync + fmt::Debug {
    /// The registered name.
    fn name(&self) -> &'static str;

    /// The device tensors of this backend live on.
    fn device(&self) -> &Device;

    /// RMSNorm: `x / sqrt(mean(x²) + eps) * w`.
    ///
    /// # Shapes
    /// `x: [.., d]`, `w: [d]` → `[.., d]`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor>;

    /// Rotary embedding, HF "rotate_half" (non-interleaved) form, at explicit positions.
    ///
    /// # Shapes
    /// `x: [b, h, t, dh]`, `pos: [b, t]` (u32 absolute positions), `cos`/`sin`:
    /// `[max_pos, dh/2]` tables. Rows whose position is [`PAD_POS`] are returned unchanged.
    fn rope(&self, x: &Tensor, pos: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor>;

    /// Causal attention with GQA, by positions: query i attends to key j iff
    /// `k_pos[j] <= q_pos[i]` and `k_pos[j] != PAD_POS`. Scale is `1/sqrt(dh)`.
    /// A query row with no visible key (only padding rows) returns zeros.
    ///
    /// # Shapes
    /// `q: [b, hq, t, dh]`, `k, v: [b, hkv, s, dh]` with `hq % hkv == 0`,
    /// `q_pos: [b, t]`, `k_pos: [b, s]` (u32) → `[b, hq, t, dh]`.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        q_pos: &Tensor,
        k_pos: &Tensor,
    ) -> Result<Tensor>;

    /// SwiGLU gate: `silu(gate) * up`.
    ///
    /// # Shapes
    /// `gate, up: [.., di]` → `[.., di]`.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;

    /// Gathers token rows: `out[b, i] = h[b, idx[b, i]]`.
    ///
    /// # Shapes
    /// `h: [b, l, d]`, `idx: [b, k]` (u32, each `< l`) → `[b, k, d]`.
    fn gather_tokens(&self, h: &Tensor, idx: &Tensor) -> Result<Tensor>;

    /// Weighted scatter-add of a recursion step:
    /// `out = h; out[b, idx[b, i]] += w[b, i] * y[b, i]` (`w = 1` when `None`).
    /// Indices within one row are distinct.
    ///
    /// # Shapes
    /// `h: [b, l, d]`, `idx: [b, k]` (u32), `y: [b, k, d]`, `w: [b, k]` → `[b, l, d]`.
    fn scatter_add_tokens(
        &self,
        h: &Tensor,
        idx: &Tensor,
        y: &Tensor,
        w: Option<&Tensor>,
    ) -> Result<Tensor>;

    /// A bias-free linear layer: `x @ wᵀ`.
    ///
    /// The default is plain candle ops; a backend may fuse the reshapes and the transpose
    /// into one differentiable op.
    ///
    /// # Shapes
    /// `x: [.., in]`, `w: [out, in]` → `[.., out]`.
    fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let d = validate::linear(x, w)?;
        let mut out = x.dims().to_vec();
        if let Some(last) = out.last_mut() {
            *last = d.out;
        }
        Ok(x.reshape((d.rows, d.inp))?.matmul(&w.t()?)?.reshape(out)?)
    }

    /// Splits the heads of a projection: `[b, t, heads * dh]` → `[b, heads, t, dh]`
    /// (contiguous).
    fn split_heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let d = validate::split_heads("split_heads", x, heads)?;
        Ok(x.reshape((d.b, d.t, d.h, d.dh))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Merges heads: `[b, h, t, dh]` → `[b, t, h * dh]` (contiguous), the inverse of
    /// [`split_heads`](Backend::split_heads).
    fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let d = validate::merge_heads(x)?;
        Ok(x.transpose(1, 2)?.reshape((d.b, d.t, d.h * d.dh))?)
    }

    /// [`rope`](Backend::rope) of [`split_heads`](Backend::split_heads)`(x, heads)`: a
    /// projection `[b, t, heads * dh]` → rotated heads `[b, heads, t, dh]`, fused where the
    /// backend can.
    fn rope_heads(
        &self,
        x: &Tensor,
        heads: usize,
        pos: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let x = self.split_heads(x, heads)?;
        self.rope(&x, pos, cos, sin)
    }

    /// Mean cross-entropy of the logits `x · wᵀ` against `targets`: the language-model head
    /// and its loss in one call, so that a backend may never hand the `[rows, vocab]` logits
    /// (or their gradient) to the autograd graph.
    ///
    /// The default is [`linear`](Backend::linear) followed by
    /// [`loss::cross_entropy`].
    ///
    /// # Shapes
    /// `x: [.., d]`, `w: [vocab, d]`, `targets: [..]` (u32, one per row of `x`, each
    /// `< vocab`) → scalar.
    fn linear_cross_entropy(&self, x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let d = validate::linear_cross_entropy(x, w, targets)?;
        let logits = self.linear(x, w)?.reshape((d.rows, d.out))?;
        Ok(loss::cross_entropy(&logits, &targets.flatten_all()?)?)
    }

    /// The attention half of a pre-norm decoder layer (spec §1.1), residual included, with
    /// the layer's own keys and values: `h + o(attention(q, k, v))` where `n =
    /// rms_norm(h, w.norm, w.eps)`, `q = rope(split(n·w.qᵀ))`, `k = rope(split(n·w.kᵀ))`,
    /// `v = split(n·w.vᵀ)`, all at positions `pos` (queries and keys alike).
    ///
    /// The default composes the backend's own ops; a backend may run the whole half as one
    /// differentiable op.
    ///
    /// # Shapes
    /// `h: [b, t, d]`, `pos: [b, t]` (u32), `cos`/`sin: [max_pos, dh/2]`, weights as in
    /// [`AttentionWeights`] → `[b, t, d]`.
    fn attention_block(
        &self,
        h: &Tensor,
        w: &AttentionWeights<'_>,
        pos: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        validate::attention_block(h, w, pos, cos, sin)?;
        attention_block_composed(self, h, w, pos, cos, sin)
    }

    /// The feed-forward half of a pre-norm decoder layer (spec §1.1), residual included:
    /// `h + down(swiglu(gate(n), up(n)))` with `n = rms_norm(h, norm_w, eps)` and each
    /// projection a bias-free [`linear`](Backend::linear).
    ///
    /// The default composes the backend's own ops; a backend may run the whole half as one
    /// differentiable op.
    ///
    /// # Shapes
    /// `h: [.., d]`, `norm_w: [d]`, `gate, up: [ff, d]`, `down: [d, ff]` → `[.., d]`.
    fn mlp_block(
        &self,
        h: &Tensor,
        norm_w: &Tensor,
        eps: f64,
        gate: &Tensor,
        up: &Tensor,
        down: &Tensor,
    ) -> Result<Tensor> {
        validate::mlp_block(h, norm_w, eps, gate, up, down)?;
        let n = self.rms_norm(h, norm_w, eps)?;
        let a = self.swiglu(&self.linear(&n, gate)?, &self.linear(&n, up)?)?;
        Ok((h + self.linear(&a, down)?)?)
    }
}

/// The weights of the attention half of a decoder layer, for
/// [`Backend::attention_block`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionWeights<'a> {
    /// RMSNorm weight `[d]`.
    pub norm: &'a Tensor,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Query projection `[heads·dh, d]`.
    pub q: &'a Tensor,
    /// Key projection `[kv_heads·dh, d]`.
    pub k: &'a Tensor,
    /// Value projection `[kv_heads·dh, d]`.
    pub v: &'a Tensor,
    /// Output projection `[d, heads·dh]`.
    pub o: &'a Tensor,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads % kv_heads == 0`).
    pub kv_heads: usize,
}

/// [`Backend::attention_block`] written with the backend's other ops (inputs already
/// validated); the trait's default, and the fallback of fused backends for cases their
/// fused op does not cover.
pub(crate) fn attention_block_composed<B: Backend + ?Sized>(
    be: &B,
    h: &Tensor,
    w: &AttentionWeights<'_>,
    pos: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let n = be.rms_norm(h, w.norm, w.eps)?;
    let q = be.rope_heads(&be.linear(&n, w.q)?, w.heads, pos, cos, sin)?;
    let k = be.rope_heads(&be.linear(&n, w.k)?, w.kv_heads, pos, cos, sin)?;
    let v = be.split_heads(&be.linear(&n, w.v)?, w.kv_heads)?;
    let a = be.merge_heads(&be.attention(&q, &k, &v, pos, pos)?)?;
    Ok((h + be.linear(&a, w.o)?)?)
}

/// Implements [`Backend`] for a smart pointer by forwarding every method to the pointee, so
/// that `Arc<dyn Backend>` and `Box<dyn Backend>` keep the pointee's overrides of the
/// provided methods.
macro_rules! forward_backend {
    ($($ptr:ident),*) => {$(
        impl<T: Backend + ?Sized> Backend for $ptr<T> {
            fn name(&self) -> &'static str {
                (**self).name()
            }
            fn device(&self) -> &Device {
                (**self).device()
            }
            fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
                (**self).rms_norm(x, w, eps)
            }
            fn rope(&self, x: &Tensor, pos: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
                (**self).rope(x, pos, cos, sin)
            }
            fn attention(
                &self,
                q: &Tensor,
                k: &Tensor,
                v: &Tensor,
                q_pos: &Tensor,
                k_pos: &Tensor,
            ) -> Result<Tensor> {
                (**self).attention(q, k, v, q_pos, k_pos)
            }
            fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
                (**self).swiglu(gate, up)
            }
            fn gather_tokens(&self, h: &Tensor, idx: &Tensor) -> Result<Tensor> {
                (**self).gather_tokens(h, idx)
            }
            fn scatter_add_tokens(
                &self,
                h: &Tensor,
                idx: &Tensor,
                y: &Tensor,
                w: Option<&Tensor>,
            ) -> Result<Tensor> {
                (**self).scatter_add_tokens(h, idx, y, w)
            }
            fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
                (**self).linear(x, w)
            }
            fn split_heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
                (**self).split_heads(x, heads)
            }
            fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
                (**self).merge_heads(x)
            }
            fn rope_heads(
                &self,
                x: &Tensor,
                heads: usize,
                pos: &Tensor,
                cos: &Tensor,
                sin: &Tensor,
            ) -> Result<Tensor> {
                (**self).rope_heads(x, heads, pos, cos, sin)
            }
            fn linear_cross_entropy(
                &self,
                x: &Tensor,
                w: &Tensor,
                targets: &Tensor,
            ) -> Result<Tensor> {
                (**self).linear_cross_entropy(x, w, targets)
            }
            fn attention_block(
                &self,
                h: &Tensor,
                w: &AttentionWeights<'_>,
                pos: &Tensor,
                cos: &Tensor,
                sin: &Tensor,
            ) -> Result<Tensor> {
                (**self).attention_block(h, w, pos, cos, sin)
            }
            fn mlp_block(
                &self,
                h: &Tensor,
                norm_w: &Tensor,
                eps: f64,
                gate: &Tensor,
                up: &Tensor,
                down: &Tensor,
            ) -> Result<Tensor> {
                (**self).mlp_block(h, norm_w, eps, gate, up, down)
            }
        }
    )*};
}

forward_backend!(Arc, Box);

/// RoPE cos/sin tables `[max_pos, dh/2]` for theta (spec §1.1: theta 1e4, no scaling), in
/// f32: [`rope_tables_in`] with `DType::F32`.
pub fn rope_tables(
    max_pos: usize,
    head_dim: usize,
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    rope_tables_in(max_pos, head_dim, theta, DType::F32, device)
}

/// RoPE tables `(cos, sin)`, each `[max_pos, head_dim / 2]`, in `dtype`: entry `(p, i)` is
/// `cos/sin(p · θ^(−2i/head_dim))` (spec §1.1, HF rotate_half form), computed in f64 and
/// rounded once to `dtype` (f64 tables keep an f64 forward in f64 throughout).
pub fn rope_tables_in(
    max_pos: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for i in 0..half {
            let inv = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let a = p as f64 * inv;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (max_pos, half), device)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (max_pos, half), device)?.to_dtype(dtype)?,
    ))
}

#[doc(hidden)]
pub mod __private {
    pub use mor_core::__private::*;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference backend with `linear` overridden to return ones.
    #[derive(Debug)]
    struct OnesLinear(reference::ReferenceBackend);

    impl Backend for OnesLinear {
        fn name(&self) -> &'static str {
            "ones-linear"
        }
        fn device(&self) -> &Device {
            self.0.device()
        }
        fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
            self.0.rms_norm(x, w, eps)
        }
        fn rope(&self, x: &Tensor, pos: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
            self.0.rope(x, pos, cos, sin)
        }
        fn attention(
            &self,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            q_pos: &Tensor,
            k_pos: &Tensor,
        ) -> Result<Tensor> {
            self.0.attention(q, k, v, q_pos, k_pos)
        }
        fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
            self.0.swiglu(gate, up)
        }
        fn gather_tokens(&self, h: &Tensor, idx: &Tensor) -> Result<Tensor> {
            self.0.gather_tokens(h, idx)
        }
        fn scatter_add_tokens(
            &self,
            h: &Tensor,
            idx: &Tensor,
            y: &Tensor,
            w: Option<&Tensor>,
        ) -> Result<Tensor> {
            self.0.scatter_add_tokens(h, idx, y, w)
        }
        fn linear(&self, x: &Tensor, _w: &Tensor) -> Result<Tensor> {
            Ok(x.ones_like()?)
        }
    }

    #[test]
    fn smart_pointers_keep_the_overrides_of_provided_methods() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[2f32, 3.0]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let inner = || OnesLinear(reference::ReferenceBackend::new(dev.clone()));
        let arc: Arc<dyn Backend> = Arc::new(inner());
        let boxed: Box<dyn Backend> = Box::new(inner());
        for be in [&arc as &dyn Backend, &boxed as &dyn Backend] {
            assert_eq!(be.name(), "ones-linear");
            let y = be.linear(&x, &w).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(
                y,
                [[1.0, 1.0]],
                "the override, not the default x·wᵀ = [2, 3]"
            );
        }
    }
}
