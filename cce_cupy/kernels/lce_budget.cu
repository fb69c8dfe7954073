// The memory-budgeted backward's one elementwise pass (cce_cupy/cuda/budget.py): the forward
// (lce_forward_partials_sm90 with STORE) kept each row's softmax as fp16 s_ij = exp(y_ij - m) with
// one m per 256-column tile; this turns it, in place, into the logit gradient that the two cuBLAS
// GEMMs (dE = G C, dC = G^T E) read. No logit is recomputed.
//
// lce_budget_grad<T, HAS_BIAS, SOFTCAP, TI>
//   S: (rows, lds) fp16 in, the same bytes as (rows, lds) T out; lds % 8 == 0, 16-byte aligned.
//   scales: (rows, ntiles) fp32, the m of each 256-column tile. lse, row_grad: (rows,) fp32,
//   row_grad = coef_q of cce_cupy.options.row_coefficients (the upstream gradient of each row's
//   loss, 0 where ignored). targets: (rows,) TI. E: (rows, D), C: (V, D), bias: (V,) or null, of
//   type T (the target's gather-dot only).
//     p_ij = s_ij exp(m_i,j/256 - lse_i)
//     g_ij = (coef_p_i p_ij - coef_q_i ((1 - ls) [j == t_i] + ls / V)) * softcap'(z_ij)
//     coef_q_i = row_grad_i,  coef_p_i = row_grad_i (1 + 2 z_loss lse_i)
//   (options.py's formulas; coef_p's z-loss factor is options.z_loss_dlse, mirrored here so the
//   pass needs no per-row array computed between the forward and it). The target column is
//   recomputed from E and C (a gather-dot, as the forward's finish kernel does): from fp16 s,
//   p_t - 1 would lose its accuracy on peaked rows, where the target carries the row's largest
//   gradient. Elsewhere softcap' comes from
//   y = m + log s, as 1 - (y / softcap)^2.
//   Grid: min(rows, 65535) blocks, striding over rows: a block streams whole rows, B_UNROLL
//   16-byte vectors a thread in flight (the pass is bandwidth-bound: 4 bytes a logit moved, read
//   and written in place). Block: 256 threads.
#include "common.cuh"

#define B_THREADS 256
#define B_UNROLL 4
#define B_TILE_N 256  // the forward's tile width: one scale per 256 columns

template <typename T, bool SOFTCAP>
__device__ __forceinline__ void grad8(const float (&s)[8], float m, float pscale, float cp, float cq, float smooth_q,
                                      float softcap, float (&g)[8]) {
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        // s == 0: a column masked by a -inf bias (or 87+ nats under its tile's max): p = 0.
        const float p = (s[q] == 0.f) ? 0.f : s[q] * pscale;
        float gq = cp * p - cq * smooth_q;
        if (SOFTCAP && s[q] != 0.f) {
            const float r = (m + __logf(s[q])) / softcap;  // y / softcap
            gq *= (1.f - r) * (1.f + r);
        }
        g[q] = gq;
    }
}

template <typename T, bool HAS_BIAS, bool SOFTCAP, typename TI>
__global__ void __launch_bounds__(B_THREADS)
    lce_budget_grad(__half* __restrict__ S, long long lds, const float* __restrict__ scales, int ntiles,
                    const float* __restrict__ lse, const float* __restrict__ row_grad, float z_loss,
                    const TI* __restrict__ targets, const T* __restrict__ e, const T* __restrict__ c,
                    const T* __restrict__ bias, int rows, int V, int D, float softcap, float smoothing) {
    __shared__ float dot_part[B_THREADS / 32];
    const float smooth_q = smoothing / (float)V;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float l = lse[row], cq = row_grad[row], cp = cq * (1.f + 2.f * z_loss * l);
        const long long t = (long long)targets[row];
        // The target's gradient from its fp32 logit (a gather-dot by the whole block).
        float g_t = 0.f;
        if (t >= 0 && t < V) {
            const T* er = e + (i64)row * D;
            const T* cr = c + t * (i64)D;
            float dot = 0.f;
            for (int k = threadIdx.x; k < D; k += B_THREADS) dot = fmaf(to_f32(er[k]), to_f32(cr[k]), dot);
            dot = warp_sum(dot);
            if ((threadIdx.x & 31) == 0) dot_part[threadIdx.x >> 5] = dot;
            __syncthreads();  // every warp's partial is written before any thread sums them
            float z = 0.f;
#pragma unroll
            for (int w = 0; w < B_THREADS / 32; ++w) z += dot_part[w];
            __syncthreads();  // the sums are read before the next row's partials overwrite them
            if (HAS_BIAS) z += to_f32(bias[t]);
            const float y = apply_softcap<SOFTCAP>(z, softcap);
            g_t = cp * __expf(y - l) - cq * (1.f - smoothing + smooth_q);
            if (SOFTCAP) g_t *= softcap_grad(z, softcap);
        }
        __half* srow = S + (i64)row * lds;
        T* grow = reinterpret_cast<T*>(srow);  // the same bytes: each thread reads its 8 before writing them
        const float* srow_scales = scales + (i64)row * ntiles;
        const int full = V / 8 * 8;  // columns in whole 16-byte vectors
        for (int base = threadIdx.x * 8; base < full; base += B_THREADS * 8 * B_UNROLL) {
            float s[B_UNROLL][8];
#pragma unroll
            for (int u = 0; u < B_UNROLL; ++u)  // all loads first: B_UNROLL vectors in flight
                if (base + u * B_THREADS * 8 < full) load8(srow + base + u * B_THREADS * 8, s[u]);
#pragma unroll
            for (int u = 0; u < B_UNROLL; ++u) {
                const int col = base + u * B_THREADS * 8;
                if (col >= full) break;
                const float m = srow_scales[col / B_TILE_N];
                float g[8];
                grad8<T, SOFTCAP>(s[u], m, __expf(m - l), cp, cq, smooth_q, softcap, g);
                if (t >= col && t < col + 8) g[t - col] = g_t;
                store8(grow + col, g);
            }
        }
        for (int col = full + threadIdx.x; col < V; col += B_THREADS) {  // the last V % 8 columns
            const float m = srow_scales[col / B_TILE_N];
            float s1[8] = {__half2float(srow[col])}, g[8];
            grad8<T, SOFTCAP>(s1, m, __expf(m - l), cp, cq, smooth_q, softcap, g);
            grow[col] = from_f32<T>(col == t ? g_t : g[0]);
        }
    }
}
