//! Router networks, and the loss and selection functions both routers share.
//!
//! The networks follow the reference code's `util.py` (spec §3.1, "Router architectures"):
//! `linear` is `d → out`, `mlp` is `d → 2d → out` with GELU and no bias, and `wide_mlp` is
//! `d → wide_mult·d → out`. Weights are stored as `[in, out]` so that a forward is one matmul
//! per layer on the `[n, d]` rows of the tokens being scored.

use crate::Result;
use candle_core::{DType, Device, Tensor, Var};
use mor_core::rng::Rng;
use serde::{Deserialize, Serialize};

/// Architecture of a router network (spec §3.1, "Router architectures").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterArch {
    /// One linear map `d → out`, no bias (the paper's final choice for both routers).
    #[default]
    Linear,
    /// `d → 2d → out` with exact (erf) GELU, no biases.
    Mlp,
    /// `d → wide_mult·d → out` with exact GELU, no biases. The reference code uses a hidden
    /// size of `2d` (identical to `mlp`) while the paper's text says `4d` (spec §8,
    /// discrepancy 1); `wide_mult` defaults to the code's 2, and `wide_mult = 4` gives the
    /// paper's text.
    WideMlp,
}

/// A bias-free router network with its own named parameters.
#[derive(Debug)]
pub(crate) struct RouterNet {
    /// `(name, weight)` per layer, weights shaped `[in, out]`.
    layers: Vec<(String, Var)>,
}

/// Draws an `[rows, cols]` weight from N(0, std²) with the stream `Rng::derive(seed, name)`.
fn init_weight(
    name: &str,
    rows: usize,
    cols: usize,
    std: f64,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Var> {
    let mut rng = Rng::derive(seed, name);
    let t = if dtype == DType::F64 {
        let v: Vec<f64> = (0..rows * cols).map(|_| rng.normal() * std).collect();
        Tensor::from_vec(v, (rows, cols), device)?
    } else {
        Tensor::from_vec(rng.normal_vec(rows * cols, std), (rows, cols), device)?.to_dtype(dtype)?
    };
    Ok(Var::from_tensor(&t)?)
}

impl RouterNet {
    /// A network `d → out` named `{prefix}.w1` (and `{prefix}.w2` for the MLPs).
    pub(crate) fn new(
        prefix: &str,
        arch: RouterArch,
        d: usize,
        out: usize,
        wide_mult: usize,
        std: f64,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let hidden = match arch {
            RouterArch::Linear => None,
            RouterArch::Mlp => Some(2 * d),
            RouterArch::WideMlp => Some(wide_mult * d),
        };
        let layers = match hidden {
            None => {
                let n = format!("{prefix}.w1");
                vec![(
                    n.clone(),
                    init_weight(&n, d, out, std, seed, dtype, device)?,
                )]
            }
            Some(hd) => {
                let n1 = format!("{prefix}.w1");
                let n2 = format!("{prefix}.w2");
                let w1 = init_weight(&n1, d, hd, std, seed, dtype, device)?;
                let w2 = init_weight(&n2, hd, out, std, seed, dtype, device)?;
                vec![(n1, w1), (n2, w2)]
            }
        };
        Ok(RouterNet { layers })
    }

    /// Logits of the rows of `x`.
    ///
    /// # Shapes
    /// `x: [n, d]` (the dtype of the weights) → `[n, out]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.matmul(self.layers[0].1.as_tensor())?;
        for (_, w) in &self.layers[1..] {
            y = gelu_exact(&y)?.matmul(w.as_tensor())?;
        }
        Ok(y)
    }

    /// The named parameters.
    pub(crate) fn vars(&self) -> Vec<(String, Var)> {
        self.layers.clone()
    }
}

/// Exact GELU `x · ½(1 + erf(x/√2))` (PyTorch's `nn.GELU()` default), built from ops whose
/// backward is exact (candle's fused `gelu_erf` backward rounds `1/√(2π)` to six digits).
pub(crate) fn gelu_exact(x: &Tensor) -> Result<Tensor> {
    let e = (x / std::f64::consts::SQRT_2)?.erf()?;
    Ok((x * ((e + 1.0)? * 0.5)?)?)
}

/// Mean binary cross-entropy with logits, `mean_i [max(z,0) − z·t + log(1 + e^{−|z|})]`,
/// the stable form of PyTorch's `BCEWithLogitsLoss`.
///
/// # Shapes
/// `z, t: [n]` (same dtype) → scalar.
pub(crate) fn bce_with_logits_mean(z: &Tensor, t: &Tensor) -> Result<Tensor> {
    let softplus_neg_abs = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let l = ((z.relu()? - (z * t)?)? + softplus_neg_abs)?;
    Ok(l.mean_all()?)
}

/// Row-wise `logsumexp`, with the row maximum detached (the gradient of `logsumexp` does
/// not depend on the shift, so this is exact and avoids the tie handling of `max`'s
/// backward).
///
/// # Shapes
/// `z: [n, k]` → `[n]`.
pub(crate) fn logsumexp_rows(z: &Tensor) -> Result<Tensor> {
    let m = z.max_keepdim(1)?.detach();
    let s = z.broadcast_sub(&m)?.exp()?.sum(1)?.log()?;
    Ok((s + m.squeeze(1)?)?)
}

