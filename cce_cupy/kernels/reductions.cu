// Small reductions around the fused kernels.
//
// lce_bias_grad<GT, OUT, ACCUMULATE>
//   dbias[v0 + j] (+)= sum_i G[i][j] over the live tiles of a gradient chunk.
//   G: (N, ldg) row-major chunk of width Vc; flags: (ceil(N/128), ceil(Vc/128)) or null (all live).
//   Grid: ceil(Vc / 32) blocks of (32, 32) threads: threadIdx.x picks the column, threadIdx.y
//   strides over rows; the 32 partial sums are added in a fixed order (deterministic).
//
// ce_logits<T, TI, SOFTCAP, SMOOTH, INPLACE>
//   Cross-entropy on materialized logits (N, V) row-major, one block of 256 threads per row.
//   One pass reads the row: online max and sum of exp (and sum of y with SMOOTH), then lse and the
//   target term; with INPLACE a second sweep overwrites the row with dloss/dlogits, so the
//   backward needs no extra N x V memory. row_grad[i] is the upstream gradient of loss_i (0 for
//   ignored rows). Out-of-range targets: tgt = NaN and *bad_target = 1.
#include "common.cuh"

template <typename GT, typename OUT, bool ACCUMULATE>
__global__ void lce_bias_grad(const GT* __restrict__ G, const int* __restrict__ flags, OUT* __restrict__ dbias,
                              int N, int Vc, long long ldg, int v0) {
    __shared__ float part[32][33];
    const int j = blockIdx.x * 32 + threadIdx.x;
    const int flag_cols = (Vc + 127) / 128;
    float s = 0.f;
    if (j < Vc) {
        for (int i = threadIdx.y; i < N; i += 32) {
            if (flags != nullptr && flags[(i64)(i / 128) * flag_cols + j / 128] == 0) continue;
            s += to_f32(G[(i64)i * ldg + j]);
        }
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();  // all row-partials of this column block are in shared memory
    if (threadIdx.y == 0 && j < Vc) {
        float t = 0.f;
        for (int y = 0; y < 32; ++y) t += part[y][threadIdx.x];
        if (ACCUMULATE) t += to_f32(dbias[v0 + j]);
        dbias[v0 + j] = from_f32<OUT>(t);
    }
}

__device__ __forceinline__ float block_reduce(float v, float* scratch, bool is_max) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();  // all warp results written
    float r = (lane < (int)(blockDim.x / 32)) ? scratch[lane] : (is_max ? -INFINITY : 0.f);
    return is_max ? warp_max(r) : warp_sum(r);
}

template <typename T, typename TI, bool SOFTCAP, bool SMOOTH, bool INPLACE>
__global__ void __launch_bounds__(256)
    ce_logits(T* __restrict__ logits, const TI* __restrict__ targets, const float* __restrict__ row_grad,
              float* __restrict__ lse_out, float* __restrict__ tgt_out, int* __restrict__ bad_target, int N,
              int V, float softcap, float smoothing, float z_loss, long long ignore_index) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    T* x = logits + (i64)row * V;
    // Online logsumexp over this thread's strided columns, then one block reduction.
    float mx = -INFINITY, sm = 0.f, ys = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        const float y = apply_softcap<SOFTCAP>(to_f32(x[j]), softcap);
        if (y > mx) { sm = sm * __expf(mx - y) + 1.f; mx = y; }
        else sm += __expf(y - mx);
        if (SMOOTH) ys += y;
        if (y != y) sm = NAN;  // NaN logits give a NaN loss, never a finite one
    }
    const float row_max = block_reduce(mx, scratch, true);
    const float rescaled = (mx == -INFINITY) ? 0.f : sm * __expf(mx - row_max);
    const float total = block_reduce(rescaled, scratch, false);
    const float lse = row_max + logf(total);
    if (SMOOTH) ys = block_reduce(ys, scratch, false);

    const long long t = (long long)targets[row];
    const bool valid = (t != ignore_index);
    const bool in_range = (t >= 0 && t < V);
    float t_term = 0.f;
    if (valid) {
        if (in_range) {
            t_term = (1.f - smoothing) * apply_softcap<SOFTCAP>(to_f32(x[t]), softcap);
            if (SMOOTH) t_term += (smoothing / (float)V) * ys;
        } else {
            t_term = NAN;
            if (threadIdx.x == 0) atomicExch(bad_target, 1);
        }
    }
    __syncthreads();  // every thread has read x[t] before any thread overwrites the row
    if (threadIdx.x == 0) {
        lse_out[row] = lse;
        tgt_out[row] = t_term;
    }
    if (INPLACE) {
        const float g = valid ? row_grad[row] : 0.f;
        const float cp = g * (1.f + 2.f * z_loss * lse);
        const float q_all = smoothing / (float)V;
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            const float y = apply_softcap<SOFTCAP>(to_f32(x[j]), softcap);
            float d = cp * __expf(y - lse) - g * ((j == t ? 1.f - smoothing : 0.f) + q_all);
            if (SOFTCAP) d *= 1.f - (y / softcap) * (y / softcap);
            x[j] = from_f32<T>(d);
        }
    }
}
