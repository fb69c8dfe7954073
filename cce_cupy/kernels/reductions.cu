// Small reductions around the fused kernels.
//
// lce_bias_grad<GT, OUT, ACCUMULATE>
//   dbias[v0 + j] (+)= sum_i G[i][j] over the live tiles of a gradient chunk.
//   G: (N, ldg) row-major chunk of width Vc; flags: (ceil(N/128), ceil(Vc/128)) or null (all live).
//   Grid: ceil(Vc / 32) blocks of (32, 32) threads: threadIdx.x picks the column, threadIdx.y
//   strides over rows; the 32 partial sums are added in a fixed order (deterministic).
//
// Cross-entropy on materialized logits (N, V) row-major (cce_cupy.cross_entropy). Both kernels
// take the same arguments and write lse_out[i] and tgt_out[i] (the target term, 0 for ignored
// rows); with a gradient they overwrite the logits with dloss/dlogits, row_grad[i] being the
// upstream gradient of loss_i (0 for ignored rows). Out-of-range targets: tgt = NaN and
// *bad_target = 1. The row is read in 16-byte vectors (a scalar head and tail where the row does
// not start or end on 16 bytes) with one exp-rescale per vector.
//
// ce_logits<T, TI, SOFTCAP, SMOOTH, INPLACE>
//   One block of 256 threads per row; grid (N). One read of the row for the loss. With INPLACE
//   a second sweep re-reads the row to write the gradient (the fallback of the kernel below).
//
// ce_logits_inplace_cluster<T, TI, SOFTCAP, SMOOTH, CL>   (sm_90 and later only: thread-block clusters)
//   Loss and in-place gradient reading the row once: a cluster of CL blocks (256 threads each)
//   owns a row; block r keeps the 16-byte vectors [r * per, (r + 1) * per) of it in shared memory
//   (per = ceil(V / VEC / CL), VEC = 16 / sizeof(T)), the CL partial (max, sum) pairs are
//   exchanged through distributed shared memory, and each block writes its slice's gradient from
//   shared memory. Grid (N * CL). Dynamic smem: per * 16 bytes. Needs V % VEC == 0 and a 16-byte
//   aligned base (the launcher checks and otherwise uses ce_logits).
#include "common.cuh"

