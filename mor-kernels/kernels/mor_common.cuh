// Shared device functions of the mor kernels.
//
// The kernels include no system or toolkit header, so the same text compiles with nvcc at
// build time and with NVRTC at run time (no include paths needed). bf16 is handled as its
// raw 16-bit pattern: the upper half of an IEEE f32, converted with round-to-nearest-even.
// All arithmetic runs in f32; each output is rounded once.
#pragma once

typedef unsigned short mor_bf16;

#define MOR_PAD_POS 0xffffffffu
#define MOR_WARP 32
#define MOR_FULL_MASK 0xffffffffu
#define MOR_NEG_INF __int_as_float(0xff800000)

// ---------------------------------------------------------------------------------------
// Element conversion.

__device__ __forceinline__ float mor_to_f32(float x) { return x; }
__device__ __forceinline__ float mor_to_f32(mor_bf16 x) {
    return __uint_as_float(((unsigned int)x) << 16);
}

template <typename T> __device__ __forceinline__ T mor_from_f32(float x);
template <> __device__ __forceinline__ float mor_from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ mor_bf16 mor_from_f32<mor_bf16>(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (mor_bf16)0x7fc0u;  // a quiet NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return (mor_bf16)(u >> 16);
}

// Atomic add of an f32 value into an element. f32 uses the hardware instruction; bf16
// uses a compare-and-swap loop on the aligned 32-bit word holding the element, so it
// works on every architecture.
__device__ __forceinline__ void mor_atomic_add(float* addr, float v) { atomicAdd(addr, v); }
__device__ __forceinline__ void mor_atomic_add(mor_bf16* addr, float v) {
    unsigned long long a = (unsigned long long)addr;
    unsigned int* word = (unsigned int*)(a & ~3ull);
    const bool high = (a & 2ull) != 0ull;
    unsigned int old = *word, assumed;
    do {
        assumed = old;
        unsigned short cur = high ? (unsigned short)(assumed >> 16) : (unsigned short)(assumed & 0xffffu);
        unsigned short nxt = mor_from_f32<mor_bf16>(mor_to_f32((mor_bf16)cur) + v);
        unsigned int repl = high ? ((assumed & 0x0000ffffu) | ((unsigned int)nxt << 16))
                                 : ((assumed & 0xffff0000u) | (unsigned int)nxt);
        old = atomicCAS(word, assumed, repl);
    } while (old != assumed);
}

// ---------------------------------------------------------------------------------------
// Reductions. Every thread of the block must call the block-wide ones.

__device__ __forceinline__ float mor_warp_sum(float v) {
#pragma unroll
    for (int o = MOR_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(MOR_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float mor_warp_max(float v) {
#pragma unroll
    for (int o = MOR_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(MOR_FULL_MASK, v, o));
    return v;
}

// Sum over the block; `scratch` holds at least 32 floats. Returns the total to every thread.
__device__ __forceinline__ float mor_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % MOR_WARP, warp = threadIdx.x / MOR_WARP;
    const int n_warps = (blockDim.x + MOR_WARP - 1) / MOR_WARP;
    v = mor_warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = (threadIdx.x < n_warps) ? scratch[threadIdx.x] : 0.0f;
    if (warp == 0) t = mor_warp_sum(t);
    if (threadIdx.x == 0) scratch[0] = t;
    __syncthreads();
    return scratch[0];
}

// ---------------------------------------------------------------------------------------
// Router activations (mor-spec section 3.1): 0 = sigmoid, 1 = tanh, 2 = none (raw logits).

#define MOR_ACT_SIGMOID 0
#define MOR_ACT_TANH 1
#define MOR_ACT_NONE 2

__device__ __forceinline__ float mor_sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

__device__ __forceinline__ float mor_activate(float z, int act) {
    if (act == MOR_ACT_SIGMOID) return mor_sigmoid(z);
    if (act == MOR_ACT_TANH) return tanhf(z);
    return z;
}

// Order-preserving map from f32 to u32: a > b as floats iff key(a) > key(b) as integers.
// NaN maps to 0, below every number, so it is chosen last.
__device__ __forceinline__ unsigned int mor_float_key(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
