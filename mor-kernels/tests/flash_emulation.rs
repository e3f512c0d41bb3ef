//! The flash-attention kernels of `kernels/flash_attention.cu`, ported line for line to Rust
//! (one loop per block, warp and lane; shared memory as flat arrays with the kernels'
//! offsets and strides; warp shuffles as reads of another lane's value; f32 arithmetic)
//! and run on the CPU against the kernels' CPU bodies (`cuda::host`). Without a GPU this
//! checks what the CPU bodies cannot: the tiling, the shared-memory layouts, the tile
//! skipping, the online softmax and the grids of `launch::FlashPlan`.

use mor_core::rng::Rng;
use mor_kernels::cuda::host;
use mor_kernels::cuda::launch::{
    FlashPlan, FlashShape, FLASH_DKV_KEYS, FLASH_DQ_ROWS, FLASH_FWD_ROWS, FLASH_KEY_TILE,
    FLASH_QUERY_TILE, FLASH_WARPS, WARP,
};
use mor_kernels::PAD_POS;

const W: usize = FLASH_WARPS as usize;
const L: usize = WARP as usize;
const BK: usize = FLASH_KEY_TILE;

fn visible(qp: u32, kp: u32) -> bool {
    qp != PAD_POS && kp != PAD_POS && kp <= qp
}

/// `mor_fa_load`: rows `[i0, i0 + rows)` of a `[n, dh]` matrix into `dst` with `stride`.
fn load(dst: &mut [f32], src: &[f32], i0: usize, rows: usize, n: usize, dh: usize, stride: usize) {
    for e in 0..rows * dh {
        let (r, c) = (e / dh, e % dh);
        dst[r * stride + c] = if i0 + r < n {
            src[(i0 + r) * dh + c]
        } else {
            0.0
        };
    }
}

fn qmax(q_pos: &[u32], i0: usize, rows: usize, t: usize) -> (bool, u32) {
    let (mut any, mut mx) = (false, 0u32);
    for r in 0..rows {
        if i0 + r < t && q_pos[i0 + r] != PAD_POS {
            any = true;
            mx = mx.max(q_pos[i0 + r]);
        }
    }
    (any, mx)
}

struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    q_pos: &'a [u32],
    k_pos: &'a [u32],
    sh: FlashShape,
}

