// Backward of the fused linear cross-entropy, one vocabulary chunk at a time.
//
// For a chunk of Vc vocabulary rows [v0, v0 + Vc) the launcher runs three kernels:
//   1. lce_grad_logits: recompute y = softcap(E @ C[v0:]^T + bias) tile by tile and write the
//      logit gradient  G = (coef_p * exp(y - lse) - coef_q * smoothed_onehot) * softcap'(y)
//      into a chunk buffer of N x Vc (never N x V), in the input type T.
//      With filtering on, a 128 x 128 tile whose |softmax - onehot| < filter_eps everywhere (and,
//      in rows with a z-loss / grad_lse term, softmax < filter_eps too) is not written; its flag
//      stays 0 and the two GEMMs below skip it.
//   2. lce_gemm (dC):  dC[v0:v0+Vc] (+)= G^T @ E         (A = G^T is M-major, B = E is N-major)
//   3. lce_gemm (dE):  dE (+)= G @ C[v0:v0+Vc]           (A = G is K-major,  B = C is N-major)
// (cuBLAS runs the two GEMMs instead where it may: unfiltered, outside CUDA-graph capture.)
// Every gradient element is produced by one block in a fixed order: no atomics, bitwise
// deterministic run to run.
#include "common.cuh"

// lce_grad_logits<T, HAS_BIAS, SOFTCAP, FILTER, TI>
//   E: (N, D), C: (V, D) row-major, bias: (V,) or null, of T; lse, coef_p, coef_q: (N,) fp32;
//   targets: (N,) TI. G: (N, ldg) row-major of T, chunk columns j = v - v0 for v in [v0, v0 + Vc).
//   flags: (ceil(N/128), ceil(Vc/128)) int32, row-major; written only with FILTER (1 = live tile).
//   Grid: (ceil(N / 128), ceil(Vc / 128)). Block: CCE_THREADS (256). Dynamic smem: CCE_SMEM_BYTES.
template <typename T, bool HAS_BIAS, bool SOFTCAP, bool FILTER, typename TI, bool ALIGNED>
__device__ void grad_logits_impl(const T* __restrict__ e, const T* __restrict__ c, const T* __restrict__ bias,
                                 const TI* __restrict__ targets, const float* __restrict__ lse,
                                 const float* __restrict__ coef_p, const float* __restrict__ coef_q,
                                 T* __restrict__ G, int* __restrict__ flags, int N, int V, int D, int v0,
                                 int Vc, i64 ldg, float softcap, float smoothing, float filter_eps) {
    extern __shared__ __align__(16) char smem[];
    float* epi = reinterpret_cast<float*>(smem);
    __shared__ int tile_live;
    const int m0 = blockIdx.x * CCE_BM, n0 = blockIdx.y * CCE_BN;  // n0 is relative to v0
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) tile_live = 0;

    GemmArgs<T> g{e, c + (i64)v0 * D, (i64)D, (i64)D, N, Vc, D};
    gemm_tile<T, true, true, ALIGNED>(g, m0, n0, smem, epi, NoSkip{});  // ends with a barrier

    const float smooth_q = smoothing / (float)V;
    const int col = n0 + lane * 4;  // chunk-relative column of this lane's first element
    float b[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) b[q] = (HAS_BIAS && col + q < Vc) ? to_f32(bias[v0 + col + q]) : 0.f;
    bool live = false;
    // In place: the gradient replaces the logit in the epilogue tile, then is stored below.
