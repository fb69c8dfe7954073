// Certified filtered backward on a sparse logit gradient, the steps after lce_grad_sparse_sm90
// (lce_hopper.cu), which recomputes the logits, keeps each row's candidate gradient elements as a
// list and sums each row's dropped softmax mass. docs/design.md, "Certified filtering".
//
// Row lists:    entries[i * slots + k] = (column j, g_ij as float bits), k < row_count[i].
// Column lists: by_col[col_start[j] + k] = (row i, g_ij as float bits), k < col_start[j + 1] - col_start[j].
// sparse_certify_rows decides per row whether its list may stand for its gradient; a row that may
// not (or whose list overflowed) gets row_count[i] = -1, so that the later kernels skip it, and is
// appended to fallback_rows for the exact path. dE and dC of the certified rows are then sums over
// the lists: O(nonzeros x D) work instead of two N x V x D GEMMs.
// D % 8 == 0 and 16-byte aligned E, C, dE, dC (the Hopper path's requirements) are assumed.
//
// sparse_certify_rows:       per row, see below. Grid ceil(N / 8), 256 threads: one warp per row.
// sparse_prune_lists<SOFTCAP, TI>: the lists a LISTS forward collected, made the above (see below).
// sparse_weighted_colsum<T>: out[d] += sum_i w_i src[i, d] (w_i = 1 without weights), out[D] +=
//                            sum_i w_i. Grid (ceil(D / 256), ceil(rows / rows_per_block)), 256
//                            threads: thread d of block (x, y) sums rows [y rows_per_block, ...).
// sparse_count_cols:   col_count[j] = number of entries of column j (col_count starts at 0).
//                      Grid ceil(N / 8), 256 threads: one warp per row.
// sparse_scan_cols:    col_start[j] = sum of col_count[j'] for j' < j, for j in [0, V].
//                      One block of 1024 threads, each a contiguous run of columns.
// sparse_scatter_cols: by_col from the row lists; counts col_count back down to 0. Grid as count.
// sparse_grad_rows<T, GT>:            dE[i] = sum_k g_ik C[j_k] (+ smoothing), certified rows only.
//                                     Grid N, 128 threads.
// sparse_grad_cols<T, GT, HAS_BIAS>:  dC[j] (+)= sum_k g_kj E[i_k] (+ smoothing), dbias[j] likewise.
//                                     Grid V, 128 threads.
// In the two sums each thread owns 8 consecutive elements of D per step: 16-byte loads of the
// gathered rows and stores. Smoothing without softcap (smooth_* non-null): every certified row's
// dropped columns keep the constant -coef_q ls / V of their gradient, added as rank-one terms:
// dE[i] += smooth_scale coef_q[i] sum_j C[j], dC[j] += smooth_scale sum_{i certified} coef_q[i] E[i],
// dbias[j] += smooth_scale sum_{i certified} coef_q[i], smooth_scale = -ls / V (the entries leave
// the constant out, see lce_grad_sparse_sm90).
// Atomics order the list entries, so the float sums are not bitwise reproducible run to run
// (deterministic=True runs the exact backward).
#include "common.cuh"

#define SPARSE_SCAN_THREADS 1024

// sparse_certify_rows: row i with coefficients (cp, cq), list of n = row_count[i] entries:
//   lower = sum_k |g_k - smooth_entry cq|          (a lower bound of ||g_i||_1: its kept part;
//                                                   smooth_entry = ls / V where entries omit it)
//   bound = |cp| dropped[i] + smooth_bound |cq| (V - n) / V   (the dropped part's L1 norm, at most;
//                                                   smooth_bound = ls with softcap, else 0)
//   certified iff the row has no gradient (cp = cq = 0), or 1 <= n <= slots and (bound == 0 or
//   bound (1 + margin) <= tol lower); NaN: not.
// Outputs: uncertified rows get row_count[i] = -1 and a place in fallback_rows (via the counter
// *fallback, which starts at 0); fb_coef_p/q = the coefficients of uncertified rows, 0 for
// certified ones (the device-side exact pass); cert_q = coef_q of certified rows, 0 for others.
__global__ void sparse_certify_rows(const int2* __restrict__ entries, int* __restrict__ row_count,
                                    const float* __restrict__ dropped, const float* __restrict__ coef_p,
                                    const float* __restrict__ coef_q, int* __restrict__ fallback,
                                    int* __restrict__ fallback_rows, float* __restrict__ fb_coef_p,
                                    float* __restrict__ fb_coef_q, float* __restrict__ cert_q, int N, int V,
                                    int slots, float tol, float margin, float smooth_entry, float smooth_bound) {
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= N) return;
    const int n = row_count[row];
    const float cp = coef_p[row], cq = coef_q[row];
    const float shift = smooth_entry * cq;
    float lower = 0.f;
    if (n <= slots)
        for (int k = lane; k < n; k += 32) lower += fabsf(__int_as_float(entries[(i64)row * slots + k].y) - shift);
    lower = warp_sum(lower);  // also orders every lane's read of row_count before lane 0 rewrites it
    const float bound = fabsf(cp) * dropped[row] + smooth_bound * fabsf(cq) * (float)(V - min(n, V)) / (float)V;
    // A row with a gradient has its target in the list (n >= 1), unless the list was never
    // collected (the forward's lists skip rows with threshold +inf and leave their other mass unsummed).
    const bool no_gradient = cp == 0.f && cq == 0.f;
    const bool certified =
        no_gradient || (n >= 1 && n <= slots && (bound == 0.f || bound * (1.f + margin) <= tol * lower));
    if (lane != 0) return;
    fb_coef_p[row] = certified ? 0.f : cp;
    fb_coef_q[row] = certified ? 0.f : cq;
    cert_q[row] = certified ? cq : 0.f;
    if (!certified) {
        row_count[row] = -1;
        fallback_rows[atomicAdd(fallback, 1)] = row;
    }
}

