// RMSNorm forward and backward (mor-spec section 1.1: y = x / sqrt(mean(x^2) + eps) * w).
#include "mor_common.cuh"

// One block per row (grid-stride over rows). x, y: [n, d], w: [d].
template <typename T>
__device__ void rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                             unsigned int n, unsigned int d, float eps) {
    __shared__ float scratch[32];
    for (unsigned long long row = blockIdx.x; row < n; row += gridDim.x) {
        const T* xr = x + row * d;
        T* yr = y + row * d;
        float ss = 0.0f;
        for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
            const float v = mor_to_f32(xr[c]);
            ss += v * v;
        }
        ss = mor_block_sum(ss, scratch);
        const float rstd = rsqrtf(ss / (float)d + eps);
        for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
            yr[c] = mor_from_f32<T>(mor_to_f32(xr[c]) * rstd * mor_to_f32(w[c]));
        }
    }
}

// Backward. With r = rstd of the row and gw = g * w:
//   dx = r * gw - x * r^3 * sum(gw * x) / d
//   dw = sum over rows of g * x * r
// dx: [n, d] f32. dw_part: [gridDim.x, d] f32, one partial sum per block over the rows it
// handled (the caller sums the partials). Each thread owns fixed columns, so the partial
// row of a block is updated without atomics.
template <typename T>
__device__ void rms_norm_bwd(const T* __restrict__ x, const T* __restrict__ w,
                             const T* __restrict__ g, float* __restrict__ dx,
                             float* __restrict__ dw_part, unsigned int n, unsigned int d,
                             float eps) {
    __shared__ float scratch[32];
    float* dwp = dw_part + (unsigned long long)blockIdx.x * d;
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) dwp[c] = 0.0f;
    for (unsigned long long row = blockIdx.x; row < n; row += gridDim.x) {
        const T* xr = x + row * d;
        const T* gr = g + row * d;
        float ss = 0.0f, dot = 0.0f;
        for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
            const float xv = mor_to_f32(xr[c]);
            ss += xv * xv;
            dot += mor_to_f32(gr[c]) * mor_to_f32(w[c]) * xv;
        }
        ss = mor_block_sum(ss, scratch);
        dot = mor_block_sum(dot, scratch);
        const float r = rsqrtf(ss / (float)d + eps);
        const float coef = r * r * r * dot / (float)d;
        float* dxr = dx + row * d;
        for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
            const float xv = mor_to_f32(xr[c]), gv = mor_to_f32(gr[c]);
            dxr[c] = r * gv * mor_to_f32(w[c]) - xv * coef;
            dwp[c] += gv * xv * r;
        }
    }
}

#define MOR_RMS_NORM_INSTANCES(T, SUFFIX)                                                      \
    extern "C" __global__ void mor_rms_norm_fwd_##SUFFIX(const T* x, const T* w, T* y,         \
                                                        unsigned int n, unsigned int d,        \
                                                        float eps) {                           \
        rms_norm_fwd<T>(x, w, y, n, d, eps);                                                   \
    }                                                                                          \
    extern "C" __global__ void mor_rms_norm_bwd_##SUFFIX(const T* x, const T* w, const T* g,   \
                                                        float* dx, float* dw_part,             \
                                                        unsigned int n, unsigned int d,        \
                                                        float eps) {                           \
        rms_norm_bwd<T>(x, w, g, dx, dw_part, n, d, eps);                                      \
    }

MOR_RMS_NORM_INSTANCES(float, f32)
MOR_RMS_NORM_INSTANCES(mor_bf16, bf16)
