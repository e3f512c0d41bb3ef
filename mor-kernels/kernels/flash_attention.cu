// Causal attention with GQA by positions, flash-style (FlashAttention-2 order), forward
// and backward (the contract of Backend::attention, mor-spec section 1.1: scale 1/sqrt(dh)).
//
// Visibility: query i sees key j iff q_pos[i] != PAD, k_pos[j] != PAD and
// k_pos[j] <= q_pos[i]. A query that sees no key gets a zero row and lse = -inf.
// Query head h reads KV head h / (hq / hkv).
//
// Layout:
//   q:       [b, hq, t, dh]        k, v: [b, hkv, s, dh]        (T: f32 or bf16)
//   q_pos:   [b, t] u32            k_pos: [b, s] u32
//   out:     [b, hq, t, dh + 1] f32: the output row, then its log-sum-exp (the only
//            statistic the backward pass needs)
//   dout:    [b, hq, t, dh] f32    stats: [b, hq, t, 2] f32, (lse, D = rowsum(dO * O))
//   dq:      [b, hq, t, dh] f32    dkv: [2, b, hkv, s, dh] f32 (dK, then dV)
//
// No [t, s] score matrix exists in global memory: the forward pass and the dQ pass keep a
// tile of query rows per block and stream key tiles of MOR_FA_BK keys through shared memory
// with an online softmax; the dK/dV pass keeps a tile of keys per block and streams query
// tiles of 32 rows (one per lane), recomputing P = exp(S - lse). All arithmetic is f32.
// A key tile that no query of the block sees (and, in the dK/dV pass, a query tile that
// sees no key of the block) is skipped. Grids and shared memory: `flash_attention` in
// src/cuda/launch.rs.
#include "mor_common.cuh"

#define MOR_FA_MAX_DH 128
#define MOR_FA_COLS (MOR_FA_MAX_DH / MOR_WARP)
#define MOR_FA_WARPS 4
#define MOR_FA_BK 32
#define MOR_FA_FWD_ROWS 4
#define MOR_FA_DQ_ROWS 3
#define MOR_FA_DKV_KEYS 3

__device__ __forceinline__ bool mor_fa_visible(unsigned int qp, unsigned int kp) {
    return qp != MOR_PAD_POS && kp != MOR_PAD_POS && kp <= qp;
}

// The largest non-padded query position of rows [i0, i0 + rows) (and whether one exists).
__device__ __forceinline__ bool mor_fa_qmax(const unsigned int* q_pos, unsigned int i0,
                                            unsigned int rows, unsigned int t,
                                            unsigned int* qmax) {
    bool any = false;
    unsigned int mx = 0;
    for (unsigned int r = 0; r < rows; ++r) {
        if (i0 + r < t) {
            const unsigned int p = q_pos[i0 + r];
            if (p != MOR_PAD_POS) {
                any = true;
                mx = p > mx ? p : mx;
            }
        }
    }
    *qmax = mx;
    return any;
}

// Loads rows [i0, i0 + rows) of a [n, dh] matrix into shared memory with row stride
// `stride`, as f32; rows past n are zero.
template <typename T>
__device__ __forceinline__ void mor_fa_load(float* dst, const T* src, unsigned int i0,
                                            unsigned int rows, unsigned int n, unsigned int dh,
                                            unsigned int stride) {
    for (unsigned int e = threadIdx.x; e < rows * dh; e += blockDim.x) {
        const unsigned int r = e / dh, c = e % dh;
        dst[r * stride + c] = (i0 + r < n) ? mor_to_f32(src[(unsigned long long)(i0 + r) * dh + c]) : 0.0f;
    }
}

