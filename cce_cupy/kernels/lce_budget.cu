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

// ---------------------------------------------------------------------------------------------
// The row-shifted path (STORE_ROW, bf16): the GEMMs read the kept softmax itself, and what the
// gradient pass would do per element is folded into per-row factors:
//     g_ij = a_i s'_ij - coef_q_i ls / V,   a_i = coef_p_i exp(c_i - lse_i)
// with s' = s except at the target column, so that
//     dE_i = a_i (s' C)_i - coef_q_i (ls / V) sum_j C_j         (lce_budget_de)
//     dC   = s'^T (a E) - (ls / V) sum_i coef_q_i E_i           (cuBLAS onto the rank-1 term)
//     dbias = s'^T a                                           (cuBLAS; bias goes without ls here)
// The launcher sends softcap with label smoothing, and bias with label smoothing, to the gradient
// pass instead: there the smoothing term is not rank-1 (softcap) or needs another column sum.

// lce_budget_shift<T, HAS_BIAS, SOFTCAP, TI>
//   Before the forward: each row's shift c_i = y_{i,t_i} (its target logit, by a gather-dot in
//   fp32) and z_t (the target's logit before softcap, for softcap'), or c_i = +inf for an ignored
//   row (target ignore_index), a row with a target outside [0, V), or, where row_grad is given, a
//   row without gradient (row_grad 0); the forward then stores 0 for it. unsafe (may be null): set
//   to 0 for every row, the forward's start value (one launch fewer before it). The budgeted path
//   passes no row_grad, so that its forward need not wait for the host to form it; a row with a
//   target but no gradient then keeps its s, which its zero factor a_i removes from the GEMMs.
//   Grid: ceil(rows / 8) blocks of 256 threads: one warp a row.
template <typename T, bool HAS_BIAS, bool SOFTCAP, typename TI>
__global__ void lce_budget_shift(const T* __restrict__ e, const T* __restrict__ c, const T* __restrict__ bias,
                                 const TI* __restrict__ targets, const float* __restrict__ row_grad,
                                 long long ignore_index, float* __restrict__ shift, float* __restrict__ z_target,
                                 int* __restrict__ unsafe, int rows, int V, int D, float softcap) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= rows) return;
    if (unsafe != nullptr && lane == 0) unsafe[row] = 0;
    const long long t = (long long)targets[row];
    if (t == ignore_index || t < 0 || t >= V || (row_grad != nullptr && row_grad[row] == 0.f)) {
        if (lane == 0) shift[row] = INFINITY;
        return;
    }
    const T* er = e + (i64)row * D;
    const T* cr = c + t * (i64)D;
    float dot = 0.f;
    if ((D & 7) == 0 && ((reinterpret_cast<size_t>(er) | reinterpret_cast<size_t>(cr)) & 15) == 0) {
        // 8 elements a lane a step in 16-byte loads (the Hopper paths' rows qualify): one element a
        // lane a step took 0.3-0.7 ms at N = 8192, D = 2304, 20x the time to read the 75 MB.
#pragma unroll 4
        for (int k = 8 * lane; k < D; k += 256) {
            float a[8], b[8];
            load8(er + k, a);
            load8(cr + k, b);
#pragma unroll
            for (int u = 0; u < 8; ++u) dot = fmaf(a[u], b[u], dot);
        }
    } else {
        for (int k = lane; k < D; k += 32) dot = fmaf(to_f32(er[k]), to_f32(cr[k]), dot);
    }
    dot = warp_sum(dot);
    if (HAS_BIAS) dot += to_f32(bias[t]);
    if (lane == 0) {
        shift[row] = apply_softcap<SOFTCAP>(dot, softcap);
        z_target[row] = dot;
    }
}