fn fwd(x: &Inputs<'_>) -> Vec<f32> {
    let FlashShape {
        q_heads: hq,
        kv_heads: hkv,
        t,
        s,
        head_dim: dh,
        ..
    } = x.sh;
    let plan = FlashPlan::new(x.sh).unwrap();
    let scale = 1.0 / (dh as f32).sqrt();
    let rows = FLASH_FWD_ROWS;
    let bq = W * rows;
    let mut out = vec![f32::NAN; x.sh.batch * hq * t * (dh + 1)];
    let (gx, gy, gz) = plan.fwd.grid;
    for bb in 0..gz as usize {
        for head in 0..gy as usize {
            for bx in 0..gx as usize {
                let kvh = head / (hq / hkv);
                let i0 = bx * bq;
                let qrow0 = (bb * hq + head) * t;
                let krow0 = (bb * hkv + kvh) * s;
                let qp_row = &x.q_pos[bb * t..];
                let kp_row = &x.k_pos[bb * s..];
                let words = plan.fwd.shared_mem_bytes as usize / 4;
                let mut smem = vec![f32::NAN; words];
                let (ks_o, vs_o, qs_o) = (0, BK * (dh + 1), BK * (dh + 1) + BK * dh);
                let mut kps = [0u32; BK];
                assert_eq!(qs_o + bq * dh + BK, words, "forward shared memory");
                load(&mut smem[qs_o..], &x.q[qrow0 * dh..], i0, bq, t, dh, dh);
                let (qany, qmx) = qmax(qp_row, i0, bq, t);
                let mut qp = [[0u32; FLASH_FWD_ROWS]; W];
                let mut m = [[f32::NEG_INFINITY; FLASH_FWD_ROWS]; W];
                let mut l = [[0f32; FLASH_FWD_ROWS]; W];
                let mut acc = vec![vec![vec![0f32; dh]; rows]; W];
                for w in 0..W {
                    for r in 0..rows {
                        let i = i0 + w * rows + r;
                        qp[w][r] = if i < t { qp_row[i] } else { PAD_POS };
                    }
                }
                let mut j0 = 0;
                while j0 < s {
                    let mut vis = false;
                    for tx in 0..BK {
                        let j = j0 + tx;
                        let kp = if j < s { kp_row[j] } else { PAD_POS };
                        kps[tx] = kp;
                        vis |= qany && kp != PAD_POS && kp <= qmx;
                    }
                    if !vis {
                        j0 += BK;
                        continue;
                    }
                    load(&mut smem[ks_o..], &x.k[krow0 * dh..], j0, BK, s, dh, dh + 1);
                    load(&mut smem[vs_o..], &x.v[krow0 * dh..], j0, BK, s, dh, dh);
                    for w in 0..W {
                        // sc[lane][r]
                        let mut sc = vec![[0f32; FLASH_FWD_ROWS]; L];
                        for (lane, scl) in sc.iter_mut().enumerate() {
                            let krow = ks_o + lane * (dh + 1);
                            let qw = qs_o + w * rows * dh;
                            for c in 0..dh {
                                let kc = smem[krow + c];
                                for r in 0..rows {
                                    scl[r] += smem[qw + r * dh + c] * kc;
                                }
                            }
                        }
                        for r in 0..rows {
                            let xs: Vec<f32> = (0..L)
                                .map(|lane| {
                                    if visible(qp[w][r], kps[lane]) {
                                        sc[lane][r] * scale
                                    } else {
                                        f32::NEG_INFINITY
                                    }
                                })
                                .collect();
                            let mt = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                            let mn = m[w][r].max(mt);
                            let corr = if mn == f32::NEG_INFINITY {
                                1.0
                            } else {
                                (m[w][r] - mn).exp()
                            };
                            let p: Vec<f32> = (0..L)
                                .map(|lane| {
                                    if visible(qp[w][r], kps[lane]) {
                                        (xs[lane] - mn).exp()
                                    } else {
                                        0.0
                                    }
                                })
                                .collect();
                            l[w][r] = l[w][r] * corr + p.iter().sum::<f32>();
                            m[w][r] = mn;
                            for a in acc[w][r].iter_mut() {
                                *a *= corr;
                            }
                            for (lane, scl) in sc.iter_mut().enumerate() {
                                scl[r] = p[lane];
                            }
                        }
                        for (kk, sck) in sc.iter().enumerate() {
                            for c in 0..dh {
                                let vc = smem[vs_o + kk * dh + c];
                                for r in 0..rows {
                                    acc[w][r][c] += sck[r] * vc;
                                }
                            }
                        }
                    }
                    j0 += BK;
                }
                for w in 0..W {
                    for r in 0..rows {
                        let i = i0 + w * rows + r;
                        if i >= t {
                            continue;
                        }
                        let o = (qrow0 + i) * (dh + 1);
                        let inv = if l[w][r] > 0.0 { 1.0 / l[w][r] } else { 0.0 };
                        for c in 0..dh {
                            out[o + c] = acc[w][r][c] * inv;
                        }
                        out[o + dh] = if l[w][r] > 0.0 {
                            m[w][r] + l[w][r].ln()
                        } else {
                            f32::NEG_INFINITY
                        };
                    }
                }
            }
        }
    }
    out
}

