// Decode attention: one query per request over a variable-length paged KV cache, with GQA
// (mor-spec sections 4 and 5: each recursion step keeps its own variable-length cache).
//
// Layout:
//   q:           [b, hq, dh]
//   k/v cache:   [num_blocks, block_tokens, hkv, dh], a pool of fixed-size blocks
//   block_table: [b, max_blocks] u32, the cache blocks of each request in token order
//   seq_lens:    [b] u32, the number of cached tokens of each request
//   out:         [b, hq, dh]
// Query head h reads KV head h / (hq / hkv); the scale is 1 / sqrt(dh).
//
// Split-K ("flash decoding"): the partial kernel gives each (part, head, request) a block
// that runs an online softmax over `part_tokens` tokens and writes (acc[dh], max, sum) in
// f32; the combine kernel merges the parts of each (request, head). The launch plan is
// `DecodePlan` in src/cuda/launch.rs.
#include "mor_common.cuh"

#define MOR_DECODE_MAX_DH 256
#define MOR_DECODE_PER_LANE (MOR_DECODE_MAX_DH / MOR_WARP)

// partial: [b, hq, n_parts, dh + 2]. Dynamic shared memory: n_warps * (dh + 2) floats.
template <typename T>
__device__ void paged_decode_partial(const T* __restrict__ q, const T* __restrict__ k_cache,
                                     const T* __restrict__ v_cache,
                                     const unsigned int* __restrict__ block_table,
                                     const unsigned int* __restrict__ seq_lens,
                                     float* __restrict__ partial, unsigned int hq,
                                     unsigned int hkv, unsigned int dh,
                                     unsigned int block_tokens, unsigned int max_blocks,
                                     unsigned int num_blocks, unsigned int part_tokens,
                                     float scale) {
    extern __shared__ float smem[];
    const unsigned int part = blockIdx.x, head = blockIdx.y, bb = blockIdx.z;
    const unsigned int n_parts = gridDim.x;
    const unsigned int lane = threadIdx.x % MOR_WARP, warp = threadIdx.x / MOR_WARP;
    const unsigned int n_warps = blockDim.x / MOR_WARP;
    const unsigned int kvh = head / (hq / hkv);

    unsigned long long cap = (unsigned long long)max_blocks * block_tokens;
    unsigned long long len = seq_lens[bb];
    if (len > cap) len = cap;
    const unsigned long long start = (unsigned long long)part * part_tokens;
    unsigned long long end = start + part_tokens;
    if (end > len) end = len;

    float qr[MOR_DECODE_PER_LANE], acc[MOR_DECODE_PER_LANE];
    const T* qh = q + ((unsigned long long)bb * hq + head) * dh;
#pragma unroll
    for (int j = 0; j < MOR_DECODE_PER_LANE; ++j) {
        const unsigned int c = lane + MOR_WARP * j;
        qr[j] = c < dh ? mor_to_f32(qh[c]) : 0.0f;
        acc[j] = 0.0f;
    }
    float m = MOR_NEG_INF, lsum = 0.0f;
    for (unsigned long long tok = start + warp; tok < end; tok += n_warps) {
        const unsigned int blk = block_table[(unsigned long long)bb * max_blocks + tok / block_tokens];
        if (blk >= num_blocks) continue;  // the same for the whole warp
        const unsigned long long base =
            (((unsigned long long)blk * block_tokens + tok % block_tokens) * hkv + kvh) * dh;
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < MOR_DECODE_PER_LANE; ++j) {
            const unsigned int c = lane + MOR_WARP * j;
            if (c < dh) s += qr[j] * mor_to_f32(k_cache[base + c]);
        }
        s = mor_warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float corr = (m == MOR_NEG_INF) ? 0.0f : expf(m - m_new);
        const float p = expf(s - m_new);
        lsum = lsum * corr + p;
#pragma unroll
        for (int j = 0; j < MOR_DECODE_PER_LANE; ++j) {
            const unsigned int c = lane + MOR_WARP * j;
            if (c < dh) acc[j] = acc[j] * corr + p * mor_to_f32(v_cache[base + c]);
        }
        m = m_new;
    }

    float* ws = smem + warp * (dh + 2);