/// The plain `f64` logistic function.
pub(crate) fn sigmoid_f64(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Ranking key that sorts NaN below every number, so ranking never panics.
fn rank_key(x: f64) -> f64 {
    if x.is_nan() {
        f64::NEG_INFINITY
    } else {
        x
    }
}

/// The `k` largest `scores`, as ascending indices. Ties go to the lower index, so the
/// choice is deterministic; `O(n)` selection plus `O(k log k)` sorting.
pub(crate) fn top_k_ascending(scores: &[f64], k: usize) -> Vec<usize> {
    let n = scores.len();
    let k = k.min(n);
    if k == n {
        return (0..n).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let cmp = |a: &usize, b: &usize| {
        rank_key(scores[*b])
            .total_cmp(&rank_key(scores[*a]))
            .then(a.cmp(b))
    };
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Index of the largest value (the lowest index among ties; NaN counts as lowest).
pub(crate) fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate().skip(1) {
        if rank_key(x) > rank_key(v[best]) {
            best = i;
        }
    }
    best
}

/// A uniform draw in [0, 1) that is a pure function of `seed` and `keys` (counter-based
/// randomness): the random routers draw one value per (forward, row, position, step), so a
/// token's draw never depends on how many other tokens were drawn before it.
pub(crate) fn counter_uniform(seed: u64, keys: [u64; 4]) -> f64 {
    let mut x = seed;
    for k in keys {
        x = splitmix64(x ^ k);
    }
    Rng::new(x).uniform()
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Copies a tensor of any float dtype to the host as `f64`s, counted by
/// [`mor_kernels::host_sync`].
pub(crate) fn to_host_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(mor_kernels::host_sync::to_host_f64(t)?)
}

/// Name of the buffer that holds a random router's draw counter (the forwards drawn so
/// far), so that a resumed run draws what an uninterrupted one would.
pub const DRAWS_BUFFER: &str = "rand_draws";

/// The draw counter as a checkpoint buffer: one i64.
pub(crate) fn draws_buffer(count: u64) -> Vec<(String, candle_core::Tensor)> {
    match candle_core::Tensor::new(&[count as i64], &candle_core::Device::Cpu) {
        Ok(t) => vec![(DRAWS_BUFFER.to_string(), t)],
        Err(_) => Vec::new(),
    }
}

/// The draw counter in `buffers`, if saved.
///
/// # Errors
/// A buffer of the wrong shape or a negative count.
pub(crate) fn read_draws(
    buffers: &[(String, candle_core::Tensor)],
    router: &'static str,
) -> crate::Result<Option<u64>> {
    let Some((_, t)) = buffers.iter().find(|(n, _)| n == DRAWS_BUFFER) else {
        return Ok(None);
    };
    let v = to_host_f64(t)?;
    match v[..] {
        [c] if c >= 0.0 && c.fract() == 0.0 => Ok(Some(c as u64)),
        _ => Err(crate::Error::Invalid {
            router,
            msg: format!("buffer `{DRAWS_BUFFER}` must hold one count >= 0, got {v:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_by_lower_index_and_sorts() {
        let s = [0.5, 0.9, 0.5, 0.9, 0.1, f64::NAN];
        assert_eq!(top_k_ascending(&s, 1), vec![1]);
        assert_eq!(top_k_ascending(&s, 2), vec![1, 3]);
        assert_eq!(top_k_ascending(&s, 3), vec![0, 1, 3]);
        assert_eq!(top_k_ascending(&s, 5), vec![0, 1, 2, 3, 4]);
        assert_eq!(top_k_ascending(&s, 9), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(argmax(&[0.2, 0.7, 0.7]), 1);
        assert_eq!(argmax(&[f64::NAN, -1.0]), 1);
    }

    #[test]
    fn bce_and_gelu_match_closed_forms() -> Result<()> {
        let dev = Device::Cpu;
        let zs = [-3.0f64, -0.2, 0.0, 0.7, 25.0];
        let ts = [0.0f64, 1.0, 1.0, 0.0, 1.0];
        let z = Tensor::new(&zs, &dev)?;
        let t = Tensor::new(&ts, &dev)?;
        let got = bce_with_logits_mean(&z, &t)?.to_scalar::<f64>()?;
        let want = zs
            .iter()
            .zip(ts)
            .map(|(&z, t)| {
                let p = sigmoid_f64(z);
                -(t * p.ln() + (1.0 - t) * (1.0 - p).ln())
            })
            .sum::<f64>()
            / zs.len() as f64;
        assert!((got - want).abs() < 1e-12, "bce {got} vs {want}");
        // GELU(1) = 0.8413447460685429 (Φ(1)).
        let g = gelu_exact(&Tensor::new(&[1.0f64, -1.0], &dev)?)?.to_vec1::<f64>()?;
        assert!((g[0] - 0.841_344_746_068_542_9).abs() < 1e-12);
        assert!((g[1] + 0.158_655_253_931_457_05).abs() < 1e-12);
        let l =
            logsumexp_rows(&Tensor::new(&[[0.0f64, 0.0], [1.0, 3.0]], &dev)?)?.to_vec1::<f64>()?;
        assert!((l[0] - 2f64.ln()).abs() < 1e-12);
        assert!((l[1] - (1f64.exp() + 3f64.exp()).ln()).abs() < 1e-12);
        Ok(())
    }
}
