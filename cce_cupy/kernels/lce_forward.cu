// Forward of the fused linear cross-entropy: per-row logsumexp of  y = softcap(E @ C^T + bias)
// and the target term, without ever writing an N x V logit.
//
// lce_forward_partials<T, HAS_BIAS, SOFTCAP, SMOOTH, TI>
//   E: (N, D) row-major, C: (V, D) row-major, bias: (V,) or null, all of type T; targets: (N,) of
//   TI (int or long long); part: (3, splits, N) fp32.
//   Grid: (ceil(N / 128), splits). Block: CCE_THREADS (256). Dynamic smem: CCE_SMEM_BYTES.
//   Block (bx, s) owns rows [128 bx, 128 bx + 128) and the V-columns [s * v_per_split, ...).
//   For each 128 x 128 logit tile of its range it runs the GEMM main loop over D, then folds the
//   tile into a running (max, sum of exp) per row (online logsumexp), and, with SMOOTH, a running
//   sum of y (label smoothing needs sum_j y_ij). Writes per (row, split):
//     part[0][s][row] = max, part[1][s][row] = sum exp(y - max), part[2][s][row] = sum y.
//   Columns >= V are masked out (never become -inf logits that could match a target).
//   y_target (N,) fp32 or null: the lane holding row i's target column t_i (valid: in [0, V))
//   writes y_target[i] = y_{i,t_i}, the same fp32 logit the lse folds in (one writer per row).
//
// lce_forward_finish<T, HAS_BIAS, SOFTCAP, SMOOTH, TI>
//   E, C, bias, targets as above; part: (3, splits, N) from either partials kernel; y_target: (N,)
//   fp32 or null; lse, tgt: (N,) fp32; bad_target: one int.
//   Grid: ceil(N / 8) blocks of 256 threads: one warp per row.
//   Combines the splits' partials into lse[row] and takes the target logit y_t from y_target
//   (written by lce_forward_partials), or where that is null (the Hopper forward) computes it by a
//   gather-dot y_t = softcap(E[row] . C[t] + bias[t]). From the tile, y_t carries the same
//   rounding as the lse's own terms, so the per-token loss lse - y_t (~0.05 on peaked rows, from
//   two numbers ~10) keeps fp32 accuracy; a separately rounded gather-dot costs it ~1e-6 absolute.
//   (tf32: the gather-dot truncates its operands like the TF32 forward's MMAs.) Then
//   tgt[row] = (1 - ls) * y_t + (ls / V) * sum_j y_j. Ignored rows get tgt = 0. A target outside
//   [0, V) that is not ignore_index gets tgt = NaN (so the loss is NaN, never silently finite)
//   and sets *bad_target = 1.
#include "common.cuh"

template <typename T, bool HAS_BIAS, bool SOFTCAP, bool SMOOTH, typename TI, bool ALIGNED>
__device__ void forward_partials_impl(const T* __restrict__ e, const T* __restrict__ c,
                                      const T* __restrict__ bias, const TI* __restrict__ targets,
                                      float* __restrict__ part, float* __restrict__ y_target, int N,
                                      int V, int D, int v_per_split, float softcap) {
    extern __shared__ __align__(16) char smem[];
    float* epi = reinterpret_cast<float*>(smem);
    const int m0 = blockIdx.x * CCE_BM;
    const int split = blockIdx.y, splits = gridDim.y;
    const int v_begin = split * v_per_split;
    const int v_end = min(V, v_begin + v_per_split);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Warp w folds rows w*16 .. w*16+15; each lane holds 4 consecutive columns of a row. The running
    // (max, sum, ysum) of a row lives in shared memory (not 48 registers per thread): only its warp
    // touches it, so __syncwarp orders the read-modify-write.
    __shared__ float run_max[CCE_BM], run_sum[CCE_BM], run_ysum[CCE_BM];
    if (threadIdx.x < CCE_BM) {
        run_max[threadIdx.x] = -INFINITY; run_sum[threadIdx.x] = 0.f; run_ysum[threadIdx.x] = 0.f;
    }
    // (the main loop's first barrier orders this initialization before any update)

    GemmArgs<T> g{e, c, (i64)D, (i64)D, N, V, D};
    for (int n0 = v_begin; n0 < v_end; n0 += CCE_BN) {
        gemm_tile<T, true, true, ALIGNED>(g, m0, n0, smem, epi, NoSkip{});
        const int col = n0 + lane * 4;
        float b[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) b[q] = (HAS_BIAS && col + q < v_end) ? to_f32(bias[col + q]) : 0.f;
#pragma unroll 2
        for (int r = 0; r < 16; ++r) {
            const int lr = warp * 16 + r;
            const float4 z4 = *reinterpret_cast<const float4*>(&epi[lr * CCE_EPI_LD + lane * 4]);
            float y[4] = {z4.x + b[0], z4.y + b[1], z4.z + b[2], z4.w + b[3]};
            float tmax = -INFINITY, ysum = 0.f;
            const long long t = (y_target != nullptr && m0 + lr < N) ? (long long)targets[m0 + lr] : -1;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                y[q] = apply_softcap<SOFTCAP>(y[q], softcap);
                if (col + q >= v_end) y[q] = -INFINITY;  // columns of the next split or past V
                else ysum += y[q];
                if (t == (long long)(col + q) && col + q < v_end) y_target[m0 + lr] = y[q];
                tmax = fmaxf(tmax, y[q]);
            }
            tmax = warp_max(tmax);
            const float old_max = run_max[lr];
            const float new_max = fmaxf(old_max, tmax);
            // exp of -inf - finite is 0; a fully masked lane contributes nothing.
            float s = 0.f;
#pragma unroll
            for (int q = 0; q < 4; ++q) s += (y[q] == -INFINITY) ? 0.f : __expf(y[q] - new_max);
            s = warp_sum(s);
            const float new_sum = run_sum[lr] * ((old_max == -INFINITY) ? 0.f : __expf(old_max - new_max)) + s;
            const float new_ysum = SMOOTH ? run_ysum[lr] + warp_sum(ysum) : 0.f;
            __syncwarp();  // every lane has read the old state before lane 0 replaces it
            if (lane == 0) { run_max[lr] = new_max; run_sum[lr] = new_sum; run_ysum[lr] = new_ysum; }
            __syncwarp();  // the new state is visible to the whole warp for the next tile
        }
        __syncthreads();  // every warp has read the epilogue tile before the next main loop reuses it
    }
    if (threadIdx.x < CCE_BM) {
        const int row = m0 + threadIdx.x;
        if (row < N) {
            const i64 stride = (i64)splits * N;
            part[(i64)split * N + row] = run_max[threadIdx.x];
            part[stride + (i64)split * N + row] = run_sum[threadIdx.x];
            part[2 * stride + (i64)split * N + row] = run_ysum[threadIdx.x];
        }
    }
}