#pragma unroll
    for (int j = 0; j < MOR_DECODE_PER_LANE; ++j) {
        const unsigned int c = lane + MOR_WARP * j;
        if (c < dh) ws[c] = acc[j];
    }
    if (lane == 0) {
        ws[dh] = m;
        ws[dh + 1] = lsum;
    }
    __syncthreads();

    float mx = MOR_NEG_INF;
    for (unsigned int w = 0; w < n_warps; ++w) mx = fmaxf(mx, smem[w * (dh + 2) + dh]);
    float* dst = partial + (((unsigned long long)bb * hq + head) * n_parts + part) * (dh + 2);
    for (unsigned int c = threadIdx.x; c < dh + 1; c += blockDim.x) {
        float v = 0.0f;
        for (unsigned int w = 0; w < n_warps; ++w) {
            const float mw = smem[w * (dh + 2) + dh];
            const float f = (mw == MOR_NEG_INF) ? 0.0f : expf(mw - mx);
            v += f * smem[w * (dh + 2) + (c < dh ? c : dh + 1)];
        }
        dst[c < dh ? c : dh + 1] = v;  // c == dh writes the merged sum
    }
    if (threadIdx.x == 0) dst[dh] = mx;
}

// out[b, h, :] = sum_p acc_p * e^(m_p - M) / sum_p l_p * e^(m_p - M); zeros when the
// request has no cached token. One block per (head, request).
template <typename T>
__device__ void paged_decode_combine(const float* __restrict__ partial, T* __restrict__ out,
                                     unsigned int hq, unsigned int dh, unsigned int n_parts) {
    const unsigned int head = blockIdx.x, bb = blockIdx.y;
    const float* src = partial + ((unsigned long long)bb * hq + head) * n_parts * (dh + 2);
    float mx = MOR_NEG_INF;
    for (unsigned int p = 0; p < n_parts; ++p) mx = fmaxf(mx, src[p * (dh + 2) + dh]);
    float total = 0.0f;
    for (unsigned int p = 0; p < n_parts; ++p) {
        const float mp = src[p * (dh + 2) + dh];
        if (mp != MOR_NEG_INF) total += src[p * (dh + 2) + dh + 1] * expf(mp - mx);
    }
    T* o = out + ((unsigned long long)bb * hq + head) * dh;
    for (unsigned int c = threadIdx.x; c < dh; c += blockDim.x) {
        float v = 0.0f;
        for (unsigned int p = 0; p < n_parts; ++p) {
            const float mp = src[p * (dh + 2) + dh];
            if (mp != MOR_NEG_INF) v += src[p * (dh + 2) + c] * expf(mp - mx);
        }
        o[c] = mor_from_f32<T>(total > 0.0f ? v / total : 0.0f);
    }
}

#define MOR_DECODE_INSTANCES(T, SUFFIX)                                                        \
    extern "C" __global__ void mor_paged_decode_partial_##SUFFIX(                              \
        const T* q, const T* k_cache, const T* v_cache, const unsigned int* block_table,       \
        const unsigned int* seq_lens, float* partial, unsigned int hq, unsigned int hkv,       \
        unsigned int dh, unsigned int block_tokens, unsigned int max_blocks,                   \
        unsigned int num_blocks, unsigned int part_tokens, float scale) {                      \
        paged_decode_partial<T>(q, k_cache, v_cache, block_table, seq_lens, partial, hq, hkv,  \
                                dh, block_tokens, max_blocks, num_blocks, part_tokens, scale); \
    }                                                                                          \
    extern "C" __global__ void mor_paged_decode_combine_##SUFFIX(                              \
        const float* partial, T* out, unsigned int hq, unsigned int dh, unsigned int n_parts) { \
        paged_decode_combine<T>(partial, out, hq, dh, n_parts);                                \
    }

MOR_DECODE_INSTANCES(float, f32)
MOR_DECODE_INSTANCES(mor_bf16, bf16)
