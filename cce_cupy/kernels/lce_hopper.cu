// Hopper (sm_90a) versions of the two kernels that recompute logit tiles: the forward partials
// (online logsumexp) and the backward logit gradient. Same contracts and outputs as the sm_80
// kernels in lce_forward.cu / lce_backward.cu, with a 128 x 256 tile computed by warpgroup MMA
// (wgmma) straight from shared memory, and the epilogue run on the accumulator registers: no
// logit is written to shared or global memory by the forward.
//
// Main loop (hopper_tiles): WGS warpgroups of 128 threads; warpgroup w owns rows [64 w, 64 w + 64)
// of the 64 WGS-row E tile and all 256 columns (C rows) of the tile: one wgmma.m64n256k16 per 16
// of K.
// Operand tiles are K-major, H_BK elements per row, in the swizzle that wgmma descriptors expect
// (see swizzled_offset), each tile 1024-byte aligned. Every thread copies with cp.async (zero-fill past the edges) into a ring of
// H_STAGES stages; the loop runs over (tile, k-block) pairs of all the block's tiles as one
// stream, so the next tile's first k-blocks load while the current tile's epilogue runs.
// Requirements (checked by the launcher): T is bf16 or fp16, D % 8 == 0, 16-byte aligned bases.
//
// Accumulator layout of wgmma m64nNk16 (f32), thread t of warpgroup w, warp q = (t / 32) % 4,
// lane l: acc[4 j + {0, 1, 2, 3}] hold (row, col) = (16 q + l / 4 + {0, 0, 8, 8},
// 8 j + 2 (l % 4) + {0, 1, 0, 1}) of the warpgroup's 64 x 256 tile.
#include "common.cuh"

#define H_BN 256
#ifndef H_FWD_WGS  // warpgroups (64 rows each) of the forward's tile; the backward's is always 2
#define H_FWD_WGS 2
#endif
#ifndef H_BK  // K per stage: 64 (128-byte rows, 128-byte swizzle) or 32 (64-byte rows and swizzle)
#define H_BK 64
#endif
#ifndef H_STAGES
#define H_STAGES 4
#endif
#ifndef H_INFLIGHT  // wgmma groups left in flight at the end of an iteration (0 or 1)
#define H_INFLIGHT 1
#endif
// k-blocks loaded ahead: the stage being refilled must not be read by an MMA still in flight.
#define H_AHEAD (H_STAGES - 1 - H_INFLIGHT)
#define H_ROW_BYTES (H_BK * 2)
// Stage = A tile (64 WGS rows) + B tile (256 rows). +1024: the dynamic shared memory base is only
// 16-byte aligned; the swizzle needs 1024.
__host__ __device__ constexpr int hopper_stage_bytes(int wgs) { return (64 * wgs + H_BN) * H_ROW_BYTES; }
__host__ __device__ constexpr int hopper_smem_bytes(int wgs) { return H_STAGES * hopper_stage_bytes(wgs) + 1024; }

// Byte offset of 16-byte chunk `ch` of row `r` in a swizzled K-major tile: the swizzle XORs the
// chunk index with address bits 7.. (row bits for 128-byte rows, row / 2 for 64-byte rows).
__device__ __forceinline__ int swizzled_offset(int r, int ch) {
    return r * H_ROW_BYTES + ((ch ^ ((r * H_ROW_BYTES >> 7) & (H_ROW_BYTES / 16 - 1))) << 4);
}

// Shared-memory matrix descriptor: start address, leading byte offset (unused by K-major
// swizzled operands), stride byte offset of 8 rows, swizzle mode (1: 128-byte, 2: 64-byte).
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned smem_addr) {
    return (unsigned long long)((smem_addr & 0x3FFFF) >> 4) | ((unsigned long long)1 << 16) |
           ((unsigned long long)((8 * H_ROW_BYTES) >> 4) << 32) |
           ((unsigned long long)(H_ROW_BYTES == 128 ? 1 : 2) << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes go through the generic proxy; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#define WG_F8(b) "+f"(d[b]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), "+f"(d[b + 4]), "+f"(d[b + 5]), \
                 "+f"(d[b + 6]), "+f"(d[b + 7])
#define WG_F128 WG_F8(0), WG_F8(8), WG_F8(16), WG_F8(24), WG_F8(32), WG_F8(40), WG_F8(48), WG_F8(56), \
                WG_F8(64), WG_F8(72), WG_F8(80), WG_F8(88), WG_F8(96), WG_F8(104), WG_F8(112), WG_F8(120)
#define WG_D128                                                                                   \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                       \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"               \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"               \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"               \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"               \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"               \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"   \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"

// d (64 x 256 fp32 per warpgroup) = A (64 x 16, K-major, smem) @ B (16 x 256, K-major, smem)
// (+ d when `accumulate`). Starting a tile with accumulate = 0 instead of zeroing d keeps every
// write of d inside wgmma, so ptxas need not wait on in-flight MMAs to move registers.
template <typename T> struct Wgmma;
template <> struct Wgmma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&d)[128], unsigned long long da, unsigned long long db,
                                               int accumulate) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " WG_D128 ", %128, %129, p, 1, 1, 0, 0;\n}\n"
                     : WG_F128
                     : "l"(da), "l"(db), "r"(accumulate));
    }
};
template <> struct Wgmma<__half> {
    static __device__ __forceinline__ void run(float (&d)[128], unsigned long long da, unsigned long long db,
                                               int accumulate) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " WG_D128 ", %128, %129, p, 1, 1, 0, 0;\n}\n"
                     : WG_F128
                     : "l"(da), "l"(db), "r"(accumulate));
    }
};