fn bwd_dq(x: &Inputs<'_>, dout: &[f32], stats: &[f32]) -> Vec<f32> {
    let FlashShape {
        q_heads: hq,
        kv_heads: hkv,
        t,
        s,
        head_dim: dh,
        ..
    } = x.sh;
    let plan = FlashPlan::new(x.sh).unwrap();
    let scale = 1.0 / (dh as f32).sqrt();
    let rows = FLASH_DQ_ROWS;
    let bq = W * rows;
    let mut dq = vec![f32::NAN; x.sh.batch * hq * t * dh];
    let (gx, gy, gz) = plan.dq.grid;
    for bb in 0..gz as usize {
        for head in 0..gy as usize {
            for bx in 0..gx as usize {
                let kvh = head / (hq / hkv);
                let i0 = bx * bq;
                let qrow0 = (bb * hq + head) * t;
                let krow0 = (bb * hkv + kvh) * s;
                let qp_row = &x.q_pos[bb * t..];
                let kp_row = &x.k_pos[bb * s..];
                let words = plan.dq.shared_mem_bytes as usize / 4;
                let mut smem = vec![f32::NAN; words];
                let (ks_o, vs_o) = (0, BK * (dh + 1));
                let qs_o = 2 * BK * (dh + 1);
                let dos_o = qs_o + bq * dh;
                assert_eq!(dos_o + bq * dh + BK, words, "dq shared memory");
                let mut kps = [0u32; BK];
                load(&mut smem[qs_o..], &x.q[qrow0 * dh..], i0, bq, t, dh, dh);
                load(&mut smem[dos_o..], &dout[qrow0 * dh..], i0, bq, t, dh, dh);
                let (qany, qmx) = qmax(qp_row, i0, bq, t);
                let mut acc = vec![vec![vec![0f32; dh]; rows]; W];
                let info = |w: usize, r: usize| {
                    let i = i0 + w * rows + r;
                    if i < t {
                        (
                            qp_row[i],
                            stats[(qrow0 + i) * 2],
                            stats[(qrow0 + i) * 2 + 1],
                        )
                    } else {
                        (PAD_POS, 0.0, 0.0)
                    }
                };
                let mut j0 = 0;
                while j0 < s {
                    let mut vis = false;
                    for tx in 0..BK {
                        let j = j0 + tx;
                        let kp = if j < s { kp_row[j] } else { PAD_POS };
                        kps[tx] = kp;
                        vis |= qany && kp != PAD_POS && kp <= qmx;
                    }
                    if !vis {
                        j0 += BK;
                        continue;
                    }
                    load(&mut smem[ks_o..], &x.k[krow0 * dh..], j0, BK, s, dh, dh + 1);
                    load(&mut smem[vs_o..], &x.v[krow0 * dh..], j0, BK, s, dh, dh + 1);
                    for w in 0..W {
                        let mut ds = vec![vec![0f32; rows]; L];
                        for (lane, dsl) in ds.iter_mut().enumerate() {
                            let (krow, vrow) = (ks_o + lane * (dh + 1), vs_o + lane * (dh + 1));
                            let (qw, dw) = (qs_o + w * rows * dh, dos_o + w * rows * dh);
                            let (mut sc, mut dp) = (vec![0f32; rows], vec![0f32; rows]);
                            for c in 0..dh {
                                let (kc, vc) = (smem[krow + c], smem[vrow + c]);
                                for r in 0..rows {
                                    sc[r] += smem[qw + r * dh + c] * kc;
                                    dp[r] += smem[dw + r * dh + c] * vc;
                                }
                            }
                            for r in 0..rows {
                                let (qp, lse, dd) = info(w, r);
                                let p = if visible(qp, kps[lane]) {
                                    (sc[r] * scale - lse).exp()
                                } else {
                                    0.0
                                };
                                dsl[r] = p * (dp[r] - dd);
                            }
                        }
                        for (kk, dsk) in ds.iter().enumerate() {
                            for c in 0..dh {
                                let kc = smem[ks_o + kk * (dh + 1) + c];
                                for r in 0..rows {
                                    acc[w][r][c] += dsk[r] * kc;
                                }
                            }
                        }
                    }
                    j0 += BK;
                }
                for w in 0..W {
                    for r in 0..rows {
                        let i = i0 + w * rows + r;
                        if i < t {
                            for c in 0..dh {
                                dq[(qrow0 + i) * dh + c] = acc[w][r][c] * scale;
                            }
                        }
                    }
                }
            }
        }
    }
    dq
}