template <typename T, bool HAS_BIAS, bool SOFTCAP, bool SMOOTH, typename TI>
__global__ void __launch_bounds__(CCE_THREADS, 2)
    lce_forward_partials(const T* __restrict__ e, const T* __restrict__ c, const T* __restrict__ bias,
                         const TI* __restrict__ targets, float* __restrict__ part, float* __restrict__ y_target,
                         int N, int V, int D, int v_per_split, float softcap, int aligned) {
    if (aligned)
        forward_partials_impl<T, HAS_BIAS, SOFTCAP, SMOOTH, TI, true>(e, c, bias, targets, part, y_target, N, V, D,
                                                                      v_per_split, softcap);
    else
        forward_partials_impl<T, HAS_BIAS, SOFTCAP, SMOOTH, TI, false>(e, c, bias, targets, part, y_target, N, V, D,
                                                                       v_per_split, softcap);
}

// With tf32 (the Hopper forward of fp32 inputs under allow_tf32) the gather-dot multiplies what the
// tensor cores do: each operand's top 10 mantissa bits (TF32 MMAs ignore the low 13), so y_t
// carries the lse's own truncation and lse - y_t stays accurate.
__device__ __forceinline__ float tf32_operand(float x, int tf32) {
    return tf32 ? __uint_as_float(__float_as_uint(x) & 0xffffe000u) : x;
}

template <typename T, bool HAS_BIAS, bool SOFTCAP, bool SMOOTH, typename TI>
__global__ void lce_forward_finish(const T* __restrict__ e, const T* __restrict__ c,
                                   const T* __restrict__ bias, const TI* __restrict__ targets,
                                   const float* __restrict__ part, const float* __restrict__ y_target,
                                   float* __restrict__ lse,
                                   float* __restrict__ tgt, int* __restrict__ bad_target, int N, int V,
                                   int D, int splits, float softcap, float smoothing, long long ignore_index,
                                   int tf32) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= N) return;
    // Combine the splits: max of maxes, then rescaled sums (fixed order: deterministic).
    const i64 stride = (i64)splits * N;
    float mx = -INFINITY;
    for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, part[(i64)s * N + row]);
    mx = warp_max(mx);
    float sm = 0.f, ys = 0.f;
    for (int s = lane; s < splits; s += 32) {
        const float m_s = part[(i64)s * N + row];
        sm += (m_s == -INFINITY) ? 0.f : part[stride + (i64)s * N + row] * __expf(m_s - mx);
        if (SMOOTH) ys += part[2 * stride + (i64)s * N + row];
    }
    sm = warp_sum(sm);
    if (SMOOTH) ys = warp_sum(ys);
    const float row_lse = mx + logf(sm);  // NaN/Inf inputs propagate to NaN here

    const long long t = (long long)targets[row];
    float t_term = 0.f;
    if (t == ignore_index) {
        t_term = 0.f;
    } else if (t < 0 || t >= V) {
        t_term = NAN;
        if (lane == 0) atomicExch(bad_target, 1);
    } else {
        float y_t;
        if (y_target != nullptr) {
            y_t = y_target[row];
        } else {  // gather-dot: E[row] . C[t], accumulated in fp32 by the warp
            const T* er = e + (i64)row * D;
            const T* cr = c + (i64)t * D;
            float dot = 0.f;
            for (int k = lane; k < D; k += 32)
                dot = fmaf(tf32_operand(to_f32(er[k]), tf32), tf32_operand(to_f32(cr[k]), tf32), dot);
            dot = warp_sum(dot);
            if (HAS_BIAS) dot += to_f32(bias[t]);
            y_t = apply_softcap<SOFTCAP>(dot, softcap);
        }
        t_term = (1.f - smoothing) * y_t;
        if (SMOOTH) t_term += (smoothing / (float)V) * ys;
    }
    if (lane == 0) {
        lse[row] = row_lse;
        tgt[row] = t_term;
    }
}
