// Fused AdamW step of one parameter tensor (mor-spec section 1.3), the arithmetic of the
// host update in mor-models/src/optim.rs (`adamw_host`) operation for operation: the
// values are read as f32, every step runs in f64 with explicitly rounded intrinsics (no
// fused multiply-add contraction, so each product and sum rounds as on the host), and each
// result is rounded once to f32. For f32 tensors the results equal the host update bit for
// bit.
//
//   m' = b1 m + (1 - b1) g
//   v' = b2 v + ((1 - b2) g) g
//   w' = w (1 - decay) - (lr (m' / bc1)) / (sqrt(v' / bc2) + eps)
//
// Inputs w, g, m, v: [n] (T: f32 or bf16). Output out: [3, n], the rows w', m', v'. The
// host passes 1 - b1, 1 - b2 and 1 - decay already computed in f64, as it does.
#include "mor_common.cuh"

template <typename T>
__device__ void adamw_step(const T* __restrict__ w, const T* __restrict__ g,
                           const T* __restrict__ m, const T* __restrict__ v, T* __restrict__ out,
                           unsigned long long n, double b1, double omb1, double b2, double omb2,
                           double bc1, double bc2, double lr, double eps, double keep) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const double gi = (double)mor_to_f32(g[i]);
        const double mi = __dadd_rn(__dmul_rn(b1, (double)mor_to_f32(m[i])), __dmul_rn(omb1, gi));
        const double vi =
            __dadd_rn(__dmul_rn(b2, (double)mor_to_f32(v[i])), __dmul_rn(__dmul_rn(omb2, gi), gi));
        const double denom = __dadd_rn(__dsqrt_rn(__ddiv_rn(vi, bc2)), eps);
        const double upd = __ddiv_rn(__dmul_rn(lr, __ddiv_rn(mi, bc1)), denom);
        const double wi = __dsub_rn(__dmul_rn((double)mor_to_f32(w[i]), keep), upd);
        out[i] = mor_from_f32<T>(__double2float_rn(wi));
        out[n + i] = mor_from_f32<T>(__double2float_rn(mi));
        out[2 * n + i] = mor_from_f32<T>(__double2float_rn(vi));
    }
}

#define MOR_ADAMW_INSTANCES(T, SUFFIX)                                                         \
    extern "C" __global__ void mor_adamw_step_##SUFFIX(                                        \
        const T* w, const T* g, const T* m, const T* v, T* out, unsigned long long n,          \
        double b1, double omb1, double b2, double omb2, double bc1, double bc2, double lr,     \
        double eps, double keep) {                                                             \
        adamw_step<T>(w, g, m, v, out, n, b1, omb1, b2, omb2, bc1, bc2, lr, eps, keep);        \
    }

MOR_ADAMW_INSTANCES(float, f32)
MOR_ADAMW_INSTANCES(mor_bf16, bf16)