fn bwd_dkv(x: &Inputs<'_>, dout: &[f32], stats: &[f32]) -> Vec<f32> {
    let FlashShape {
        batch,
        q_heads: hq,
        kv_heads: hkv,
        t,
        s,
        head_dim: dh,
    } = x.sh;
    let plan = FlashPlan::new(x.sh).unwrap();
    let scale = 1.0 / (dh as f32).sqrt();
    let keys = FLASH_DKV_KEYS;
    let bkv = W * keys;
    let bq = FLASH_QUERY_TILE;
    let group = hq / hkv;
    let plane = batch * hkv * s * dh;
    let mut dkv = vec![f32::NAN; 2 * plane];
    let (gx, gy, gz) = plan.dkv.grid;
    for bb in 0..gz as usize {
        for kvh in 0..gy as usize {
            for bx in 0..gx as usize {
                let j0 = bx * bkv;
                let krow0 = (bb * hkv + kvh) * s;
                let qp_row = &x.q_pos[bb * t..];
                let kp_row = &x.k_pos[bb * s..];
                let words = plan.dkv.shared_mem_bytes as usize / 4;
                let mut smem = vec![f32::NAN; words];
                let dos_o = bq * (dh + 1);
                let ks_o = 2 * bq * (dh + 1);
                let vs_o = ks_o + bkv * dh;
                assert_eq!(vs_o + bkv * dh + 3 * bq, words, "dkv shared memory");
                let (mut lses, mut dds, mut qps) = (vec![0f32; bq], vec![0f32; bq], vec![0u32; bq]);
                load(&mut smem[ks_o..], &x.k[krow0 * dh..], j0, bkv, s, dh, dh);
                load(&mut smem[vs_o..], &x.v[krow0 * dh..], j0, bkv, s, dh, dh);
                let kmin = (0..bkv)
                    .filter(|r| j0 + r < s)
                    .map(|r| kp_row[j0 + r])
                    .fold(PAD_POS, u32::min);
                let kp = |w: usize, r: usize| {
                    let j = j0 + w * keys + r;
                    if j < s {
                        kp_row[j]
                    } else {
                        PAD_POS
                    }
                };
                let mut dk = vec![vec![vec![0f32; dh]; keys]; W];
                let mut dv = vec![vec![vec![0f32; dh]; keys]; W];
                for hh in 0..group {
                    let head = kvh * group + hh;
                    let qrow0 = (bb * hq + head) * t;
                    let mut i0 = 0;
                    while i0 < t {
                        let mut vis = false;
                        for tx in 0..bq {
                            let i = i0 + tx;
                            let p = if i < t { qp_row[i] } else { PAD_POS };
                            qps[tx] = p;
                            lses[tx] = if i < t { stats[(qrow0 + i) * 2] } else { 0.0 };
                            dds[tx] = if i < t {
                                stats[(qrow0 + i) * 2 + 1]
                            } else {
                                0.0
                            };
                            vis |= p != PAD_POS && kmin != PAD_POS && kmin <= p;
                        }
                        if !vis {
                            i0 += bq;
                            continue;
                        }
                        load(&mut smem[..], &x.q[qrow0 * dh..], i0, bq, t, dh, dh + 1);
                        load(
                            &mut smem[dos_o..],
                            &dout[qrow0 * dh..],
                            i0,
                            bq,
                            t,
                            dh,
                            dh + 1,
                        );
                        for w in 0..W {
                            let (mut pl, mut gl) =
                                (vec![vec![0f32; keys]; L], vec![vec![0f32; keys]; L]);
                            for lane in 0..L {
                                let (qrow, drow) = (lane * (dh + 1), dos_o + lane * (dh + 1));
                                let (kw, vw) = (ks_o + w * keys * dh, vs_o + w * keys * dh);
                                let (mut sc, mut dp) = (vec![0f32; keys], vec![0f32; keys]);
                                for c in 0..dh {
                                    let (qc, dc) = (smem[qrow + c], smem[drow + c]);
                                    for r in 0..keys {
                                        sc[r] += qc * smem[kw + r * dh + c];
                                        dp[r] += dc * smem[vw + r * dh + c];
                                    }
                                }
                                for r in 0..keys {
                                    let p = if visible(qps[lane], kp(w, r)) {
                                        (sc[r] * scale - lses[lane]).exp()
                                    } else {
                                        0.0
                                    };
                                    pl[lane][r] = p;
                                    gl[lane][r] = p * (dp[r] - dds[lane]);
                                }
                            }
                            for ii in 0..bq {
                                let (qi, di) = (ii * (dh + 1), dos_o + ii * (dh + 1));
                                for c in 0..dh {
                                    let (qc, dc) = (smem[qi + c], smem[di + c]);
                                    for r in 0..keys {
                                        dv[w][r][c] += pl[ii][r] * dc;
                                        dk[w][r][c] += gl[ii][r] * qc;
                                    }
                                }
                            }
                        }
                        i0 += bq;
                    }
                }
                for w in 0..W {
                    for r in 0..keys {
                        let j = j0 + w * keys + r;
                        if j < s {
                            for c in 0..dh {
                                dkv[(krow0 + j) * dh + c] = dk[w][r][c] * scale;
                                dkv[plane + (krow0 + j) * dh + c] = dv[w][r][c];
                            }
                        }
                    }
                }
            }
        }
    }
    dkv
}

