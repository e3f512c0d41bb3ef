// Rotary embedding at original positions (mor-spec sections 1.1 and 3.1): HF "rotate_half"
// (non-interleaved) form, cos/sin rows gathered by each token's absolute position.
// With half = dh / 2, x1 = x[..half], x2 = x[half..], c = cos[pos], s = sign * sin[pos]:
//   out1 = x1 * c - x2 * s,   out2 = x2 * c + x1 * s.
// sign = -1 is the inverse rotation, which is the backward.
#include "mor_common.cuh"

template <typename T>
__device__ __forceinline__ void rotate_pair(float x1, float x2, float c, float s, T* o1, T* o2) {
    *o1 = mor_from_f32<T>(x1 * c - x2 * s);
    *o2 = mor_from_f32<T>(x2 * c + x1 * s);
}

// x, out: [b, h, t, dh], pos: [b, t], cos/sin: [max_pos, dh / 2]. Rows whose position is
// MOR_PAD_POS (or out of the table) are copied unchanged.
template <typename T>
__device__ void rope_at(const T* __restrict__ x, const unsigned int* __restrict__ pos,
                        const T* __restrict__ cos, const T* __restrict__ sin, T* __restrict__ out,
                        unsigned int b, unsigned int h, unsigned int t, unsigned int dh,
                        unsigned int max_pos, float sign) {
    const unsigned int half = dh / 2;
    const unsigned long long total = (unsigned long long)b * h * t * half;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += stride) {
        const unsigned int j = (unsigned int)(e % half);
        const unsigned long long row = e / half;  // over (b, h, t)
        const unsigned long long bb = row / ((unsigned long long)h * t);
        const unsigned int tt = (unsigned int)(row % t);
        const unsigned int p = pos[bb * t + tt];
        const unsigned long long o = row * dh + j;
        if (p >= max_pos) {
            out[o] = x[o];
            out[o + half] = x[o + half];
            continue;
        }
        const float c = mor_to_f32(cos[(unsigned long long)p * half + j]);
        const float s = sign * mor_to_f32(sin[(unsigned long long)p * half + j]);
        rotate_pair<T>(mor_to_f32(x[o]), mor_to_f32(x[o + half]), c, s, out + o, out + o + half);
    }
}

// Fused gather + RoPE: out[b, :, i, :] = rope(x[b, :, idx[b, i], :], position idx[b, i]).
// x: [b, h, l, dh], idx: [b, t], out: [b, h, t, dh]. An index >= l (MOR_PAD_POS included)
// gives a zero row.
template <typename T>
__device__ void gather_rope_fwd(const T* __restrict__ x, const unsigned int* __restrict__ idx,
                                const T* __restrict__ cos, const T* __restrict__ sin,
                                T* __restrict__ out, unsigned int b, unsigned int h,
                                unsigned int l, unsigned int t, unsigned int dh,
                                unsigned int max_pos) {
    const unsigned int half = dh / 2;
    const unsigned long long total = (unsigned long long)b * h * t * half;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += stride) {
        const unsigned int j = (unsigned int)(e % half);
        const unsigned long long row = e / half;  // over (b, h, t)
        const unsigned long long bh = row / t;
        const unsigned long long bb = bh / h;
        const unsigned int src = idx[bb * t + (row % t)];
        const unsigned long long o = row * dh + j;
        if (src >= l || src >= max_pos) {
            out[o] = mor_from_f32<T>(0.0f);
            out[o + half] = mor_from_f32<T>(0.0f);
            continue;
        }
        const unsigned long long xi = (bh * l + src) * dh + j;
        const float c = mor_to_f32(cos[(unsigned long long)src * half + j]);
        const float s = mor_to_f32(sin[(unsigned long long)src * half + j]);
        rotate_pair<T>(mor_to_f32(x[xi]), mor_to_f32(x[xi + half]), c, s, out + o, out + o + half);
    }
}

// Backward of the fused gather + RoPE: dx[b, :, idx[b, i], :] += rope^-1(dout[b, :, i, :]).
// dx: [b, h, l, dh], zeroed by the caller; repeated indices accumulate (atomics).
template <typename T>
__device__ void gather_rope_bwd(const T* __restrict__ dout, const unsigned int* __restrict__ idx,
                                const T* __restrict__ cos, const T* __restrict__ sin,
                                T* __restrict__ dx, unsigned int b, unsigned int h,
                                unsigned int l, unsigned int t, unsigned int dh,
                                unsigned int max_pos) {
    const unsigned int half = dh / 2;
    const unsigned long long total = (unsigned long long)b * h * t * half;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += stride) {
        const unsigned int j = (unsigned int)(e % half);
        const unsigned long long row = e / half;
        const unsigned long long bh = row / t;
        const unsigned long long bb = bh / h;
        const unsigned int src = idx[bb * t + (row % t)];
        if (src >= l || src >= max_pos) continue;
        const unsigned long long o = row * dh + j;
        const unsigned long long xi = (bh * l + src) * dh + j;
        const float c = mor_to_f32(cos[(unsigned long long)src * half + j]);
        const float s = mor_to_f32(sin[(unsigned long long)src * half + j]);
        const float g1 = mor_to_f32(dout[o]), g2 = mor_to_f32(dout[o + half]);
        mor_atomic_add(dx + xi, g1 * c + g2 * s);
        mor_atomic_add(dx + xi + half, g2 * c - g1 * s);
    }
}

#define MOR_ROPE_INSTANCES(T, SUFFIX)                                                          \
    extern "C" __global__ void mor_rope_at_##SUFFIX(                                           \
        const T* x, const unsigned int* pos, const T* cos, const T* sin, T* out, unsigned int b, \
        unsigned int h, unsigned int t, unsigned int dh, unsigned int max_pos, float sign) {    \
        rope_at<T>(x, pos, cos, sin, out, b, h, t, dh, max_pos, sign);                         \
    }                                                                                          \
    extern "C" __global__ void mor_gather_rope_fwd_##SUFFIX(                                   \
        const T* x, const unsigned int* idx, const T* cos, const T* sin, T* out, unsigned int b, \
        unsigned int h, unsigned int l, unsigned int t, unsigned int dh, unsigned int max_pos) { \
        gather_rope_fwd<T>(x, idx, cos, sin, out, b, h, l, t, dh, max_pos);                    \
    }                                                                                          \
    extern "C" __global__ void mor_gather_rope_bwd_##SUFFIX(                                   \
        const T* dout, const unsigned int* idx, const T* cos, const T* sin, T* dx,             \
        unsigned int b, unsigned int h, unsigned int l, unsigned int t, unsigned int dh,        \
        unsigned int max_pos) {                                                                \
        gather_rope_bwd<T>(dout, idx, cos, sin, dx, b, h, l, t, dh, max_pos);                  \
    }

MOR_ROPE_INSTANCES(float, f32)
MOR_ROPE_INSTANCES(mor_bf16, bf16)