// sparse_prune_lists<SOFTCAP, TI>: the lists of a LISTS forward (lce_forward_partials_sm90), finished
//   against the row's lse l into what lce_grad_sparse_sm90 would have built. Row i, n = row_count[i]
//   candidates (j, y_ij as float bits):
//     kept (j is the target t_i, or y_ij >= l + log_eps: p_ij >= eps) become (j, g_ij), compacted
//       to the list's front, g_ij as lce_grad_sparse_sm90's (smooth_t = 1 - ls, smooth_all = ls / V
//       with SOFTCAP, else 0); row_count[i] = their number;
//     the others' p_ij go to dropped[i], which also gets the forward's other mass
//       sum_s dpart[s * N + i] exp(pmax[s * N + i] - l)    (splits s; pmax: the partials' max).
//   A row whose list overflowed (n > slots) keeps its count (sparse_certify_rows rejects it) and
//   gets dropped = 0. softcap'(z) = 1 - (y / softcap)^2 from y (the list holds y, not z).
//   Grid ceil(N / 8), 256 threads: one warp per row.
template <bool SOFTCAP, typename TI>
__global__ void sparse_prune_lists(int2* __restrict__ entries, int* __restrict__ row_count, float* __restrict__ dropped,
                                   const float* __restrict__ dpart, const float* __restrict__ pmax, int splits,
                                   const float* __restrict__ lse, const float* __restrict__ coef_p,
                                   const float* __restrict__ coef_q, const TI* __restrict__ targets, int N, int slots,
                                   float log_eps, float softcap, float smooth_t, float smooth_all) {
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= N) return;
    const int n = row_count[row];
    const float l = lse[row], cp = coef_p[row], cq = coef_q[row];
    float other = 0.f;
    if (n <= slots) {
        for (int s = lane; s < splits; s += 32) {
            const float d = dpart[(i64)s * N + row];
            if (d != 0.f) other += d * expf(pmax[(i64)s * N + row] - l);
        }
        const long long t = (long long)targets[row];
        const float threshold = l + log_eps;
        int2* list = entries + (i64)row * slots;
        int kept = 0;
        for (int base = 0; base < n; base += 32) {  // in order: a chunk is read before any write reaches it
            const int k = base + lane;
            int2 entry = k < n ? list[k] : make_int2(0, 0);
            const float y = __int_as_float(entry.y);
            const bool is_t = (long long)entry.x == t;
            const bool keep = k < n && (y >= threshold || is_t);
            if (k < n && !keep) other += expf(y - l);
            const unsigned keeps = __ballot_sync(0xffffffffu, keep);
            if (keep) {
                float g = cp * expf(y - l) - cq * ((is_t ? smooth_t : 0.f) + smooth_all);
                if (SOFTCAP) {
                    const float r = y / softcap;
                    g *= (1.f - r) * (1.f + r);
                }
                list[kept + __popc(keeps & ((1u << lane) - 1))] = make_int2(entry.x, __float_as_int(g));
            }
            kept += __popc(keeps);
        }
        other = warp_sum(other);  // also orders every lane's read of row_count before lane 0 rewrites it
        if (lane == 0) row_count[row] = kept;
    }
    if (lane == 0) dropped[row] = (n <= slots) ? other : 0.f;
}

template <typename T>
__global__ void sparse_weighted_colsum(const T* __restrict__ src, const float* __restrict__ weights, int rows, int D,
                                       int rows_per_block, float* __restrict__ out) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_block, r1 = min(rows, r0 + rows_per_block);
    if (d < D) {
        float s = 0.f;
        for (int r = r0; r < r1; ++r) s = fmaf(weights ? weights[r] : 1.f, to_f32(src[(i64)r * D + d]), s);
        atomicAdd(out + d, s);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        float w = 0.f;
        for (int r = r0; r < r1; ++r) w += weights ? weights[r] : 1.f;
        atomicAdd(out + D, w);
    }
}

__global__ void sparse_count_cols(const int2* __restrict__ entries, const int* __restrict__ row_count,
                                  int* __restrict__ col_count, int N, int slots) {
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= N) return;
    const int n = row_count[row];  // -1 for the exact path's rows: nothing
    for (int k = threadIdx.x & 31; k < n; k += 32) atomicAdd(col_count + entries[(i64)row * slots + k].x, 1);
}