fn normal(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[track_caller]
fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(
        1e-3f64,
        |a, &b| if b.is_finite() { a.max(b.abs()) } else { a },
    );
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_finite() {
            (g as f64 - w).abs() <= tol * scale
        } else {
            g as f64 == w
        };
        assert!(ok, "{what}[{i}]: kernel port {g} vs CPU body {w}");
    }
}

/// Runs the ported kernels and the CPU bodies on one case.
fn check(sh: FlashShape, q_pos: Vec<u32>, k_pos: Vec<u32>, seed: u64) {
    let mut rng = Rng::new(seed);
    let (nq, nkv) = (
        sh.batch * sh.q_heads * sh.t * sh.head_dim,
        sh.batch * sh.kv_heads * sh.s * sh.head_dim,
    );
    let (q, k, v) = (
        normal(&mut rng, nq),
        normal(&mut rng, nkv),
        normal(&mut rng, nkv),
    );
    let dout = normal(&mut rng, nq);
    let x = Inputs {
        q: &q,
        k: &k,
        v: &v,
        q_pos: &q_pos,
        k_pos: &k_pos,
        sh,
    };
    let packed = fwd(&x);
    let (o, lse) = host::flash_attention_fwd(&f64s(&q), &f64s(&k), &f64s(&v), &q_pos, &k_pos, sh);
    let dh = sh.head_dim;
    let got_o: Vec<f32> = packed
        .chunks(dh + 1)
        .flat_map(|r| r[..dh].to_vec())
        .collect();
    let got_lse: Vec<f32> = packed.chunks(dh + 1).map(|r| r[dh]).collect();
    close(&got_o, &o, 1e-5, "out");
    close(&got_lse, &lse, 1e-5, "lse");
    // The backward's statistics as the op builds them: lse and D = rowsum(dO ⊙ O).
    let mut stats = Vec::new();
    for (row, (orow, drow)) in got_o.chunks(dh).zip(dout.chunks(dh)).enumerate() {
        stats.push(got_lse[row]);
        stats.push(orow.iter().zip(drow).map(|(a, b)| a * b).sum::<f32>());
    }
    let dq = bwd_dq(&x, &dout, &stats);
    let dkv = bwd_dkv(&x, &dout, &stats);
    let (wq, wk, wv) = host::flash_attention_bwd(
        &f64s(&q),
        &f64s(&k),
        &f64s(&v),
        &q_pos,
        &k_pos,
        &f64s(&dout),
        &f64s(&stats),
        sh,
    );
    close(&dq, &wq, 1e-4, "dq");
    close(&dkv[..nkv], &wk, 1e-4, "dk");
    close(&dkv[nkv..], &wv, 1e-4, "dv");
    assert!(dq.iter().any(|&x| x != 0.0) && dkv.iter().any(|&x| x != 0.0));
}