// lce_budget_recompute<T, HAS_BIAS, SOFTCAP>
//   After the forward: the rows it marked unsafe (logits more than 60 nats over the target's, or a
//   sum against the target's past e^60: the GEMMs' sums could overflow, and the forward's lse may
//   be inf) get their lse again, lse[row], from their recomputed logits, then their s row shifted
//   by it (s = p <= 1), and shift[row] = lse[row]. The logits are recomputed one dot product per
//   column (a warp each), twice: slow, for rows with a loss over 60 nats only; other rows return at
//   once. Grid: min(rows, 65535) blocks striding over rows. Block: 256 threads.
template <typename T, bool HAS_BIAS, bool SOFTCAP>
__device__ __forceinline__ float recompute_logit(const T* er, const T* cr, const T* bias, int j, int D, float softcap) {
    float dot = 0.f;
    for (int k = threadIdx.x & 31; k < D; k += 32) dot = fmaf(to_f32(er[k]), to_f32(cr[k]), dot);
    dot = warp_sum(dot);  // every lane
    if (HAS_BIAS) dot += to_f32(bias[j]);
    return dot;  // z; y = apply_softcap(z)
}
template <typename T, bool HAS_BIAS, bool SOFTCAP>
__global__ void lce_budget_recompute(const int* __restrict__ unsafe, T* __restrict__ S, long long lds,
                                     float* __restrict__ shift, float* __restrict__ lse, const T* __restrict__ e,
                                     const T* __restrict__ c, const T* __restrict__ bias, int rows, int V, int D,
                                     float softcap) {
    __shared__ float warp_m[32], warp_s[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        if (!unsafe[row]) continue;  // uniform over the block
        const T* er = e + (i64)row * D;
        float m = -INFINITY, sum = 0.f;  // this warp's columns, online
        for (int j = warp; j < V; j += warps) {
            const float y = apply_softcap<SOFTCAP>(recompute_logit<T, HAS_BIAS, SOFTCAP>(er, c + (i64)j * D, bias, j, D, softcap), softcap);
            const float mm = fmaxf(m, y);
            sum = (mm == -INFINITY) ? 0.f : sum * expf(m - mm) + expf(y - mm);
            m = mm;
        }
        if (lane == 0) {
            warp_m[warp] = m;
            warp_s[warp] = sum;
        }
        __syncthreads();
        float mx = -INFINITY, tot = 0.f;
        for (int w = 0; w < warps; ++w) mx = fmaxf(mx, warp_m[w]);
        for (int w = 0; w < warps; ++w) tot += (warp_m[w] == -INFINITY) ? 0.f : warp_s[w] * expf(warp_m[w] - mx);
        const float l = mx + logf(tot);
        for (int j = warp; j < V; j += warps) {
            const float z = recompute_logit<T, HAS_BIAS, SOFTCAP>(er, c + (i64)j * D, bias, j, D, softcap);
            float sv = __expf(apply_softcap<SOFTCAP>(z, softcap) - l);
            if (SOFTCAP) sv *= softcap_grad(z, softcap);
            if (lane == 0) S[(i64)row * lds + j] = from_f32<T>(sv);
        }
        __syncthreads();  // warp_m is read by every thread before the next row rewrites it
        if (threadIdx.x == 0) {
            shift[row] = l;
            lse[row] = l;
        }
    }
}