#pragma unroll 4
    for (int r = 0; r < 16; ++r) {
        const int lr = warp * 16 + r, row = m0 + lr;
        float* zp = &epi[lr * CCE_EPI_LD + lane * 4];
        const float4 z4 = *reinterpret_cast<const float4*>(zp);
        float z[4] = {z4.x, z4.y, z4.z, z4.w};
        float out[4] = {0.f, 0.f, 0.f, 0.f};
        if (row < N) {
            const float l = lse[row], cp = coef_p[row], cq = coef_q[row];
            const long long t = (long long)targets[row] - v0;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float zq = z[q] + b[q], y = apply_softcap<SOFTCAP>(zq, softcap);
                const float p = __expf(y - l);
                const bool is_t = (t == (long long)(col + q));
                // g = cq (p - onehot) + (cp - cq) p: with a z-loss / grad_lse term (cp != cq) the
                // target (p ~ 1) is not negligible either.
                if (FILTER)
                    live |= (fabsf(p - (is_t ? 1.f : 0.f)) >= filter_eps || (cp != cq && p >= filter_eps)) &&
                            (cp != 0.f || cq != 0.f);
                float gq = cp * p - cq * ((is_t ? 1.f - smoothing : 0.f) + smooth_q);
                if (SOFTCAP) gq *= softcap_grad(zq, softcap);
                out[q] = (col + q < Vc) ? gq : 0.f;
            }
        }
        *reinterpret_cast<float4*>(zp) = make_float4(out[0], out[1], out[2], out[3]);
    }
    if (FILTER) {
        if (__any_sync(0xffffffffu, live) && lane == 0) tile_live = 1;
    }
    __syncthreads();  // tile_live and the gradient tile are complete
    if (FILTER) {
        if (threadIdx.x == 0) flags[(i64)blockIdx.x * gridDim.y + blockIdx.y] = tile_live;
        if (!tile_live) return;  // the GEMMs skip this tile: nothing to store
    }
    // Store: each thread writes 8 consecutive columns of a row.
    for (int idx = threadIdx.x; idx < CCE_BM * CCE_BN / 8; idx += CCE_THREADS) {
        const int lr = idx / (CCE_BN / 8), lc = (idx % (CCE_BN / 8)) * 8;
        const int row = m0 + lr;
        if (row >= N) continue;
        T* dst = G + (i64)row * ldg + n0 + lc;
#pragma unroll
        for (int q = 0; q < 8; ++q)
            if (n0 + lc + q < (int)ldg) dst[q] = from_f32<T>(epi[lr * CCE_EPI_LD + lc + q]);
    }
}

template <typename T, bool HAS_BIAS, bool SOFTCAP, bool FILTER, typename TI>
__global__ void __launch_bounds__(CCE_THREADS, 2)
    lce_grad_logits(const T* __restrict__ e, const T* __restrict__ c, const T* __restrict__ bias,
                    const TI* __restrict__ targets, const float* __restrict__ lse,
                    const float* __restrict__ coef_p, const float* __restrict__ coef_q, T* __restrict__ G,
                    int* __restrict__ flags, int N, int V, int D, int v0, int Vc, long long ldg,
                    float softcap, float smoothing, float filter_eps, int aligned, const int* __restrict__ run_if) {
    if (not_requested(run_if)) return;
    if (aligned)
        grad_logits_impl<T, HAS_BIAS, SOFTCAP, FILTER, TI, true>(e, c, bias, targets, lse, coef_p, coef_q, G, flags,
                                                                 N, V, D, v0, Vc, ldg, softcap, smoothing, filter_eps);
    else
        grad_logits_impl<T, HAS_BIAS, SOFTCAP, FILTER, TI, false>(e, c, bias, targets, lse, coef_p, coef_q, G, flags,
                                                                  N, V, D, v0, Vc, ldg, softcap, smoothing, filter_eps);
}