// Run the K loop of every 128 x 256 tile with columns [n_begin + 256 i, ...) < n_end of the
// block's rows [m0, m0 + 128), calling epi(n0, acc) after each tile. Rows of E >= N and of C >= V
// and k >= D are zero-filled.
template <typename T, int WGS, typename Epi>
__device__ __forceinline__ void hopper_tiles(const T* __restrict__ e, const T* __restrict__ c, int N, int V, int D,
                                             int m0, int n_begin, int n_end, char* smem_raw, Epi& epi) {
    constexpr int BM = 64 * WGS, THREADS = 128 * WGS;
    constexpr int A_BYTES = BM * H_ROW_BYTES, STAGE_BYTES = hopper_stage_bytes(WGS);
    const int tid = threadIdx.x, wg = tid >> 7;
    char* smem = reinterpret_cast<char*>((reinterpret_cast<size_t>(smem_raw) + 1023) & ~size_t(1023));
    const unsigned smem_base = smem_u32(smem);
    const int KT = (D + H_BK - 1) / H_BK;
    const int ntiles = (n_end - n_begin + H_BN - 1) / H_BN;
    const int total = ntiles * KT;  // (tile, k-block) pairs, loaded as one stream

    // (BM + 256) rows x CH chunks per stage, spread over the threads.
    constexpr int CH = H_ROW_BYTES / 16, CHUNKS = (BM + H_BN) * CH;
    auto load = [&](int it) {
        if (it < total) {
            const int n0 = n_begin + (it / KT) * H_BN, k0 = (it % KT) * H_BK;
            char* sA = smem + (it % H_STAGES) * STAGE_BYTES;
            char* sB = sA + A_BYTES;
#pragma unroll
            for (int i = 0; i < (CHUNKS + THREADS - 1) / THREADS; ++i) {
                const int idx = tid + i * THREADS;
                if (CHUNKS % THREADS != 0 && idx >= CHUNKS) break;
                const bool is_a = idx < BM * CH;
                const int cidx = is_a ? idx : idx - BM * CH;
                const int r = cidx / CH, ch = cidx % CH;
                char* dst = (is_a ? sA : sB) + swizzled_offset(r, ch);
                if (is_a) load_chunk<T, true>(reinterpret_cast<T*>(dst), e, D, m0 + r, k0 + ch * 8, N, D);
                else load_chunk<T, true>(reinterpret_cast<T*>(dst), c, D, n0 + r, k0 + ch * 8, V, D);
            }
        }
        cp_async_commit();  // an empty group past the end keeps the wait counts uniform
    };

    float acc[128];  // written first by the accumulate = 0 MMA of each tile

#pragma unroll
    for (int s = 0; s < H_AHEAD; ++s) load(s);
    for (int tile = 0, it = 0; tile < ntiles; ++tile) {
        for (int kt = 0; kt < KT; ++kt, ++it) {
            cp_async_wait<H_AHEAD - 1>();  // this thread's copies of k-block `it` have landed
            fence_proxy_async();           // ... and are visible to the tensor cores
            __syncthreads();  // every thread's copies of stage `it` are in; every warpgroup has finished
                              // the wgmma of k-block it - 1 - H_INFLIGHT, whose stage we refill
            load(it + H_AHEAD);
            const unsigned sA = smem_base + (it % H_STAGES) * STAGE_BYTES + wg * (64 * H_ROW_BYTES);
            const unsigned sB = smem_base + (it % H_STAGES) * STAGE_BYTES + A_BYTES;
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < H_BK / 16; ++ks)
                Wgmma<T>::run(acc, wgmma_desc(sA + ks * 32), wgmma_desc(sB + ks * 32), (kt != 0) || (ks != 0));
            wgmma_commit();
            wgmma_wait<H_INFLIGHT>();  // with 1: this group runs on while the next barrier is reached
        }
        wgmma_wait<0>();
        epi(n_begin + tile * H_BN, acc);  // reads acc only
    }
    cp_async_wait<0>();
}