__global__ void __launch_bounds__(SPARSE_SCAN_THREADS)
    sparse_scan_cols(const int* __restrict__ col_count, int* __restrict__ col_start, int V) {
    __shared__ int run_total[SPARSE_SCAN_THREADS];
    const int tid = threadIdx.x;
    const int per = (V + SPARSE_SCAN_THREADS - 1) / SPARSE_SCAN_THREADS;
    const int j0 = min(V, tid * per), j1 = min(V, j0 + per);
    int sum = 0;
    for (int j = j0; j < j1; ++j) sum += col_count[j];
    run_total[tid] = sum;
    __syncthreads();
    for (int off = 1; off < SPARSE_SCAN_THREADS; off <<= 1) {  // inclusive scan of the run totals
        const int x = tid >= off ? run_total[tid - off] : 0;
        __syncthreads();
        run_total[tid] += x;
        __syncthreads();
    }
    int start = run_total[tid] - sum;
    for (int j = j0; j < j1; ++j) {
        col_start[j] = start;
        start += col_count[j];
    }
    if (tid == SPARSE_SCAN_THREADS - 1) col_start[V] = run_total[tid];
}

__global__ void sparse_scatter_cols(const int2* __restrict__ entries, const int* __restrict__ row_count,
                                    int* __restrict__ col_count, const int* __restrict__ col_start,
                                    int2* __restrict__ by_col, int N, int slots) {
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= N) return;
    const int n = row_count[row];
    for (int k = threadIdx.x & 31; k < n; k += 32) {
        const int2 en = entries[(i64)row * slots + k];
        const int pos = col_start[en.x] + atomicSub(col_count + en.x, 1) - 1;
        by_col[pos] = make_int2(row, en.y);
    }
}

// acc[0 .. 8) += sum_k g_k src[idx_k][d0 .. d0 + 8) for the (idx, g) pairs list[0 .. n).
template <typename T>
__device__ __forceinline__ void gather_sum8(const T* __restrict__ src, int D, const int2* __restrict__ list, int n,
                                            int d0, float (&acc)[8]) {
    for (int k = 0; k < n; ++k) {
        const int2 en = list[k];
        float x[8];
        load8(src + (i64)en.x * D + d0, x);
        const float g = __int_as_float(en.y);
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] = fmaf(g, x[q], acc[q]);
    }
}

template <typename T, typename GT>
__global__ void __launch_bounds__(128)
    sparse_grad_rows(const T* __restrict__ c, const int2* __restrict__ entries, const int* __restrict__ row_count,
                     const float* __restrict__ coef_q, const float* __restrict__ smooth_c, float smooth_scale,
                     GT* __restrict__ de, int D, int slots) {
    const int row = blockIdx.x;
    const int n = row_count[row];
    if (n < 0) return;  // an uncertified row: the exact path writes it
    const int2* list = entries + (i64)row * slots;
    const float smooth = smooth_c ? smooth_scale * coef_q[row] : 0.f;
    for (int d0 = threadIdx.x * 8; d0 < D; d0 += blockDim.x * 8) {
        float acc[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] = smooth_c ? smooth * smooth_c[d0 + q] : 0.f;
        gather_sum8(c, D, list, n, d0, acc);
        store8(de + (i64)row * D + d0, acc);
    }
}

// accumulate_if: null (overwrite dC, dbias) or a device flag: add to them while it is nonzero (the
// exact pass of the uncertified rows wrote them first).
template <typename T, typename GT, bool HAS_BIAS>
__global__ void __launch_bounds__(128)
    sparse_grad_cols(const T* __restrict__ e, const int2* __restrict__ by_col, const int* __restrict__ col_start,
                     const float* __restrict__ smooth_w, float smooth_scale, const int* __restrict__ accumulate_if,
                     GT* __restrict__ dc, GT* __restrict__ dbias, int D) {
    const int col = blockIdx.x;
    const int k0 = col_start[col], n = col_start[col + 1] - k0;
    const int2* list = by_col + k0;
    const bool add = accumulate_if != nullptr && *accumulate_if != 0;
    for (int d0 = threadIdx.x * 8; d0 < D; d0 += blockDim.x * 8) {
        float acc[8];
        if (add) load8(dc + (i64)col * D + d0, acc);
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] = (add ? acc[q] : 0.f) + (smooth_w ? smooth_scale * smooth_w[d0 + q] : 0.f);
        gather_sum8(e, D, list, n, d0, acc);
        store8(dc + (i64)col * D + d0, acc);
    }
    if (HAS_BIAS && threadIdx.x == 0) {
        float s = (add ? to_f32(dbias[col]) : 0.f) + (smooth_w ? smooth_scale * smooth_w[D] : 0.f);
        for (int k = 0; k < n; ++k) s += __int_as_float(list[k].y);
        dbias[col] = from_f32<GT>(s);
    }
}
