// SwiGLU gate of the MLP (mor-spec section 1.1): y = silu(gate) * up, forward and backward.
#include "mor_common.cuh"

// Grid-stride over n elements.
template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ gate, const T* __restrict__ up,
                           T* __restrict__ y, unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const float a = mor_to_f32(gate[i]);
        y[i] = mor_from_f32<T>(a * mor_sigmoid(a) * mor_to_f32(up[i]));
    }
}

// With s = sigmoid(a):  d gate = dy * up * s * (1 + a * (1 - s)),  d up = dy * a * s.
// out: [2, n], the gate gradient first.
template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ gate, const T* __restrict__ up,
                           const T* __restrict__ dy, T* __restrict__ out, unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const float a = mor_to_f32(gate[i]), u = mor_to_f32(up[i]), g = mor_to_f32(dy[i]);
        const float s = mor_sigmoid(a);
        out[i] = mor_from_f32<T>(g * u * s * (1.0f + a * (1.0f - s)));
        out[n + i] = mor_from_f32<T>(g * a * s);
    }
}

#define MOR_SWIGLU_INSTANCES(T, SUFFIX)                                                        \
    extern "C" __global__ void mor_swiglu_fwd_##SUFFIX(const T* gate, const T* up, T* y,       \
                                                      unsigned long long n) {                  \
        swiglu_fwd<T>(gate, up, y, n);                                                         \
    }                                                                                          \
    extern "C" __global__ void mor_swiglu_bwd_##SUFFIX(const T* gate, const T* up, const T* dy, \
                                                      T* out, unsigned long long n) {          \
        swiglu_bwd<T>(gate, up, dy, out, n);                                                   \
    }

MOR_SWIGLU_INSTANCES(float, f32)
MOR_SWIGLU_INSTANCES(mor_bf16, bf16)