// This thread's two rows (local to the 128-row tile) and its column offset within each 8-column group.
__device__ __forceinline__ int hopper_row0() {
    const int tid = threadIdx.x, lane = tid & 31;
    return (tid >> 7) * 64 + ((tid >> 5) & 3) * 16 + (lane >> 2);
}
__device__ __forceinline__ int hopper_col0() { return (threadIdx.x & 3) * 2; }

// ---------------------------------------------------------------------------------------------
// lce_forward_partials_sm90<T, HAS_BIAS, SOFTCAP, SMOOTH>
//   Same arguments and output as lce_forward_partials (lce_forward.cu), with v_per_split a multiple
//   of 256. Grid: (ceil(N / (64 H_FWD_WGS)), splits). Block: 128 H_FWD_WGS threads.
//   Dynamic smem: hopper_smem_bytes(H_FWD_WGS).
//   Each thread keeps a running (max, sum exp, sum y) for its two rows over its own columns; the
//   four threads sharing a row combine once at the end.
// ---------------------------------------------------------------------------------------------
template <bool HAS_BIAS, bool SOFTCAP, bool SMOOTH, typename T> struct ForwardEpilogue {
    const T* bias;
    int v_end;
    float softcap;
    float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.f, 0.f}, run_y[2] = {0.f, 0.f};

    __device__ __forceinline__ float logit(const float (&acc)[128], int i, int col) const {
        float y = acc[i];
        if (HAS_BIAS) y += (col < v_end) ? to_f32(bias[col]) : 0.f;
        y = apply_softcap<SOFTCAP>(y, softcap);
        return (col < v_end) ? y : -INFINITY;  // the next split's columns, or past V
    }

    __device__ __forceinline__ void operator()(int n0, const float (&acc)[128]) {
        const int col0 = n0 + hopper_col0();
        float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < 32; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float y = logit(acc, 4 * j + q, col0 + j * 8 + (q & 1));
                if (SMOOTH && y != -INFINITY) run_y[q >> 1] += y;
                tmax[q >> 1] = fmaxf(tmax[q >> 1], y);
            }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float new_max = fmaxf(run_max[h], tmax[h]);
            // A thread whose columns are all masked keeps max = -inf and sum = 0.
            run_sum[h] = (new_max == -INFINITY) ? 0.f : run_sum[h] * __expf(run_max[h] - new_max);
            run_max[h] = new_max;
        }
#pragma unroll
        for (int j = 0; j < 32; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float y = logit(acc, 4 * j + q, col0 + j * 8 + (q & 1));
                run_sum[q >> 1] += (y == -INFINITY) ? 0.f : __expf(y - run_max[q >> 1]);
            }
    }
};