// Forward. Grid (ceil(t / BQ), hq, b) with BQ = MOR_FA_WARPS * MOR_FA_FWD_ROWS; block
// MOR_FA_WARPS warps. Each warp owns MOR_FA_FWD_ROWS query rows; lane j scores key j of
// the tile; lane c owns output columns c, c + 32, ...
// Shared memory: ks [BK][dh + 1], vs [BK][dh], qs [BQ][dh] f32 and kps [BK] u32.
template <typename T>
__device__ void flash_attn_fwd(const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const unsigned int* __restrict__ q_pos,
                               const unsigned int* __restrict__ k_pos, float* __restrict__ out,
                               unsigned int hq, unsigned int hkv, unsigned int t,
                               unsigned int s, unsigned int dh, float scale) {
    extern __shared__ float smem[];
    const unsigned int BQ = MOR_FA_WARPS * MOR_FA_FWD_ROWS;
    float* ks = smem;
    float* vs = ks + MOR_FA_BK * (dh + 1);
    float* qs = vs + MOR_FA_BK * dh;
    unsigned int* kps = (unsigned int*)(qs + BQ * dh);
    const unsigned int head = blockIdx.y, bb = blockIdx.z;
    const unsigned int kvh = head / (hq / hkv);
    const unsigned int lane = threadIdx.x % MOR_WARP, warp = threadIdx.x / MOR_WARP;
    const unsigned int i0 = blockIdx.x * BQ;
    const unsigned long long qrow0 = ((unsigned long long)bb * hq + head) * t;
    const unsigned long long krow0 = ((unsigned long long)bb * hkv + kvh) * s;
    const unsigned int* qp_row = q_pos + (unsigned long long)bb * t;
    const unsigned int* kp_row = k_pos + (unsigned long long)bb * s;

    mor_fa_load(qs, q + qrow0 * dh, i0, BQ, t, dh, dh);
    unsigned int qmax;
    const bool qany = mor_fa_qmax(qp_row, i0, BQ, t, &qmax);

    unsigned int qp[MOR_FA_FWD_ROWS];
    float acc[MOR_FA_FWD_ROWS][MOR_FA_COLS], m[MOR_FA_FWD_ROWS], l[MOR_FA_FWD_ROWS];
#pragma unroll
    for (int r = 0; r < MOR_FA_FWD_ROWS; ++r) {
        const unsigned int i = i0 + warp * MOR_FA_FWD_ROWS + r;
        qp[r] = i < t ? qp_row[i] : MOR_PAD_POS;
        m[r] = MOR_NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int j = 0; j < MOR_FA_COLS; ++j) acc[r][j] = 0.0f;
    }

    for (unsigned int j0 = 0; j0 < s; j0 += MOR_FA_BK) {
        __syncthreads();  // the previous tile is used up
        bool vis = false;
        if (threadIdx.x < MOR_FA_BK) {
            const unsigned int j = j0 + threadIdx.x;
            const unsigned int kp = j < s ? kp_row[j] : MOR_PAD_POS;
            kps[threadIdx.x] = kp;
            vis = qany && kp != MOR_PAD_POS && kp <= qmax;
        }
        if (!__syncthreads_or(vis)) continue;
        mor_fa_load(ks, k + krow0 * dh, j0, MOR_FA_BK, s, dh, dh + 1);
        mor_fa_load(vs, v + krow0 * dh, j0, MOR_FA_BK, s, dh, dh);
        __syncthreads();

        const unsigned int kp = kps[lane];
        const float* krow = ks + lane * (dh + 1);
        const float* qw = qs + warp * MOR_FA_FWD_ROWS * dh;
        float sc[MOR_FA_FWD_ROWS];
#pragma unroll
        for (int r = 0; r < MOR_FA_FWD_ROWS; ++r) sc[r] = 0.0f;
        for (unsigned int c = 0; c < dh; ++c) {
            const float kc = krow[c];
#pragma unroll
            for (int r = 0; r < MOR_FA_FWD_ROWS; ++r) sc[r] += qw[r * dh + c] * kc;
        }
#pragma unroll
        for (int r = 0; r < MOR_FA_FWD_ROWS; ++r) {
            const bool ok = mor_fa_visible(qp[r], kp);  // kp is PAD past s
            const float x = ok ? sc[r] * scale : MOR_NEG_INF;
            const float mn = fmaxf(m[r], mor_warp_max(x));
            const float corr = (mn == MOR_NEG_INF) ? 1.0f : expf(m[r] - mn);
            const float p = ok ? expf(x - mn) : 0.0f;
            l[r] = l[r] * corr + mor_warp_sum(p);
            m[r] = mn;
#pragma unroll
            for (int j = 0; j < MOR_FA_COLS; ++j) acc[r][j] *= corr;
            sc[r] = p;
        }
        for (unsigned int kk = 0; kk < MOR_FA_BK; ++kk) {
            float pk[MOR_FA_FWD_ROWS];
#pragma unroll
            for (int r = 0; r < MOR_FA_FWD_ROWS; ++r) pk[r] = __shfl_sync(MOR_FULL_MASK, sc[r], kk);
            const float* vrow = vs + kk * dh;
#pragma unroll
            for (int j = 0; j < MOR_FA_COLS; ++j) {
                const unsigned int c = lane + MOR_WARP * j;
                if (c < dh) {
                    const float vc = vrow[c];
#pragma unroll
                    for (int r = 0; r < MOR_FA_FWD_ROWS; ++r) acc[r][j] += pk[r] * vc;
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < MOR_FA_FWD_ROWS; ++r) {
        const unsigned int i = i0 + warp * MOR_FA_FWD_ROWS + r;
        if (i >= t) continue;
        float* o = out + (qrow0 + i) * (dh + 1);
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
        for (int j = 0; j < MOR_FA_COLS; ++j) {
            const unsigned int c = lane + MOR_WARP * j;
            if (c < dh) o[c] = acc[r][j] * inv;
        }
        if (lane == 0) o[dh] = l[r] > 0.0f ? m[r] + logf(l[r]) : MOR_NEG_INF;
    }
}

// dQ = scale * sum_j dS_ij K_j with dS = P * (dP - D), P = exp(S - lse), dP = dO V^T.
// Grid (ceil(t / BQ), hq, b) with BQ = MOR_FA_WARPS * MOR_FA_DQ_ROWS; the structure of the
// forward pass. Shared memory: ks, vs [BK][dh + 1], qs, dos [BQ][dh] f32, kps [BK] u32.
template <typename T>
__device__ void flash_attn_bwd_dq(const T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, const unsigned int* __restrict__ q_pos,
                                  const unsigned int* __restrict__ k_pos,
                                  const float* __restrict__ dout, const float* __restrict__ stats,
                                  float* __restrict__ dq, unsigned int hq, unsigned int hkv,
                                  unsigned int t, unsigned int s, unsigned int dh, float scale) {
    extern __shared__ float smem[];
    const unsigned int BQ = MOR_FA_WARPS * MOR_FA_DQ_ROWS;
    float* ks = smem;
    float* vs = ks + MOR_FA_BK * (dh + 1);
    float* qs = vs + MOR_FA_BK * (dh + 1);
    float* dos = qs + BQ * dh;
    unsigned int* kps = (unsigned int*)(dos + BQ * dh);
    const unsigned int head = blockIdx.y, bb = blockIdx.z;
    const unsigned int kvh = head / (hq / hkv);
    const unsigned int lane = threadIdx.x % MOR_WARP, warp = threadIdx.x / MOR_WARP;
    const unsigned int i0 = blockIdx.x * BQ;
    const unsigned long long qrow0 = ((unsigned long long)bb * hq + head) * t;
    const unsigned long long krow0 = ((unsigned long long)bb * hkv + kvh) * s;
    const unsigned int* qp_row = q_pos + (unsigned long long)bb * t;
    const unsigned int* kp_row = k_pos + (unsigned long long)bb * s;

    mor_fa_load(qs, q + qrow0 * dh, i0, BQ, t, dh, dh);
    mor_fa_load(dos, dout + qrow0 * dh, i0, BQ, t, dh, dh);
    unsigned int qmax;
    const bool qany = mor_fa_qmax(qp_row, i0, BQ, t, &qmax);

    unsigned int qp[MOR_FA_DQ_ROWS];
    float acc[MOR_FA_DQ_ROWS][MOR_FA_COLS], lse[MOR_FA_DQ_ROWS], dd[MOR_FA_DQ_ROWS];
#pragma unroll
    for (int r = 0; r < MOR_FA_DQ_ROWS; ++r) {
        const unsigned int i = i0 + warp * MOR_FA_DQ_ROWS + r;
        qp[r] = i < t ? qp_row[i] : MOR_PAD_POS;
        lse[r] = i < t ? stats[(qrow0 + i) * 2] : 0.0f;
        dd[r] = i < t ? stats[(qrow0 + i) * 2 + 1] : 0.0f;
#pragma unroll
        for (int j = 0; j < MOR_FA_COLS; ++j) acc[r][j] = 0.0f;
    }

    for (unsigned int j0 = 0; j0 < s; j0 += MOR_FA_BK) {
        __syncthreads();
        bool vis = false;
        if (threadIdx.x < MOR_FA_BK) {
            const unsigned int j = j0 + threadIdx.x;
            const unsigned int kp = j < s ? kp_row[j] : MOR_PAD_POS;
            kps[threadIdx.x] = kp;
            vis = qany && kp != MOR_PAD_POS && kp <= qmax;
        }
        if (!__syncthreads_or(vis)) continue;
        mor_fa_load(ks, k + krow0 * dh, j0, MOR_FA_BK, s, dh, dh + 1);
        mor_fa_load(vs, v + krow0 * dh, j0, MOR_FA_BK, s, dh, dh + 1);
        __syncthreads();

        const unsigned int kp = kps[lane];
        const float* krow = ks + lane * (dh + 1);
        const float* vrow = vs + lane * (dh + 1);
        const float* qw = qs + warp * MOR_FA_DQ_ROWS * dh;
        const float* dw = dos + warp * MOR_FA_DQ_ROWS * dh;
        float sc[MOR_FA_DQ_ROWS], dp[MOR_FA_DQ_ROWS];
#pragma unroll
        for (int r = 0; r < MOR_FA_DQ_ROWS; ++r) sc[r] = dp[r] = 0.0f;
        for (unsigned int c = 0; c < dh; ++c) {
            const float kc = krow[c], vc = vrow[c];
#pragma unroll
            for (int r = 0; r < MOR_FA_DQ_ROWS; ++r) {
                sc[r] += qw[r * dh + c] * kc;
                dp[r] += dw[r * dh + c] * vc;
            }
        }
#pragma unroll
        for (int r = 0; r < MOR_FA_DQ_ROWS; ++r) {
            const float p = mor_fa_visible(qp[r], kp) ? expf(sc[r] * scale - lse[r]) : 0.0f;
            sc[r] = p * (dp[r] - dd[r]);  // dS
        }
        for (unsigned int kk = 0; kk < MOR_FA_BK; ++kk) {
            float g[MOR_FA_DQ_ROWS];
#pragma unroll
            for (int r = 0; r < MOR_FA_DQ_ROWS; ++r) g[r] = __shfl_sync(MOR_FULL_MASK, sc[r], kk);
            const float* kr = ks + kk * (dh + 1);
#pragma unroll
            for (int j = 0; j < MOR_FA_COLS; ++j) {
                const unsigned int c = lane + MOR_WARP * j;
                if (c < dh) {
                    const float kc = kr[c];
#pragma unroll
                    for (int r = 0; r < MOR_FA_DQ_ROWS; ++r) acc[r][j] += g[r] * kc;
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < MOR_FA_DQ_ROWS; ++r) {
        const unsigned int i = i0 + warp * MOR_FA_DQ_ROWS + r;
        if (i >= t) continue;
        float* o = dq + (qrow0 + i) * dh;
#pragma unroll
        for (int j = 0; j < MOR_FA_COLS; ++j) {
            const unsigned int c = lane + MOR_WARP * j;
            if (c < dh) o[c] = acc[r][j] * scale;
        }
    }
}

// dV_j = sum_i P_ij dO_i and dK_j = scale * sum_i dS_ij Q_i over the query rows of every
// query head of the key's GQA group. Grid (ceil(s / BKV), hkv, b) with
// BKV = MOR_FA_WARPS * MOR_FA_DKV_KEYS; each warp owns MOR_FA_DKV_KEYS keys, lane i scores
// query row i of the tile, lane c owns gradient columns c, c + 32, ...
// Shared memory: qs, dos [32][dh + 1], ks, vs [BKV][dh], lses, ds, qps [32].
template <typename T>
__device__ void flash_attn_bwd_dkv(const T* __restrict__ q, const T* __restrict__ k,
                                   const T* __restrict__ v, const unsigned int* __restrict__ q_pos,
                                   const unsigned int* __restrict__ k_pos,
                                   const float* __restrict__ dout, const float* __restrict__ stats,
                                   float* __restrict__ dkv, unsigned int hq, unsigned int hkv,
                                   unsigned int t, unsigned int s, unsigned int dh, float scale) {
    extern __shared__ float smem[];
    const unsigned int BKV = MOR_FA_WARPS * MOR_FA_DKV_KEYS;
    const unsigned int BQ = MOR_WARP;
    float* qs = smem;
    float* dos = qs + BQ * (dh + 1);
    float* ks = dos + BQ * (dh + 1);
    float* vs = ks + BKV * dh;
    float* lses = vs + BKV * dh;
    float* dds = lses + BQ;
    unsigned int* qps = (unsigned int*)(dds + BQ);
    const unsigned int kvh = blockIdx.y, bb = blockIdx.z;
    const unsigned int group = hq / hkv;
    const unsigned int lane = threadIdx.x % MOR_WARP, warp = threadIdx.x / MOR_WARP;
    const unsigned int j0 = blockIdx.x * BKV;
    const unsigned long long krow0 = ((unsigned long long)bb * hkv + kvh) * s;
    const unsigned int* qp_row = q_pos + (unsigned long long)bb * t;
    const unsigned int* kp_row = k_pos + (unsigned long long)bb * s;

    mor_fa_load(ks, k + krow0 * dh, j0, BKV, s, dh, dh);
    mor_fa_load(vs, v + krow0 * dh, j0, BKV, s, dh, dh);
    // The smallest non-padded key position of the block (PAD when there is none).
    unsigned int kmin = MOR_PAD_POS;
    for (unsigned int r = 0; r < BKV; ++r) {
        if (j0 + r < s) {
            const unsigned int p = kp_row[j0 + r];
            kmin = p < kmin ? p : kmin;
        }
    }
    unsigned int kp[MOR_FA_DKV_KEYS];
    float dk[MOR_FA_DKV_KEYS][MOR_FA_COLS], dv[MOR_FA_DKV_KEYS][MOR_FA_COLS];
#pragma unroll
    for (int r = 0; r < MOR_FA_DKV_KEYS; ++r) {
        const unsigned int j = j0 + warp * MOR_FA_DKV_KEYS + r;
        kp[r] = j < s ? kp_row[j] : MOR_PAD_POS;
#pragma unroll
        for (int c = 0; c < MOR_FA_COLS; ++c) dk[r][c] = dv[r][c] = 0.0f;
    }

    for (unsigned int hh = 0; hh < group; ++hh) {
        const unsigned int head = kvh * group + hh;
        const unsigned long long qrow0 = ((unsigned long long)bb * hq + head) * t;
        for (unsigned int i0 = 0; i0 < t; i0 += BQ) {
            __syncthreads();
            bool vis = false;
            if (threadIdx.x < BQ) {
                const unsigned int i = i0 + threadIdx.x;
                const unsigned int p = i < t ? qp_row[i] : MOR_PAD_POS;
                qps[threadIdx.x] = p;
                lses[threadIdx.x] = i < t ? stats[(qrow0 + i) * 2] : 0.0f;
                dds[threadIdx.x] = i < t ? stats[(qrow0 + i) * 2 + 1] : 0.0f;
                vis = p != MOR_PAD_POS && kmin != MOR_PAD_POS && kmin <= p;
            }
            if (!__syncthreads_or(vis)) continue;
            mor_fa_load(qs, q + qrow0 * dh, i0, BQ, t, dh, dh + 1);
            mor_fa_load(dos, dout + qrow0 * dh, i0, BQ, t, dh, dh + 1);
            __syncthreads();

            const unsigned int qp = qps[lane];
            const float lse = lses[lane], dd = dds[lane];
            const float* qrow = qs + lane * (dh + 1);
            const float* drow = dos + lane * (dh + 1);
            const float* kw = ks + warp * MOR_FA_DKV_KEYS * dh;
            const float* vw = vs + warp * MOR_FA_DKV_KEYS * dh;
            float sc[MOR_FA_DKV_KEYS], dp[MOR_FA_DKV_KEYS];
#pragma unroll
            for (int r = 0; r < MOR_FA_DKV_KEYS; ++r) sc[r] = dp[r] = 0.0f;
            for (unsigned int c = 0; c < dh; ++c) {
                const float qc = qrow[c], dc = drow[c];
#pragma unroll
                for (int r = 0; r < MOR_FA_DKV_KEYS; ++r) {
                    sc[r] += qc * kw[r * dh + c];
                    dp[r] += dc * vw[r * dh + c];
                }
            }
#pragma unroll
            for (int r = 0; r < MOR_FA_DKV_KEYS; ++r) {
                const float p = mor_fa_visible(qp, kp[r]) ? expf(sc[r] * scale - lse) : 0.0f;
                sc[r] = p;
                dp[r] = p * (dp[r] - dd);  // dS
            }
            for (unsigned int ii = 0; ii < BQ; ++ii) {
                float pi[MOR_FA_DKV_KEYS], gi[MOR_FA_DKV_KEYS];
#pragma unroll
                for (int r = 0; r < MOR_FA_DKV_KEYS; ++r) {
                    pi[r] = __shfl_sync(MOR_FULL_MASK, sc[r], ii);
                    gi[r] = __shfl_sync(MOR_FULL_MASK, dp[r], ii);
                }
                const float* qi = qs + ii * (dh + 1);
                const float* di = dos + ii * (dh + 1);
#pragma unroll
                for (int j = 0; j < MOR_FA_COLS; ++j) {
                    const unsigned int c = lane + MOR_WARP * j;
                    if (c < dh) {
                        const float qc = qi[c], dc = di[c];
#pragma unroll
                        for (int r = 0; r < MOR_FA_DKV_KEYS; ++r) {
                            dv[r][j] += pi[r] * dc;
                            dk[r][j] += gi[r] * qc;
                        }
                    }
                }
            }
        }
    }

    const unsigned long long plane = (unsigned long long)gridDim.z * hkv * s * dh;
#pragma unroll
    for (int r = 0; r < MOR_FA_DKV_KEYS; ++r) {
        const unsigned int j = j0 + warp * MOR_FA_DKV_KEYS + r;
        if (j >= s) continue;
        float* dkr = dkv + (krow0 + j) * dh;
        float* dvr = dkv + plane + (krow0 + j) * dh;
#pragma unroll
        for (int c = 0; c < MOR_FA_COLS; ++c) {
            const unsigned int col = lane + MOR_WARP * c;
            if (col < dh) {
                dkr[col] = dk[r][c] * scale;
                dvr[col] = dv[r][c];
            }
        }
    }
}

#define MOR_FA_INSTANCES(T, SUFFIX)                                                            \
    extern "C" __global__ void mor_flash_attn_fwd_##SUFFIX(                                    \
        const T* q, const T* k, const T* v, const unsigned int* q_pos,                         \
        const unsigned int* k_pos, float* out, unsigned int hq, unsigned int hkv,              \
        unsigned int t, unsigned int s, unsigned int dh, float scale) {                        \
        flash_attn_fwd<T>(q, k, v, q_pos, k_pos, out, hq, hkv, t, s, dh, scale);               \
    }                                                                                          \
    extern "C" __global__ void mor_flash_attn_bwd_dq_##SUFFIX(                                 \
        const T* q, const T* k, const T* v, const unsigned int* q_pos,                         \
        const unsigned int* k_pos, const float* dout, const float* stats, float* dq,           \
        unsigned int hq, unsigned int hkv, unsigned int t, unsigned int s, unsigned int dh,    \
        float scale) {                                                                         \
        flash_attn_bwd_dq<T>(q, k, v, q_pos, k_pos, dout, stats, dq, hq, hkv, t, s, dh,        \
                             scale);                                                           \
    }                                                                                          \
    extern "C" __global__ void mor_flash_attn_bwd_dkv_##SUFFIX(                                \
        const T* q, const T* k, const T* v, const unsigned int* q_pos,                         \
        const unsigned int* k_pos, const float* dout, const float* stats, float* dkv,          \
        unsigned int hq, unsigned int hkv, unsigned int t, unsigned int s, unsigned int dh,    \
        float scale) {                                                                         \
        flash_attn_bwd_dkv<T>(q, k, v, q_pos, k_pos, dout, stats, dkv, hq, hkv, t, s, dh,      \
                              scale);                                                          \
    }

MOR_FA_INSTANCES(float, f32)
MOR_FA_INSTANCES(mor_bf16, bf16)