// lce_gemm<T, OUT, A_KMAJOR, MODE>
//   out (M x N, row-major of OUT, ld = ldo) gets acc = A @ B, where A (M x K) of T is K-major
//   (A_KMAJOR: dE's G) or M-major (dC's G^T) and B (K x N) of T is N-major (row-major: E or the C
//   chunk), layouts as in common.cuh. MODE (enum class GemmMode of the generated preamble):
//     WRITE:      out = acc.
//     ACCUMULATE: out += acc: read out, add in fp32, write it back in OUT (dC over row parts, in
//                 dC's own type; dE over chunks, always fp32: dE itself or its fp32 accumulator).
//     FOLD_CAST:  out = cast(acc_f32 + acc): a 16-bit dE's last chunk folds its fp32 accumulator
//                 acc_f32 (M x N, ld = ldo) and casts.
//   flags (optional): live-tile flags of the G chunk, (ceil(rowsG/128), ceil(colsG/128)) with row
//   stride flag_ld. k_of_g (enum class GemmK) says which of G's dimensions K runs along:
//     G_COLUMNS (dE: A = G, K = chunk columns): K-block kt lies in flag column (kt*BK)/128 of flag
//               row blockIdx.x;
//     G_ROWS (dC: A = G^T, K = rows of G): in flag row (kt*BK)/128, flag column blockIdx.x.
//   Grid: (ceil(M / 128), ceil(N / 128)). Block: CCE_THREADS (256). Dynamic smem: CCE_SMEM_BYTES.
//   The block first gathers its line of flags into a shared bitmask with coalesced loads, so that
//   walking the live K-blocks costs no dependent global loads (flags past the mask's capacity,
//   only at tiny N, are read from global memory).
#define CCE_FLAG_WORDS 64  // bitmask capacity: 2048 flags = 262144 chunk columns or G rows

struct FlagSkip {
    const int* flags;
    const unsigned* bits;  // shared: bit kb = flag of K-block group kb (one flag tile, 128 wide)
    i64 flag_ld;
    int fixed;
    GemmK k_of_g;
    __device__ __forceinline__ int flag(int kb) const {
        return k_of_g == GemmK::G_COLUMNS ? flags[(i64)fixed * flag_ld + kb] : flags[(i64)kb * flag_ld + fixed];
    }
    __device__ __forceinline__ bool operator()(int kt) const {
        const int kb = (kt * CCE_BK) / CCE_BN;  // flag tiles are CCE_BM x CCE_BN, both 128
        return kb < CCE_FLAG_WORDS * 32 ? ((bits[kb >> 5] >> (kb & 31)) & 1u) == 0 : flag(kb) == 0;
    }
};

// Fills bits[] with the flags of K-block groups [0, min(nkb, capacity)); ends with a barrier.
// Returns (on every thread) whether any K-block group may be live.
__device__ __forceinline__ bool gather_flags(const FlagSkip& fs, unsigned* bits, int nkb) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int limit = min(nkb, CCE_FLAG_WORDS * 32);
    bool any = nkb > limit;  // flags past the mask are not looked at here: assume live
    for (int base = warp * 32; base < limit; base += CCE_THREADS) {
        const int kb = base + lane;
        const unsigned live = __ballot_sync(0xffffffffu, kb < limit && fs.flag(kb) != 0);
        if (lane == 0) bits[base >> 5] = live;
        any |= live != 0;
    }
    return __syncthreads_or(any);  // also: the mask is complete before any thread walks it
}

