// Token routing of a recursion step (mor-spec section 3.1): gather the selected rows of the
// hidden state, and the weighted scatter-add `h[sel] += g * y` back into it, with backward.
// Indices are u32 positions within a row; an index >= l reads zeros and writes nothing.
#include "mor_common.cuh"

// out[b, i, :] = h[b, idx[b, i], :].  h: [b, l, d], idx: [b, k], out: [b, k, d].
// Blocks stride over the b * k output rows, threads over the columns of a row.
template <typename T>
__device__ void gather_rows(const T* __restrict__ h, const unsigned int* __restrict__ idx,
                            T* __restrict__ out, unsigned int b, unsigned int l, unsigned int k,
                            unsigned int d) {
    const unsigned long long rows = (unsigned long long)b * k;
    for (unsigned long long bi = blockIdx.x; bi < rows; bi += gridDim.x) {
        const unsigned long long bb = bi / k;
        const unsigned int src = idx[bi];
        T* o = out + bi * d;
        if (src < l) {
            const T* s = h + (bb * l + src) * d;
            for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) o[c] = s[c];
        } else {
            for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) o[c] = mor_from_f32<T>(0.0f);
        }
    }
}

// out[b, idx[b, i], :] += w[b, i] * y[b, i, :] (w = 1 when null), in place on `out`, which
// holds the base (a copy of h, or zeros for the backward of a gather). With `atomic` = 0
// the indices of a row must be distinct (the routing contract): each element is then read,
// summed in f32 and rounded once. With `atomic` = 1 repeated indices accumulate.
// Blocks stride over the b * k selected rows, threads over the columns.
template <typename T>
__device__ void index_add_rows(T* __restrict__ out, const unsigned int* __restrict__ idx,
                               const T* __restrict__ y, const T* __restrict__ w, unsigned int b,
                               unsigned int l, unsigned int k, unsigned int d, int atomic) {
    const unsigned long long rows = (unsigned long long)b * k;
    for (unsigned long long bi = blockIdx.x; bi < rows; bi += gridDim.x) {
        const unsigned int dst = idx[bi];
        if (dst >= l) continue;  // the same for the whole block
        const unsigned long long bb = bi / k;
        const float wv = w ? mor_to_f32(w[bi]) : 1.0f;
        const T* yr = y + bi * d;
        T* o = out + (bb * l + dst) * d;
        for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
            const float v = wv * mor_to_f32(yr[c]);
            if (atomic) {
                mor_atomic_add(o + c, v);
            } else {
                o[c] = mor_from_f32<T>(mor_to_f32(o[c]) + v);
            }
        }
    }
}

// Backward of the weighted scatter-add, one warp per selected row (b, i):
//   dy[b, i, :] = w[b, i] * dout[b, idx[b, i], :]
//   dw[b, i]    = sum_c dout[b, idx[b, i], c] * y[b, i, c]
// (dh = dout is the identity and needs no kernel). out: [b * k, d + 1], dy then dw.
template <typename T>
__device__ void scatter_add_bwd(const T* __restrict__ dout, const unsigned int* __restrict__ idx,
                                const T* __restrict__ y, const T* __restrict__ w,
                                T* __restrict__ out, unsigned int b, unsigned int l, unsigned int k,
                                unsigned int d) {
    const unsigned int warps_per_block = blockDim.x / MOR_WARP;
    const unsigned int lane = threadIdx.x % MOR_WARP;
    const unsigned long long bi =
        (unsigned long long)blockIdx.x * warps_per_block + threadIdx.x / MOR_WARP;
    if (bi >= (unsigned long long)b * k) return;
    const unsigned long long bb = bi / k;
    const unsigned int src = idx[bi];
    const float wv = mor_to_f32(w[bi]);
    const T* yr = y + bi * d;
    T* o = out + bi * (d + 1);
    float acc = 0.0f;
    for (unsigned int c = lane; c < d; c += MOR_WARP) {
        const float gv = src < l ? mor_to_f32(dout[(bb * l + src) * d + c]) : 0.0f;
        o[c] = mor_from_f32<T>(wv * gv);
        acc += gv * mor_to_f32(yr[c]);
    }
    acc = mor_warp_sum(acc);
    if (lane == 0) o[d] = mor_from_f32<T>(acc);
}

#define MOR_TOKENS_INSTANCES(T, SUFFIX)                                                        \
    extern "C" __global__ void mor_gather_rows_##SUFFIX(const T* h, const unsigned int* idx,    \
                                                       T* out, unsigned int b, unsigned int l,  \
                                                       unsigned int k, unsigned int d) {        \
        gather_rows<T>(h, idx, out, b, l, k, d);                                               \
    }                                                                                          \
    extern "C" __global__ void mor_index_add_rows_##SUFFIX(                                    \
        T* out, const unsigned int* idx, const T* y, const T* w, unsigned int b, unsigned int l, \
        unsigned int k, unsigned int d, int atomic) {                                          \
        index_add_rows<T>(out, idx, y, w, b, l, k, d, atomic);                                 \
    }                                                                                          \
    extern "C" __global__ void mor_scatter_add_bwd_##SUFFIX(                                   \
        const T* dout, const unsigned int* idx, const T* y, const T* w, T* out, unsigned int b, \
        unsigned int l, unsigned int k, unsigned int d) {                                      \
        scatter_add_bwd<T>(dout, idx, y, w, out, b, l, k, d);                                  \
    }

MOR_TOKENS_INSTANCES(float, f32)
MOR_TOKENS_INSTANCES(mor_bf16, bf16)