// lce_budget_rows<T, HAS_BIAS, SOFTCAP, TI>
//   After the forward (and lce_budget_recompute), per row i: a_i = coef_p_i exp(c_i - lse_i)
//   (0 where c_i = +inf); the target's element exactly, from its fp32 logit:
//     g_it = (coef_p_i exp(y_t - lse_i) - coef_q_i (1 - ls + ls / V)) softcap'(z_t),
//     s'_it = (g_it + coef_q_i ls / V) / a_i
//   (a_i = 0 with g_it != 0, where z-loss makes coef_p exactly 0: the row's other elements are 0,
//   so the row becomes s' = 0 but s'_it = 1, a_i = g_it + coef_q_i ls / V); and the operands of
//   the cuBLAS calls:
//   e_scaled_i = a_i E_i and a_t[i] = a_i in T, a_f[i] = a_i in fp32.
//   coef_q = row_grad, coef_p = row_grad (1 + 2 z_loss lse) as in lce_budget_grad.
//   Grid: min(rows, 65535) blocks striding over rows. Block: 128 threads.
template <typename T, bool HAS_BIAS, bool SOFTCAP, typename TI>
__global__ void lce_budget_rows(T* __restrict__ S, long long lds, const float* __restrict__ lse,
                                const float* __restrict__ row_grad, float z_loss, const TI* __restrict__ targets,
                                const float* __restrict__ shift, const float* __restrict__ z_target,
                                const T* __restrict__ e, T* __restrict__ e_scaled, T* __restrict__ a_t,
                                float* __restrict__ a_f, int rows, int V, int D, float softcap,
                                float smoothing) {
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float l = lse[row], cq = row_grad[row], cp = cq * (1.f + 2.f * z_loss * l), sh = shift[row];
        float a = (sh == INFINITY) ? 0.f : cp * expf(sh - l);
        if (sh != INFINITY) {  // uniform over the block
            const long long t = (long long)targets[row];
            const float z = z_target[row], smooth_q = smoothing / (float)V;
            float g_t = cp * expf(apply_softcap<SOFTCAP>(z, softcap) - l) - cq * (1.f - smoothing + smooth_q);
            if (SOFTCAP) g_t *= softcap_grad(z, softcap);
            const float num = g_t + cq * smooth_q;
            T* srow = S + (i64)row * lds;
            if (a == 0.f && num != 0.f) {  // coef_p = 0: only the target's term is left
                for (int j = threadIdx.x; j < V; j += blockDim.x) srow[j] = from_f32<T>(0.f);
                __syncthreads();  // the zeros land before the target's 1
                a = num;
                if (threadIdx.x == 0) srow[t] = from_f32<T>(1.f);
            } else if (threadIdx.x == 0 && a != 0.f) {
                srow[t] = from_f32<T>(num / a);
            }
        }
        if (threadIdx.x == 0) {
            a_t[row] = from_f32<T>(a);
            a_f[row] = a;
        }
        const T* er = e + (i64)row * D;
        T* out = e_scaled + (i64)row * D;
        for (int k = threadIdx.x; k < D; k += blockDim.x) out[k] = from_f32<T>(a * to_f32(er[k]));
    }
}

// lce_budget_de<GT>
//   dE_i = a_i X_i - coef_q_i (ls / V) colsum, X = s' C (fp32, from cuBLAS), colsum = sum_j C_j
//   (fp32, D; null without label smoothing). Grid-stride over rows x D. Block: 256 threads.
//   X may be dE itself (fp32 dE): no __restrict__ on the two.
template <typename GT>
__global__ void lce_budget_de(const float* X, const float* __restrict__ a_f, const float* __restrict__ row_grad,
                              const float* __restrict__ colsum, float smooth_q, GT* de, int rows, int D) {
    const i64 total = (i64)rows * D;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        const int row = (int)(i / D), k = (int)(i % D);
        float v = a_f[row] * X[i];
        if (colsum != nullptr) v -= row_grad[row] * smooth_q * colsum[k];
        de[i] = from_f32<GT>(v);
    }
}

// lce_budget_dc_fill<GT>
//   dC[j, k] = -(ls / V) w[k] for every row j, before the dC GEMMs accumulate into it: w =
//   sum_i coef_q_i E_i (fp32, D) is dC's label-smoothing part, so dC is rounded once.
//   dc: (V, D). Grid-stride. Block: 256 threads.
template <typename GT>
__global__ void lce_budget_dc_fill(GT* __restrict__ dc, const float* __restrict__ w, float smooth_q, int V, int D) {
    const i64 total = (i64)V * D;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x)
        dc[i] = from_f32<GT>(-smooth_q * w[i % D]);
}
