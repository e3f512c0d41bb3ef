// Expert-choice routing of one recursion step (mor-spec section 3.1): router score and
// gate, then per-sequence top-k with sorted ascending output, all on the device.
#include "mor_common.cuh"

// z = (h . w) * inv_temp and g = alpha * act(z), one warp per row.
// h: [n, d], w: [d], out: [n, 2] f32 holding (z, g) per row.
template <typename T>
__device__ void router_score(const T* __restrict__ h, const T* __restrict__ w,
                             float* __restrict__ out, unsigned int n, unsigned int d,
                             float alpha, float inv_temp, int act) {
    const unsigned int warps_per_block = blockDim.x / MOR_WARP;
    const unsigned int lane = threadIdx.x % MOR_WARP;
    const unsigned long long row =
        (unsigned long long)blockIdx.x * warps_per_block + threadIdx.x / MOR_WARP;
    if (row >= n) return;  // whole warps leave together
    const T* hr = h + row * d;
    float acc = 0.0f;
    for (unsigned int c = lane; c < d; c += MOR_WARP) acc += mor_to_f32(hr[c]) * mor_to_f32(w[c]);
    acc = mor_warp_sum(acc);
    if (lane == 0) {
        const float z = acc * inv_temp;
        out[2 * row] = z;
        out[2 * row + 1] = alpha * mor_activate(z, act);
    }
}

// Radix select of the k largest scores of each row, then an ordered compaction, so the
// output lists the chosen positions in ascending order (causal order, mor-spec 3.1).
// One block per row; the block sweeps the row in chunks of blockDim.x elements, so any
// row length works (the launch plan is `TopkPlan` in src/cuda/launch.rs).
//   pass 1..4: 8 bits of the order-preserving key per pass; a 256-bin histogram of the
//              keys that match the prefix found so far picks the next 8 bits of the k-th
//              largest key `kth`;
//   compaction: every key > kth is taken, and of the keys == kth the lowest positions
//              (ties go to the earlier token), by two block-wide prefix counts per chunk.
// scores: [rows, n]; map: [rows, n] or null (absolute positions of the candidates);
// keep: [rows, k] positions within the row; sel: [rows, k] map[keep] (keep when map is null).
template <typename T>
__device__ void topk_sorted(const T* __restrict__ scores, const unsigned int* __restrict__ map,
                            unsigned int* __restrict__ keep, unsigned int* __restrict__ sel,
                            unsigned int n, unsigned int k) {
    __shared__ unsigned int hist[256];
    __shared__ unsigned int warp_counts[32];
    __shared__ unsigned int s_prefix, s_mask, s_remaining, s_eq_seen, s_written;

    const unsigned long long row = blockIdx.x;
    const T* sr = scores + row * n;
    const unsigned int tid = threadIdx.x, lane = tid % MOR_WARP, warp = tid / MOR_WARP;
    const unsigned int n_warps = (blockDim.x + MOR_WARP - 1) / MOR_WARP;
    const unsigned int lower_lanes = (1u << lane) - 1u;

    if (tid == 0) {
        s_prefix = 0u;
        s_mask = 0u;
        s_remaining = k;
        s_eq_seen = 0u;
        s_written = 0u;
    }
    for (int pass = 0; pass < 4; ++pass) {
        const unsigned int shift = 24u - 8u * (unsigned int)pass;
        for (unsigned int b = tid; b < 256u; b += blockDim.x) hist[b] = 0u;
        __syncthreads();
        const unsigned int prefix = s_prefix, mask = s_mask;
        // Every thread runs the same number of iterations, so whole warps stay converged
        // for the warp-aggregated histogram update.
        for (unsigned int base = 0; base < n; base += blockDim.x) {
            const unsigned int i = base + tid;
            unsigned int bin = 256u;  // no bin
            if (i < n) {
                const unsigned int key = mor_float_key(mor_to_f32(sr[i]));
                if ((key & mask) == prefix) bin = (key >> shift) & 255u;
            }
            const unsigned int peers = __match_any_sync(MOR_FULL_MASK, bin);
            if (bin < 256u && lane == (unsigned int)(__ffs(peers) - 1)) {
                atomicAdd(&hist[bin], (unsigned int)__popc(peers));
            }
        }
        __syncthreads();
        if (tid == 0) {
            unsigned int above = 0u, remaining = s_remaining;
            for (int b = 255; b >= 0; --b) {
                const unsigned int c = hist[b];
                if (above + c >= remaining) {
                    s_prefix = prefix | ((unsigned int)b << shift);
                    s_mask = mask | (255u << shift);
                    s_remaining = remaining - above;
                    break;
                }
                above += c;
            }
        }
        __syncthreads();
    }
    const unsigned int kth = s_prefix;          // the k-th largest key
    const unsigned int take_eq = s_remaining;   // how many keys equal to kth are taken

    for (unsigned int base = 0; base < n; base += blockDim.x) {
        const unsigned int i = base + tid;
        unsigned int key = 0u;
        bool valid = i < n;
        if (valid) key = mor_float_key(mor_to_f32(sr[i]));
        // Rank of this element among the keys equal to kth, in position order.
        const bool eq = valid && key == kth;
        const unsigned int eq_ballot = __ballot_sync(MOR_FULL_MASK, eq);
        if (lane == 0) warp_counts[warp] = __popc(eq_ballot);
        __syncthreads();
        unsigned int eq_before = s_eq_seen;
        for (unsigned int w = 0; w < warp; ++w) eq_before += warp_counts[w];
        eq_before += __popc(eq_ballot & lower_lanes);
        const bool take = valid && (key > kth || (eq && eq_before < take_eq));
        __syncthreads();
        if (tid == 0) {
            unsigned int t = 0u;
            for (unsigned int w = 0; w < n_warps; ++w) t += warp_counts[w];
            s_eq_seen += t;
        }
        // Output slot of this element, in position order.
        const unsigned int take_ballot = __ballot_sync(MOR_FULL_MASK, take);
        __syncthreads();
        if (lane == 0) warp_counts[warp] = __popc(take_ballot);
        __syncthreads();
        unsigned int slot = s_written;
        for (unsigned int w = 0; w < warp; ++w) slot += warp_counts[w];
        slot += __popc(take_ballot & lower_lanes);
        if (take && slot < k) {
            keep[row * k + slot] = i;
            sel[row * k + slot] = map ? map[row * n + i] : i;
        }
        __syncthreads();
        if (tid == 0) {
            unsigned int t = 0u;
            for (unsigned int w = 0; w < n_warps; ++w) t += warp_counts[w];
            s_written += t;
        }
        __syncthreads();
    }
}

#define MOR_ROUTER_INSTANCES(T, SUFFIX)                                                        \
    extern "C" __global__ void mor_router_score_##SUFFIX(                                      \
        const T* h, const T* w, float* out, unsigned int n, unsigned int d, float alpha,       \
        float inv_temp, int act) {                                                             \
        router_score<T>(h, w, out, n, d, alpha, inv_temp, act);                                \
    }                                                                                          \
    extern "C" __global__ void mor_topk_sorted_##SUFFIX(const T* scores, const unsigned int* map, \
                                                       unsigned int* keep, unsigned int* sel,  \
                                                       unsigned int n, unsigned int k) {       \
        topk_sorted<T>(scores, map, keep, sel, n, k);                                          \
    }

MOR_ROUTER_INSTANCES(float, f32)
MOR_ROUTER_INSTANCES(mor_bf16, bf16)
