//! `mor_ce_chunk_stats` (kernels/cross_entropy.cu) ported line for line to Rust (one warp
//! per row: each lane runs an online max/sum over the columns `lane, lane + 32, ...`, then
//! the lanes merge through a warp max and a warp sum) and run over `warp_per_row`'s grid,
//! against the CPU body `host::ce_chunk_stats`: rows narrower than a warp, widths that are
//! not a multiple of 32, `-inf` logits (whole lanes of them, and a whole row), targets
//! inside and outside the chunk.

use mor_core::rng::Rng;
use mor_kernels::cuda::{host, launch};

const WARP: usize = 32;

/// The kernel, per block, warp and lane; f32 arithmetic as on the device (the warp sum in
/// butterfly order).
fn ce_chunk_stats(logits: &[f32], targets: &[u32], n: usize, cols: usize, col0: usize) -> Vec<f32> {
    let dims = launch::warp_per_row(n as u64).unwrap();
    let warps_per_block = dims.block.0 as usize / WARP;
    let mut stats = vec![f32::NAN; 3 * n];
    for bx in 0..dims.grid.0 as usize {
        for w in 0..warps_per_block {
            let row = bx * warps_per_block + w;
            if row >= n {
                continue;
            }
            let x = &logits[row * cols..];
            let mut ms = [f32::NEG_INFINITY; WARP];
            let mut ss = [0f32; WARP];
            for lane in 0..WARP {
                let (mut m, mut s) = (f32::NEG_INFINITY, 0f32);
                let mut c = lane;
                while c < cols {
                    let v = x[c];
                    c += WARP;
                    if v == f32::NEG_INFINITY {
                        continue;
                    }
                    if v > m {
                        s = s * (m - v).exp() + 1.0;
                        m = v;
                    } else {
                        s += (v - m).exp();
                    }
                }
                ms[lane] = m;
                ss[lane] = s;
            }
            let mx = butterfly(ms, f32::max);
            for lane in 0..WARP {
                ss[lane] = if ms[lane] == f32::NEG_INFINITY {
                    0.0
                } else {
                    ss[lane] * (ms[lane] - mx).exp()
                };
            }
            let total = butterfly(ss, |a, b| a + b);
            let t = targets[row] as usize;
            let tl = if t >= col0 && t - col0 < cols {
                x[t - col0]
            } else {
                0.0
            };
            stats[row * 3] = mx;
            stats[row * 3 + 1] = total;
            stats[row * 3 + 2] = tl;
        }
    }
    stats
}

/// `__shfl_xor_sync` reduction: every lane ends with the same value; lane 0's is returned.
fn butterfly(mut v: [f32; WARP], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut o = WARP / 2;
    while o > 0 {
        let prev = v;
        for lane in 0..WARP {
            v[lane] = f(prev[lane], prev[lane ^ o]);
        }
        o /= 2;
    }
    assert!(v
        .iter()
        .all(|&x| x.to_bits() == v[0].to_bits() || x.is_nan()));
    v[0]
}

#[test]
fn ported_ce_chunk_stats_match_the_cpu_body() {
    let mut rng = Rng::new(9);
    for (n, cols, col0) in [
        (3, 1, 0),
        (5, 31, 64),
        (70, 33, 0),
        (9, 100, 200),
        (1, 257, 7),
    ] {
        let mut x: Vec<f32> = (0..n * cols).map(|_| 3.0 * rng.normal() as f32).collect();
        // Row 0: every column of lane 0 is -inf; row 1 (when there is one) entirely -inf.
        for c in (0..cols).step_by(WARP) {
            x[c] = f32::NEG_INFINITY;
        }
        if n > 1 {
            x[cols..2 * cols].fill(f32::NEG_INFINITY);
        }
        // Targets inside the chunk, before it and after it.
        let targets: Vec<u32> = (0..n)
            .map(|r| match r % 3 {
                0 => (col0 + (r * 7) % cols) as u32,
                1 => col0.checked_sub(1).unwrap_or(col0 + cols) as u32,
                _ => (col0 + cols + r) as u32,
            })
            .collect();
        let got = ce_chunk_stats(&x, &targets, n, cols, col0);
        let xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let want = host::ce_chunk_stats(&xs, &targets, n, cols, col0);
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let ok = if w.is_finite() {
                (g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0)
            } else {
                g as f64 == w
            };
            assert!(
                ok,
                "n {n}, cols {cols}, col0 {col0}: stats[{i}] port {g} vs CPU body {w}"
            );
        }
    }
}
