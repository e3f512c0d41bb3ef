//! Row kernels on host slices for decoding (no graph, no gradient): the same AVX2+FMA code
//! as the `cpu` backend's RMSNorm and SwiGLU ops, applied one row at a time, so that a row's
//! result never depends on the other rows of its batch.

use super::{norm, swiglu};
use crate::{Error, Result};

/// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) · w` for every row of `d = w.len()` values.
///
/// # Errors
/// `x` not a whole number of rows of `d`, `out` of another length, or an empty `w`.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    let d = w.len();
    if d == 0 || !x.len().is_multiple_of(d) || out.len() != x.len() {
        return Err(Error::Invalid {
            op: "rms_norm_rows",
            msg: format!(
                "x has {} values, out {}, for rows of {d} (the weight's length, >= 1)",
                x.len(),
                out.len()
            ),
        });
    }
    norm::rows_fwd::<f32>(x, w, eps, d, out);
    Ok(())
}

/// SwiGLU of rows holding `[gate | up]` (`2·f` values each): `out[r] = silu(gate) · up`,
/// `f` values per row.
///
/// # Errors
/// `gate_up` not a whole number of rows of `2·f` with `f = out_row`, or `out` of another
/// row count.
pub fn swiglu_rows(gate_up: &[f32], f: usize, out: &mut [f32]) -> Result<()> {
    if f == 0 || !gate_up.len().is_multiple_of(2 * f) || out.len() != gate_up.len() / 2 {
        return Err(Error::Invalid {
            op: "swiglu_rows",
            msg: format!(
                "gate_up has {} values and out {}, expected [m, 2·{f}] and [m, {f}]",
                gate_up.len(),
                out.len()
            ),
        });
    }
    for (row, o) in gate_up.chunks_exact(2 * f).zip(out.chunks_exact_mut(f)) {
        let (g, u) = row.split_at(f);
        swiglu::fwd_chunk::<f32>(g, u, o);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_rows_matches_the_formula() {
        let x = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0];
        let w = [1.0f32, 0.5, 2.0, 1.0];
        let mut out = [0f32; 8];
        rms_norm_rows(&x, &w, 1e-5, &mut out).unwrap();
        for r in 0..2 {
            let row = &x[r * 4..(r + 1) * 4];
            let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 4.0;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for j in 0..4 {
                let want = row[j] as f64 * inv * w[j] as f64;
                assert!((out[r * 4 + j] as f64 - want).abs() < 1e-6, "{r} {j}");
            }
        }
        assert!(rms_norm_rows(&x, &w[..3], 1e-5, &mut out).is_err());
        assert!(rms_norm_rows(&x, &w, 1e-5, &mut out[..4]).is_err());
    }

    #[test]
    fn swiglu_rows_matches_the_formula() {
        // f = 11: one full lane group and a scalar tail per row.
        let f = 11;
        let gu: Vec<f32> = (0..3 * 2 * f)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let mut out = vec![0f32; 3 * f];
        swiglu_rows(&gu, f, &mut out).unwrap();
        for r in 0..3 {
            for j in 0..f {
                let (g, u) = (gu[r * 2 * f + j] as f64, gu[r * 2 * f + f + j] as f64);
                let want = g / (1.0 + (-g).exp()) * u;
                assert!((out[r * f + j] as f64 - want).abs() < 1e-5, "{r} {j}");
            }
        }
        assert!(swiglu_rows(&gu, 4, &mut out).is_err());
        assert!(swiglu_rows(&gu[..2 * f], f, &mut out).is_err());
    }
}
