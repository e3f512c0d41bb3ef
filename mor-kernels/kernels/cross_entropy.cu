// The language-model head's cross-entropy in vocabulary chunks: the small kernels between
// the chunk products (which run as cuBLAS matmuls). For a chunk of `cols` vocabulary
// columns starting at column `col0`, with logits [n, cols] (T: f32 or bf16):
//   - mor_ce_chunk_stats: per row, the chunk's max logit, the sum of exp(logit - max) and
//     the target's logit when the target falls in the chunk (else 0): stats [n, 3] f32.
//     The host side merges the chunks' statistics into each row's log-sum-exp.
//   - mor_ce_chunk_grad: dlogits = (softmax - onehot(target)) * g, with the row's
//     log-sum-exp `lse` [n] f32 and the upstream gradient of the mean loss already divided
//     by n in gscale[0] (read on the device, no host round trip).
// A target outside the vocabulary contributes no logit and no onehot term (the CPU body
// reports it as an error). All arithmetic is f32.
#include "mor_common.cuh"

// One warp per row (launch::warp_per_row).
template <typename T>
__device__ void ce_chunk_stats(const T* __restrict__ logits, const unsigned int* __restrict__ targets,
                               float* __restrict__ stats, unsigned int n, unsigned int cols,
                               unsigned int col0) {
    const unsigned int lane = threadIdx.x % MOR_WARP;
    const unsigned long long row =
        (unsigned long long)blockIdx.x * (blockDim.x / MOR_WARP) + threadIdx.x / MOR_WARP;
    if (row >= n) return;  // the same for the whole warp
    const T* x = logits + row * cols;
    float m = MOR_NEG_INF, s = 0.0f;
    for (unsigned int c = lane; c < cols; c += MOR_WARP) {
        const float v = mor_to_f32(x[c]);
        if (v == MOR_NEG_INF) continue;
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    const float mx = mor_warp_max(m);
    s = (m == MOR_NEG_INF) ? 0.0f : s * expf(m - mx);
    const float total = mor_warp_sum(s);
    if (lane == 0) {
        const unsigned int t = targets[row];
        const float tl = (t >= col0 && t - col0 < cols) ? mor_to_f32(x[t - col0]) : 0.0f;
        stats[row * 3] = mx;
        stats[row * 3 + 1] = total;
        stats[row * 3 + 2] = tl;
    }
}

// Grid-stride over the n * cols elements (launch::elementwise).
template <typename T>
__device__ void ce_chunk_grad(const T* __restrict__ logits, const unsigned int* __restrict__ targets,
                              const float* __restrict__ lse, const float* __restrict__ gscale,
                              T* __restrict__ dlogits, unsigned int n, unsigned int cols,
                              unsigned int col0) {
    const float g = gscale[0];
    const unsigned long long total = (unsigned long long)n * cols;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long row = i / cols;
        const unsigned int c = (unsigned int)(i % cols);
        float p = expf(mor_to_f32(logits[i]) - lse[row]);
        if (targets[row] == col0 + c) p -= 1.0f;
        dlogits[i] = mor_from_f32<T>(p * g);
    }
}

#define MOR_CE_INSTANCES(T, SUFFIX)                                                            \
    extern "C" __global__ void mor_ce_chunk_stats_##SUFFIX(                                    \
        const T* logits, const unsigned int* targets, float* stats, unsigned int n,            \
        unsigned int cols, unsigned int col0) {                                                \
        ce_chunk_stats<T>(logits, targets, stats, n, cols, col0);                              \
    }                                                                                          \
    extern "C" __global__ void mor_ce_chunk_grad_##SUFFIX(                                     \
        const T* logits, const unsigned int* targets, const float* lse, const float* gscale,   \
        T* dlogits, unsigned int n, unsigned int cols, unsigned int col0) {                    \
        ce_chunk_grad<T>(logits, targets, lse, gscale, dlogits, n, cols, col0);                \
    }

MOR_CE_INSTANCES(float, f32)
MOR_CE_INSTANCES(mor_bf16, bf16)