#[test]
fn ported_kernels_match_the_cpu_bodies_recursion_wise() {
    // Gathered, gapped, ascending positions with a padded query and key; t and s not
    // multiples of any tile; GQA 4/2; dh not a multiple of 32.
    let sel: Vec<u32> = (0..45u32).map(|i| 3 * i + i % 2).collect();
    let mut qp = sel.repeat(2);
    qp[7] = PAD_POS;
    qp[50] = PAD_POS;
    let mut kp = sel.repeat(2);
    kp[11] = PAD_POS;
    let sh = FlashShape {
        batch: 2,
        q_heads: 4,
        kv_heads: 2,
        t: 45,
        s: 45,
        head_dim: 40,
    };
    check(sh, qp, kp, 1);
}

#[test]
fn ported_kernels_match_the_cpu_bodies_with_shared_kv_and_unsorted_keys() {
    // Shared step-1 K/V: a few queries against every step-1 key (s > t), one query before
    // every key; 3 query heads per key/value head.
    let sh = FlashShape {
        batch: 1,
        q_heads: 6,
        kv_heads: 2,
        t: 7,
        s: 70,
        head_dim: 33,
    };
    check(sh, vec![0, 5, 9, 33, 34, 60, 69], (1..71).collect(), 2);
    // Keys in no order, a wide head, MHA.
    let mut rng = Rng::new(3);
    let mut kp: Vec<u32> = (0..50u32).collect();
    rng.shuffle(&mut kp);
    let sh = FlashShape {
        batch: 1,
        q_heads: 2,
        kv_heads: 2,
        t: 13,
        s: 50,
        head_dim: 128,
    };
    check(sh, (0..13u32).map(|i| 4 * i).collect(), kp, 4);
}

#[test]
fn ported_kernels_match_the_cpu_bodies_at_degenerate_and_skipped_tiles() {
    // Two queries, two keys, one column (with a single key, P = 1 and dQ = dK = 0).
    let tiny = FlashShape {
        batch: 1,
        q_heads: 1,
        kv_heads: 1,
        t: 2,
        s: 2,
        head_dim: 1,
    };
    check(tiny, vec![0, 1], vec![0, 1], 5);
    // A whole key tile (keys 32..64) padded: the forward and dQ passes skip it, the dK/dV
    // blocks of those keys see no query; GQA 3/1, dh = 31.
    let kp: Vec<u32> = (0..70u32)
        .map(|j| if (32..64).contains(&j) { PAD_POS } else { j })
        .collect();
    let sh = FlashShape {
        batch: 1,
        q_heads: 3,
        kv_heads: 1,
        t: 20,
        s: 70,
        head_dim: 31,
    };
    check(sh, (0..20u32).map(|i| 4 * i).collect(), kp, 6);
    // A whole forward block of queries (rows 16..32) padded, in both batch rows, and a
    // query tile of the dK/dV pass (rows 32..40) that sees only part of the keys; dh = 64.
    let qp: Vec<u32> = (0..40u32)
        .map(|i| if (16..32).contains(&i) { PAD_POS } else { i })
        .collect();
    let sh = FlashShape {
        batch: 2,
        q_heads: 2,
        kv_heads: 1,
        t: 40,
        s: 40,
        head_dim: 64,
    };
    check(
        sh,
        qp.repeat(2),
        (0..40u32).collect::<Vec<_>>().repeat(2),
        7,
    );
}
