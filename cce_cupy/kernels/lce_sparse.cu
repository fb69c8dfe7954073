// Filtered backward on a sparse logit gradient, steps 2-5 (step 1, lce_grad_sparse_sm90 in
// lce_hopper.cu, recomputes the logits and keeps each row's non-negligible gradient elements).
//
// Row lists:    entries[i * slots + k] = (column j, g_ij as float bits), k < row_count[i].
// Column lists: by_col[col_start[j] + k] = (row i, g_ij as float bits), k < col_start[j + 1] - col_start[j].
// dE and dC are then sums over the lists: O(nonzeros x D) work instead of two N x V x D GEMMs,
// and every element of dE, dC (and dbias) is written exactly once (empty lists write zeros).
// Every kernel returns at once when *overflow is set: some row had more than `slots` elements,
// its list is incomplete, and the launcher runs the tiled (dense-chunk) backward instead.
// D % 8 == 0 and 16-byte aligned E, C, dE, dC (the Hopper path's requirements) are assumed.
//
// sparse_count_cols:   col_count[j] = number of entries of column j (col_count starts at 0).
//                      Grid ceil(N / 8), 256 threads: one warp per row.
// sparse_scan_cols:    col_start[j] = sum of col_count[j'] for j' < j, for j in [0, V].
//                      One block of 1024 threads, each a contiguous run of columns.
// sparse_scatter_cols: by_col from the row lists; counts col_count back down to 0. Grid as count.
// sparse_grad_rows<T, GT>:            dE[i] = sum_k g_ik C[j_k].     Grid N, 128 threads.
// sparse_grad_cols<T, GT, HAS_BIAS>:  dC[j] = sum_k g_kj E[i_k], dbias[j] = sum_k g_kj.  Grid V,
//                                     128 threads. Each thread owns 8 consecutive elements of D
//                                     per step: 16-byte loads of the gathered rows and stores.
// Atomics order the list entries, so the float sums are not bitwise reproducible run to run
// (deterministic=True uses the tiled backward).
#include "common.cuh"

#define SPARSE_SCAN_THREADS 1024

__global__ void sparse_count_cols(const int2* __restrict__ entries, const int* __restrict__ row_count,
                                  int* __restrict__ col_count, const int* __restrict__ overflow, int N, int slots) {
    if (*overflow) return;
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= N) return;
    const int n = row_count[row];
    for (int k = threadIdx.x & 31; k < n; k += 32) atomicAdd(col_count + entries[(i64)row * slots + k].x, 1);
}

__global__ void __launch_bounds__(SPARSE_SCAN_THREADS)
    sparse_scan_cols(const int* __restrict__ col_count, int* __restrict__ col_start,
                     const int* __restrict__ overflow, int V) {
    __shared__ int run_total[SPARSE_SCAN_THREADS];
    if (*overflow) return;
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
                                    int2* __restrict__ by_col, const int* __restrict__ overflow, int N, int slots) {
    if (*overflow) return;
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= N) return;
    const int n = row_count[row];
    for (int k = threadIdx.x & 31; k < n; k += 32) {
        const int2 en = entries[(i64)row * slots + k];
        const int pos = col_start[en.x] + atomicSub(col_count + en.x, 1) - 1;
        by_col[pos] = make_int2(row, en.y);
    }
}

// out[d0 .. d0 + 8) of sum_k g_k src[idx_k] for the (idx, g) pairs list[0 .. n).
template <typename T>
__device__ __forceinline__ void gather_sum8(const T* __restrict__ src, int D, const int2* __restrict__ list, int n,
                                            int d0, float (&acc)[8]) {
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[q] = 0.f;
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
                     const int* __restrict__ overflow, GT* __restrict__ de, int D, int slots) {
    if (*overflow) return;
    const int row = blockIdx.x;
    const int n = row_count[row];
    const int2* list = entries + (i64)row * slots;
    for (int d0 = threadIdx.x * 8; d0 < D; d0 += blockDim.x * 8) {
        float acc[8];
        gather_sum8(c, D, list, n, d0, acc);
        store8(de + (i64)row * D + d0, acc);
    }
}

template <typename T, typename GT, bool HAS_BIAS>
__global__ void __launch_bounds__(128)
    sparse_grad_cols(const T* __restrict__ e, const int2* __restrict__ by_col, const int* __restrict__ col_start,
                     const int* __restrict__ overflow, GT* __restrict__ dc, GT* __restrict__ dbias, int D) {
    if (*overflow) return;
    const int col = blockIdx.x;
    const int k0 = col_start[col], n = col_start[col + 1] - k0;
    const int2* list = by_col + k0;
    for (int d0 = threadIdx.x * 8; d0 < D; d0 += blockDim.x * 8) {
        float acc[8];
        gather_sum8(e, D, list, n, d0, acc);
        store8(dc + (i64)col * D + d0, acc);
    }
    if (HAS_BIAS && threadIdx.x == 0) {
        float s = 0.f;
        for (int k = 0; k < n; ++k) s += __int_as_float(list[k].y);
        dbias[col] = from_f32<GT>(s);
    }
}