template <typename T, bool HAS_BIAS, bool SOFTCAP, bool SMOOTH>
__global__ void __launch_bounds__(128 * H_FWD_WGS, 1)
    lce_forward_partials_sm90(const T* __restrict__ e, const T* __restrict__ c, const T* __restrict__ bias,
                              float* __restrict__ part, int N, int V, int D, int v_per_split, float softcap,
                              int aligned) {
    extern __shared__ __align__(16) char smem[];
    const int m0 = blockIdx.x * (64 * H_FWD_WGS);
    const int split = blockIdx.y, splits = gridDim.y;
    const int v_begin = split * v_per_split, v_end = min(V, v_begin + v_per_split);
    ForwardEpilogue<HAS_BIAS, SOFTCAP, SMOOTH, T> epi{bias, v_end, softcap};
    hopper_tiles<T, H_FWD_WGS>(e, c, N, V, D, m0, v_begin, v_end, smem, epi);
    // Combine the four threads (lanes 4k .. 4k+3) that share each row.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float m = epi.run_max[h], s = epi.run_sum[h], y = epi.run_y[h];
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
            const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
            const float mm = fmaxf(m, m2);
            s = (mm == -INFINITY) ? 0.f : s * __expf(m - mm) + s2 * __expf(m2 - mm);
            m = mm;
            if (SMOOTH) y += __shfl_xor_sync(0xffffffffu, y, o);
        }
        const int row = m0 + hopper_row0() + 8 * h;
        if ((threadIdx.x & 3) == 0 && row < N) {
            const i64 stride = (i64)splits * N;
            part[(i64)split * N + row] = m;
            part[stride + (i64)split * N + row] = s;
            part[2 * stride + (i64)split * N + row] = y;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// lce_grad_logits_sm90<T, GT, HAS_BIAS, SOFTCAP, FILTER, TI>
//   Same arguments and output as lce_grad_logits (lce_backward.cu), GT = T (16-bit).
//   Grid: (ceil(N / 128), ceil(Vc / 256)). Block: 256 threads. Dynamic smem: hopper_smem_bytes(2).
//   The gradient tile is stored from registers, 2 elements per store. With FILTER the live flags
//   keep their 128-column granularity: block y writes flag columns 2y and 2y + 1.
// ---------------------------------------------------------------------------------------------
template <typename GT, bool HAS_BIAS, bool SOFTCAP, bool FILTER, typename T, typename TI> struct GradEpilogue {
    const T* bias;
    const TI* targets;
    const float *lse, *coef_p, *coef_q;
    GT* G;
    int N, V, v0, Vc, m0;
    i64 ldg;
    float softcap, smoothing, filter_eps;
    bool live[2] = {false, false};  // per 128-column half of the tile

    __device__ __forceinline__ void operator()(int n0, const float (&acc)[128]) {  // n0 is chunk-relative
        const float smooth_q = smoothing / (float)V;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + hopper_row0() + 8 * h;
            if (row >= N) continue;
            const float l = lse[row], cp = coef_p[row], cq = coef_q[row];
            const long long t = (long long)targets[row] - v0;
            GT* grow = G + (i64)row * ldg;
#pragma unroll
            for (int j = 0; j < 32; ++j) {
                const int col = n0 + j * 8 + hopper_col0();
                float g[2];
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    float z = acc[4 * j + 2 * h + q];
                    if (HAS_BIAS) z += (col + q < Vc) ? to_f32(bias[v0 + col + q]) : 0.f;
                    const float y = apply_softcap<SOFTCAP>(z, softcap);
                    const float p = __expf(y - l);
                    const bool is_t = (t == (long long)(col + q));
                    if (FILTER)
                        live[j >> 4] |= (fabsf(p - (is_t ? 1.f : 0.f)) >= filter_eps) && (cp != 0.f || cq != 0.f);
                    float gq = cp * p - cq * ((is_t ? 1.f - smoothing : 0.f) + smooth_q);
                    if (SOFTCAP) gq *= 1.f - (y / softcap) * (y / softcap);
                    g[q] = gq;
                }
                if (col + 1 < Vc) {
                    GT pair[2] = {from_f32<GT>(g[0]), from_f32<GT>(g[1])};
                    *reinterpret_cast<unsigned*>(grow + col) = *reinterpret_cast<unsigned*>(pair);
                } else if (col < Vc) {
                    grow[col] = from_f32<GT>(g[0]);
                }
            }
        }
    }
};

template <typename T, typename GT, bool HAS_BIAS, bool SOFTCAP, bool FILTER, typename TI>
__global__ void __launch_bounds__(256, 1)
    lce_grad_logits_sm90(const T* __restrict__ e, const T* __restrict__ c, const T* __restrict__ bias,
                         const TI* __restrict__ targets, const float* __restrict__ lse,
                         const float* __restrict__ coef_p, const float* __restrict__ coef_q, GT* __restrict__ G,
                         int* __restrict__ flags, int N, int V, int D, int v0, int Vc, long long ldg,
                         float softcap, float smoothing, float filter_eps, int aligned) {
    extern __shared__ __align__(16) char smem[];
    __shared__ int tile_live[2];
    if (threadIdx.x < 2) tile_live[threadIdx.x] = 0;  // ordered before use by the main loop's barriers
    const int m0 = blockIdx.x * 128, n0 = blockIdx.y * H_BN;
    GradEpilogue<GT, HAS_BIAS, SOFTCAP, FILTER, T, TI> epi{bias, targets, lse, coef_p, coef_q, G, N, V, v0, Vc, m0,
                                                          (i64)ldg, softcap, smoothing, filter_eps};
    // The chunk's C rows start at v0: pass the shifted base, V limit = Vc.
    hopper_tiles<T, 2>(e, c + (i64)v0 * D, N, Vc, D, m0, n0, min(Vc, n0 + H_BN), smem, epi);
    if (FILTER) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
            if (__any_sync(0xffffffffu, epi.live[h]) && (threadIdx.x & 31) == 0) atomicOr(&tile_live[h], 1);
        __syncthreads();  // every warp's liveness is in before thread 0 publishes the flags
        if (threadIdx.x < 2) {
            const int flag_cols = (Vc + 127) / 128, fc = 2 * blockIdx.y + threadIdx.x;
            if (fc < flag_cols) flags[(i64)blockIdx.x * flag_cols + fc] = tile_live[threadIdx.x];
        }
    }
}