template <typename T, typename OUT, bool A_KMAJOR, GemmMode MODE, bool ALIGNED>
__device__ void gemm_impl(const T* __restrict__ a, const T* __restrict__ b, OUT* __restrict__ out,
                          const float* __restrict__ acc_f32, const int* __restrict__ flags, long long flag_ld,
                          GemmK k_of_g, int M, int N, int K, long long lda, long long ldb, long long ldo) {
    extern __shared__ __align__(16) char smem[];
    float* epi = reinterpret_cast<float*>(smem);
    const int m0 = blockIdx.x * CCE_BM, n0 = blockIdx.y * CCE_BN;
    GemmArgs<T> g{a, b, lda, ldb, M, N, K};
    if (flags != nullptr) {
        __shared__ unsigned live_bits[CCE_FLAG_WORDS];
        const FlagSkip fs{flags, live_bits, flag_ld, (int)blockIdx.x, k_of_g};
        const int k_groups = (K + CCE_BN - 1) / CCE_BN;
        if (!gather_flags(fs, live_bits, k_groups) && MODE == GemmMode::ACCUMULATE) return;  // adds nothing
        gemm_tile<T, A_KMAJOR, false, ALIGNED>(g, m0, n0, smem, epi, fs);
    } else
        gemm_tile<T, A_KMAJOR, false, ALIGNED>(g, m0, n0, smem, epi, NoSkip{});
    // Epilogue: each thread owns runs of 8 columns, EPI_BATCH runs at a time whose earlier values
    // (ACCUMULATE: out, FOLD_CAST: acc_f32) are all loaded before any is stored, so the loads of a
    // batch overlap instead of paying one memory latency each. 16-byte accesses where aligned.
    constexpr int RUNS = CCE_BM * CCE_BN / 8 / CCE_THREADS, EPI_BATCH = 4;
    const float* prev_base = MODE == GemmMode::FOLD_CAST ? acc_f32 : nullptr;
    const bool vec_ok = ldo % 8 == 0 && reinterpret_cast<unsigned long long>(out) % 16 == 0 &&
                        reinterpret_cast<unsigned long long>(prev_base) % 16 == 0;
#pragma unroll
    for (int b0 = 0; b0 < RUNS; b0 += EPI_BATCH) {
        float prev[EPI_BATCH][8];
#pragma unroll
        for (int u = 0; u < EPI_BATCH; ++u) {
            const int idx = threadIdx.x + (b0 + u) * CCE_THREADS;
            const int row = m0 + idx / (CCE_BN / 8), col = n0 + (idx % (CCE_BN / 8)) * 8;
            const i64 o = (i64)row * ldo + col;
            if (MODE == GemmMode::WRITE || row >= M) continue;
            if (vec_ok && col + 8 <= N) {
                if (MODE == GemmMode::ACCUMULATE) load8(out + o, prev[u]);
                else load8(acc_f32 + o, prev[u]);
            } else {
#pragma unroll
                for (int q = 0; q < 8; ++q)
                    prev[u][q] = col + q >= N                       ? 0.f
                                 : MODE == GemmMode::ACCUMULATE ? to_f32(out[o + q])
                                                                : acc_f32[o + q];
            }
        }
#pragma unroll
        for (int u = 0; u < EPI_BATCH; ++u) {
            const int idx = threadIdx.x + (b0 + u) * CCE_THREADS;
            const int lr = idx / (CCE_BN / 8), lc = (idx % (CCE_BN / 8)) * 8;
            const int row = m0 + lr, col = n0 + lc;
            if (row >= M) continue;
            float v[8];
            const float4 v0 = *reinterpret_cast<const float4*>(&epi[lr * CCE_EPI_LD + lc]);
            const float4 v1 = *reinterpret_cast<const float4*>(&epi[lr * CCE_EPI_LD + lc + 4]);
            v[0] = v0.x, v[1] = v0.y, v[2] = v0.z, v[3] = v0.w, v[4] = v1.x, v[5] = v1.y, v[6] = v1.z, v[7] = v1.w;
            if (MODE != GemmMode::WRITE) {
#pragma unroll
                for (int q = 0; q < 8; ++q) v[q] += prev[u][q];
            }
            const i64 o = (i64)row * ldo + col;
            if (vec_ok && col + 8 <= N) {
                store8(out + o, v);
            } else {
#pragma unroll
                for (int q = 0; q < 8; ++q)
                    if (col + q < N) out[o + q] = from_f32<OUT>(v[q]);
            }
        }
    }
}

template <typename T, typename OUT, bool A_KMAJOR, GemmMode MODE>
__global__ void __launch_bounds__(CCE_THREADS, 2)
    lce_gemm(const T* __restrict__ a, const T* __restrict__ b, OUT* __restrict__ out,
             const float* __restrict__ acc_f32, const int* __restrict__ flags, long long flag_ld, GemmK k_of_g,
             int M, int N, int K, long long lda, long long ldb, long long ldo, int aligned,
             const int* __restrict__ run_if) {
    if (not_requested(run_if)) return;
    if (aligned)
        gemm_impl<T, OUT, A_KMAJOR, MODE, true>(a, b, out, acc_f32, flags, flag_ld, k_of_g, M, N, K, lda, ldb, ldo);
    else
        gemm_impl<T, OUT, A_KMAJOR, MODE, false>(a, b, out, acc_f32, flags, flag_ld, k_of_g, M, N, K, lda, ldb, ldo);
}