template <typename GT, typename OUT, bool ACCUMULATE>
__global__ void lce_bias_grad(const GT* __restrict__ G, const int* __restrict__ flags, OUT* __restrict__ dbias,
                              int N, int Vc, long long ldg, int v0, const int* __restrict__ run_if) {
    __shared__ float part[32][33];
    if (not_requested(run_if)) return;
    const int j = blockIdx.x * 32 + threadIdx.x;
    const int flag_cols = (Vc + CCE_BN - 1) / CCE_BN;  // flags of lce_grad_logits' CCE_BM x CCE_BN tiles
    float s = 0.f;
    if (j < Vc) {
        for (int i = threadIdx.y; i < N; i += 32) {
            if (flags != nullptr && flags[(i64)(i / CCE_BM) * flag_cols + j / CCE_BN] == 0) continue;
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

// Running (max, sum of exp(y - max), sum of y) over a thread's logits, folded K at a time: one
// rescale of the sum per fold. NaN anywhere makes the sum NaN (fmaxf skips it, exp does not);
// +Inf makes it NaN through exp(inf - inf).
template <bool SMOOTH> struct OnlineLse {
    float mx = -INFINITY, sm = 0.f, ys = 0.f;

    template <int K> __device__ __forceinline__ void fold(const float (&y)[K]) {
        float m = mx;
#pragma unroll
        for (int k = 0; k < K; ++k) m = fmaxf(m, y[k]);
        const float base = (m == -INFINITY) ? 0.f : m;  // all -inf so far: every exp below is 0
        float s = sm * __expf(mx - base);
#pragma unroll
        for (int k = 0; k < K; ++k) s += __expf(y[k] - base);
        if (SMOOTH) {
#pragma unroll
            for (int k = 0; k < K; ++k) ys += y[k];
        }
        mx = m;
        sm = s;
    }
    __device__ __forceinline__ void fold1(float y) {
        const float one[1] = {y};
        fold(one);
    }
    // Adds another partial (m2, s2, y2) to this one.
    __device__ __forceinline__ void merge(float m2, float s2, float y2) {
        const float m = fmaxf(mx, m2), base = (m == -INFINITY) ? 0.f : m;
        sm = (sm == 0.f ? 0.f : sm * __expf(mx - base)) + (s2 == 0.f ? 0.f : s2 * __expf(m2 - base));
        mx = m;
        ys += y2;
    }
    // The whole block's row statistics (every thread gets them).
    __device__ __forceinline__ void block_combine(float* scratch) {
        const float row_max = block_reduce(mx, scratch, true);
        const float base = (row_max == -INFINITY) ? 0.f : row_max;
        sm = block_reduce(sm == 0.f ? 0.f : sm * __expf(mx - base), scratch, false);
        if (SMOOTH) ys = block_reduce(ys, scratch, false);
        mx = row_max;
    }
    __device__ __forceinline__ float lse() const { return mx + logf(sm); }
};

// The loss terms and gradient coefficients of one row, from its final statistics.
struct CeRow {
    long long t;       // the target
    bool valid;        // not ignore_index
    bool in_range;     // 0 <= t < V
    float lse, cp, g;  // logsumexp; coefficients of softmax and of the smoothed one-hot
};

__device__ __forceinline__ CeRow ce_row(long long t, long long ignore_index, int V, float lse,
                                        const float* row_grad, int row, float z_loss) {
    CeRow r;
    r.t = t;
    r.valid = (t != ignore_index);
    r.in_range = (t >= 0 && t < V);
    r.lse = lse;
    r.g = (row_grad != nullptr && r.valid) ? row_grad[row] : 0.f;
    r.cp = r.g * (1.f + 2.f * z_loss * lse);
    return r;
}

// The target term (1 - smoothing) y_t + smoothing / V * sum(y) from y_t = softcap(x[t]).
__device__ __forceinline__ float ce_target_term(float y_t, float ysum, float smoothing, int V, bool smooth) {
    float t_term = (1.f - smoothing) * y_t;
    if (smooth) t_term += (smoothing / (float)V) * ysum;
    return t_term;
}

// dloss/dlogit of column j of the row.
template <bool SOFTCAP>
__device__ __forceinline__ float ce_grad(float x, long long j, const CeRow& r, float softcap, float smoothing,
                                         float q_all) {
    const float y = apply_softcap<SOFTCAP>(x, softcap);
    float d = r.cp * __expf(y - r.lse) - r.g * ((j == r.t ? 1.f - smoothing : 0.f) + q_all);
    if (SOFTCAP) d *= softcap_grad(x, softcap);
    return d;
}

#define CE_UNROLL 4  // 16-byte loads in flight per thread

// Calls f(i, xv[i]) for the 16-byte vectors i in [0, nvec), strided over the block, with CE_UNROLL
// loads in flight per thread before any f runs (streaming loads: the logits are touched once).
template <typename F>
__device__ __forceinline__ void for_each_vector(const uint4* xv, int nvec, F&& f) {
    const int nt = blockDim.x;
    for (int i0 = threadIdx.x; i0 < nvec; i0 += CE_UNROLL * nt) {
        uint4 u[CE_UNROLL];
#pragma unroll
        for (int k = 0; k < CE_UNROLL; ++k)
            if (i0 + k * nt < nvec) u[k] = __ldcs(xv + i0 + k * nt);
#pragma unroll
        for (int k = 0; k < CE_UNROLL; ++k)
            if (i0 + k * nt < nvec) f(i0 + k * nt, u[k]);
    }
}

// Folds the softcapped logits held in one vector into st.
template <typename T, bool SOFTCAP, bool SMOOTH>
__device__ __forceinline__ void fold_vector(OnlineLse<SMOOTH>& st, const uint4& u, float softcap) {
    float y[Vec16<T>::n];
    Vec16<T>::unpack(u, y);
#pragma unroll
    for (int q = 0; q < Vec16<T>::n; ++q) y[q] = apply_softcap<SOFTCAP>(y[q], softcap);
    st.fold(y);
}

// The gradient of the logits held in one vector whose first column is col0.
template <typename T, bool SOFTCAP>
__device__ __forceinline__ uint4 grad_vector(const uint4& u, long long col0, const CeRow& r, float softcap,
                                             float smoothing, float q_all) {
    float v[Vec16<T>::n];
    Vec16<T>::unpack(u, v);
#pragma unroll
    for (int q = 0; q < Vec16<T>::n; ++q) v[q] = ce_grad<SOFTCAP>(v[q], col0 + q, r, softcap, smoothing, q_all);
    return Vec16<T>::pack(v);
}

template <typename T, typename TI, bool SOFTCAP, bool SMOOTH, bool INPLACE>
__global__ void __launch_bounds__(CCE_THREADS)
    ce_logits(T* __restrict__ logits, const TI* __restrict__ targets, const float* __restrict__ row_grad,
              float* __restrict__ lse_out, float* __restrict__ tgt_out, int* __restrict__ bad_target, int N,
              int V, float softcap, float smoothing, float z_loss, long long ignore_index) {
    constexpr int VEC = Vec16<T>::n;
    __shared__ float scratch[32];
    const int row = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    T* x = logits + (i64)row * V;
    // Columns [0, head) and [body_end, V) are scalar; [head, body_end) are 16-byte vectors.
    const int head = min(V, (int)((VEC - (reinterpret_cast<unsigned long long>(x) / sizeof(T)) % VEC) % VEC));
    const int nvec = (V - head) / VEC, body_end = head + nvec * VEC;
    const uint4* xv = reinterpret_cast<const uint4*>(x + head);

    OnlineLse<SMOOTH> st;
    for (int j = tid; j < head; j += nt) st.fold1(apply_softcap<SOFTCAP>(to_f32(x[j]), softcap));
    for (int j = body_end + tid; j < V; j += nt) st.fold1(apply_softcap<SOFTCAP>(to_f32(x[j]), softcap));
    for_each_vector(xv, nvec, [&](int, const uint4& u) { fold_vector<T, SOFTCAP>(st, u, softcap); });
    st.block_combine(scratch);
    const CeRow r = ce_row((long long)targets[row], ignore_index, V, st.lse(), row_grad, row, z_loss);
    if (tid == 0) {
        float t_term = 0.f;
        if (r.valid && r.in_range) {
            t_term = ce_target_term(apply_softcap<SOFTCAP>(to_f32(x[r.t]), softcap), st.ys, smoothing, V, SMOOTH);
        } else if (r.valid) {
            t_term = NAN;
            atomicExch(bad_target, 1);
        }
        lse_out[row] = r.lse;
        tgt_out[row] = t_term;
    }
    if (!INPLACE) return;
    __syncthreads();  // thread 0 has read x[t] before any thread overwrites the row
    const float q_all = smoothing / (float)V;
    for (int j = tid; j < head; j += nt) x[j] = from_f32<T>(ce_grad<SOFTCAP>(to_f32(x[j]), j, r, softcap, smoothing, q_all));
    for (int j = body_end + tid; j < V; j += nt)
        x[j] = from_f32<T>(ce_grad<SOFTCAP>(to_f32(x[j]), j, r, softcap, smoothing, q_all));
    uint4* xw = reinterpret_cast<uint4*>(x + head);
    for_each_vector(xw, nvec, [&](int i, const uint4& u) {
        __stcs(xw + i, grad_vector<T, SOFTCAP>(u, head + (long long)i * VEC, r, softcap, smoothing, q_all));
    });
}

// Thread-block clusters exist from sm_90 on: only there is the kernel defined (and built, see
// cce_cupy.cuda.sources.CLUSTER_KERNELS).
#if __CUDA_ARCH__ >= 900
template <typename T, typename TI, bool SOFTCAP, bool SMOOTH, int CL>
__global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(CCE_THREADS)
    ce_logits_inplace_cluster(T* __restrict__ logits, const TI* __restrict__ targets,
                              const float* __restrict__ row_grad, float* __restrict__ lse_out,
                              float* __restrict__ tgt_out, int* __restrict__ bad_target, int N, int V, float softcap,
                              float smoothing, float z_loss, long long ignore_index) {
    constexpr int VEC = Vec16<T>::n;
    extern __shared__ uint4 slice[];
    __shared__ float scratch[32];
    __shared__ float part[3];  // this block's (max, sum, sum y), read by the whole cluster
    const unsigned rank = cluster_rank();
    const int row = blockIdx.x / CL, tid = threadIdx.x, nt = blockDim.x;
    const int nvec_row = V / VEC, per = (nvec_row + CL - 1) / CL;
    const int v0 = min(nvec_row, (int)rank * per), nvec = min(nvec_row, v0 + per) - v0;
    uint4* xv = reinterpret_cast<uint4*>(logits + (i64)row * V) + v0;

    // The one read of the slice: into shared memory, folding the statistics on the way.
    OnlineLse<SMOOTH> st;
    for_each_vector(xv, nvec, [&](int i, const uint4& u) {
        slice[i] = u;
        fold_vector<T, SOFTCAP>(st, u, softcap);
    });
    st.block_combine(scratch);
    if (tid == 0) {
        part[0] = st.mx;
        part[1] = st.sm;
        part[2] = st.ys;
    }
    cluster_arrive();  // release: part[] and slice[] are written
    cluster_wait();
    // Every block merges the CL partials in rank order: the same lse everywhere.
    OnlineLse<SMOOTH> all;
    for (unsigned q = 0; q < CL; ++q) all.merge(cluster_load(&part[0], q), cluster_load(&part[1], q),
                                              SMOOTH ? cluster_load(&part[2], q) : 0.f);
    cluster_arrive();  // this block is done reading the others' shared memory (waited for at the end)
    const CeRow r = ce_row((long long)targets[row], ignore_index, V, all.lse(), row_grad, row, z_loss);
    if (tid == 0) {
        const T* xs = reinterpret_cast<const T*>(slice);
        const long long first = (long long)v0 * VEC, last = first + (long long)nvec * VEC;
        if (r.valid && r.in_range && r.t >= first && r.t < last) {  // this block holds the target
            tgt_out[row] = ce_target_term(apply_softcap<SOFTCAP>(to_f32(xs[r.t - first]), softcap), all.ys,
                                          smoothing, V, SMOOTH);
        } else if (rank == 0 && !(r.valid && r.in_range)) {
            tgt_out[row] = r.valid ? NAN : 0.f;
            if (r.valid) atomicExch(bad_target, 1);
        }
        if (rank == 0) lse_out[row] = r.lse;
    }
    const float q_all = smoothing / (float)V;
    for (int i = tid; i < nvec; i += nt)
        __stcs(xv + i, grad_vector<T, SOFTCAP>(slice[i], (long long)(v0 + i) * VEC, r, softcap, smoothing, q_all));
    cluster_wait();  // no block leaves while another may still read its part[]
}
#endif
