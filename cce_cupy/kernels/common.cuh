// Shared pieces of the cce_cupy kernels: element types, tensor-core fragments, and the tiled
// GEMM main loop that every matmul-shaped kernel builds on.
//
// The main loop computes one BM x BN tile of  A (M x K) @ B (K x N)  in fp32 and leaves it in a
// shared-memory tile (row stride EPI_LD floats), so that each kernel's epilogue (online
// logsumexp, softmax gradient, accumulate-and-store) reads it with a mapping of its own choosing.
// Layouts: A is K-major (A[m][k] at a[m*lda + k]) or M-major (A[m][k] at a[k*lda + m]);
//          B is K-major (B[k][n] at b[n*ldb + k]) or N-major (B[k][n] at b[k*ldb + n]).
// 16-bit types (bf16, fp16) run on mma.sync m16n8k16 with fp32 accumulate; float runs on FFMA
// (exact fp32, no TF32), with the same tile shapes and the same shared-memory epilogue tile.
//
// The tile constants (CCE_BM, CCE_BN, CCE_BK, CCE_STAGES, CCE_THREADS, CCE_SMEM_BYTES, and the H_*
// of lce_hopper.cu) come from the preamble that cce_cupy/cuda/sources.py generates ahead of every
// file, so the launchers use the same numbers.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef long long i64;

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif

static_assert(CCE_BM == 128 && CCE_BN == 128 && CCE_BK == 32 && CCE_THREADS == 256,
              "the main loops' warp layouts are written for 128 x 128 tiles, 32 of K a stage, 8 warps");
#define CCE_EPI_LD (CCE_BN + 4)  // +4 floats: float4 rows stay 16-byte aligned, rows shift banks
#define CCE_EPI_BYTES (CCE_BM * CCE_EPI_LD * 4)
// The dynamic shared memory the launcher gives a block holds the main loop's stages and, aliasing
// them, the epilogue tile.
static_assert(CCE_STAGES * 2 * CCE_BM * CCE_BK * 2 <= CCE_SMEM_BYTES && CCE_EPI_BYTES <= CCE_SMEM_BYTES,
              "CCE_SMEM_BYTES (cce_cupy/cuda/sources.py) is too small for the main loop or the epilogue tile");

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// 16 bytes of T <-> 16 / sizeof(T) floats.
template <typename T> struct Vec16 {
    static constexpr int n = 16 / sizeof(T);
    static __device__ __forceinline__ void unpack(const uint4& u, float (&f)[16 / sizeof(T)]) {
        const T* x = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int k = 0; k < n; ++k) f[k] = to_f32(x[k]);
    }
    static __device__ __forceinline__ uint4 pack(const float (&f)[16 / sizeof(T)]) {
        uint4 u;
        T* x = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int k = 0; k < n; ++k) x[k] = from_f32<T>(f[k]);
        return u;
    }
};

// 8 consecutive elements <-> floats, in 16-byte accesses (p 16-byte aligned).
template <typename T> __device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
    constexpr int n = Vec16<T>::n;
#pragma unroll
    for (int h = 0; h < 8 / n; ++h) {
        float part[n];
        Vec16<T>::unpack(reinterpret_cast<const uint4*>(p)[h], part);
#pragma unroll
        for (int k = 0; k < n; ++k) f[h * n + k] = part[k];
    }
}
template <typename T> __device__ __forceinline__ void store8(T* p, const float (&f)[8]) {
    constexpr int n = Vec16<T>::n;
#pragma unroll
    for (int h = 0; h < 8 / n; ++h) {
        float part[n];
#pragma unroll
        for (int k = 0; k < n; ++k) part[k] = f[h * n + k];
        reinterpret_cast<uint4*>(p)[h] = Vec16<T>::pack(part);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---------------------------------------------------------------------------------------------
// Shared-memory operand tiles. A 16-bit K-major tile is BM rows of BK=32 elements (4 chunks of
// 16 bytes); an MN-major tile is BK rows of 128 elements (16 chunks). Chunks are XOR-swizzled so
// that the 8 row addresses of one ldmatrix hit 8 different 16-byte bank groups.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ int kmajor_offset(int row, int chunk) {  // in 16-byte chunks
    return row * 4 + (chunk ^ ((row >> 1) & 3));
}
__device__ __forceinline__ int mnmajor_offset(int krow, int chunk) {
    return krow * 16 + (chunk ^ (krow & 7));
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; src_bytes < 16 zero-fills the rest (0 for out-of-bounds chunks).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Copy one 16-byte chunk of 8 consecutive elements (along the contiguous dimension) starting at
// element (row, col) of a row-major global matrix with `rows` x `cols` valid elements.
// ALIGNED: the leading dimension and base are 16-byte aligned, so cp.async can be used; otherwise
// elements are loaded one by one (D not a multiple of 8, or an odd offset view).
template <typename T, bool ALIGNED>
__device__ __forceinline__ void load_chunk(T* dst, const T* base, i64 ld, int row, int col, int rows,
                                           int cols) {
    if (ALIGNED) {
        int n = (row < rows) ? max(0, min(8, cols - col)) : 0;
        const T* src = n > 0 ? base + (i64)row * ld + col : base;
        cp_async16(dst, src, n * (int)sizeof(T));
    } else {
        T tmp[8];
#pragma unroll
        for (int i = 0; i < 8; ++i)
            tmp[i] = (row < rows && col + i < cols) ? base[(i64)row * ld + col + i] : from_f32<T>(0.f);
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<uint4*>(tmp);
    }
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

// d (16 x 8 fp32) += a (16 x 16) @ b (16 x 8), both of T. One definition; each input type
// instantiates it with its PTX type name (asm needs a string literal).
template <typename T> struct Mma;
#define CCE_MMA_M16N8K16(T, PTX_TYPE)                                                                    \
    template <> struct Mma<T> {                                                                         \
        static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4], unsigned b0,  \
                                                   unsigned b1) {                                       \
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE                 \
                         ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                 \
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                               \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));               \
        }                                                                                               \
    };
CCE_MMA_M16N8K16(__nv_bfloat16, "bf16")
CCE_MMA_M16N8K16(__half, "f16")
#undef CCE_MMA_M16N8K16

// Problem description of one tile GEMM. Offsets m0/n0 select the tile; the kernel's caller has
// already shifted a/b to the sub-matrix it works on.
template <typename T> struct GemmArgs {
    const T* a;
    const T* b;
    i64 lda, ldb;
    int M, N, K;
};

// ---------------------------------------------------------------------------------------------
// 16-bit tensor-core main loop. 8 warps as 2 (M) x 4 (N); each warp owns a 64 x 32 sub-tile as
// 4 x 4 mma tiles of 16 x 8. `kskip(kt)` says whether K-block kt (of BK) can be skipped: its A
// rows are all zero (gradient filtering). Leaves the fp32 tile in `epi` (BM x CCE_EPI_LD).
// ---------------------------------------------------------------------------------------------
template <typename T, bool A_KMAJOR, bool B_KMAJOR, bool ALIGNED, typename KSkip>
__device__ void gemm_tile_mma(const GemmArgs<T>& g, int m0, int n0, char* smem, float* epi,
                              KSkip kskip) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    uint4* sA = reinterpret_cast<uint4*>(smem);
    uint4* sB = sA + CCE_STAGES * (CCE_BM * CCE_BK / 8);
    constexpr int STAGE_CHUNKS = CCE_BM * CCE_BK / 8;  // 512 16-byte chunks per operand tile

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

    const int ktiles = (g.K + CCE_BK - 1) / CCE_BK;

    // Each thread copies 2 chunks of A and 2 of B per stage.
    auto load_stage = [&](int stage, int kt) {
        const int k0 = kt * CCE_BK;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = tid + i * CCE_THREADS;
            if (A_KMAJOR) {  // 128 rows (m) x 4 chunks (k)
                const int r = c >> 2, ch = c & 3;
                load_chunk<T, ALIGNED>(reinterpret_cast<T*>(sA + stage * STAGE_CHUNKS + kmajor_offset(r, ch)),
                                       g.a, g.lda, m0 + r, k0 + ch * 8, g.M, g.K);
            } else {  // 32 rows (k) x 16 chunks (m)
                const int r = c >> 4, ch = c & 15;
                load_chunk<T, ALIGNED>(reinterpret_cast<T*>(sA + stage * STAGE_CHUNKS + mnmajor_offset(r, ch)),
                                       g.a, g.lda, k0 + r, m0 + ch * 8, g.K, g.M);
            }
            if (B_KMAJOR) {
                const int r = c >> 2, ch = c & 3;
                load_chunk<T, ALIGNED>(reinterpret_cast<T*>(sB + stage * STAGE_CHUNKS + kmajor_offset(r, ch)),
                                       g.b, g.ldb, n0 + r, k0 + ch * 8, g.N, g.K);
            } else {
                const int r = c >> 4, ch = c & 15;
                load_chunk<T, ALIGNED>(reinterpret_cast<T*>(sB + stage * STAGE_CHUNKS + mnmajor_offset(r, ch)),
                                       g.b, g.ldb, k0 + r, n0 + ch * 8, g.K, g.N);
            }
        }
    };

    // Software pipeline: STAGES-1 K-blocks in flight ahead of the one being multiplied.
    // Skipped K-blocks are neither loaded nor multiplied; the list of live blocks is walked with
    // `next_live`, so skipping costs nothing but the flag reads.
    auto next_live = [&](int kt) {
        while (kt < ktiles && kskip(kt)) ++kt;
        return kt;
    };
    int kload = next_live(0);
#pragma unroll
    for (int s = 0; s < CCE_STAGES - 1; ++s) {
        if (kload < ktiles) {
            load_stage(s, kload);
            kload = next_live(kload + 1);
        }
        cp_async_commit();
    }
    int stage = 0;
    for (int kt = next_live(0); kt < ktiles; kt = next_live(kt + 1)) {
        cp_async_wait<CCE_STAGES - 2>();
        __syncthreads();  // this stage's copies (all threads') are visible; the stage we are
                          // about to refill has been read by every warp in the last iteration
        {
            const int ls = (stage + CCE_STAGES - 1) % CCE_STAGES;
            if (kload < ktiles) {
                load_stage(ls, kload);
                kload = next_live(kload + 1);
            }
            cp_async_commit();
        }
        const uint4* tA = sA + stage * STAGE_CHUNKS;
        const uint4* tB = sB + stage * STAGE_CHUNKS;
#pragma unroll
        for (int ks = 0; ks < CCE_BK / 16; ++ks) {
            unsigned af[4][4], bf[2][4];
            const int mi = lane >> 3, r8 = lane & 7;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if (A_KMAJOR) {  // matrices: (rows 0-7,k lo) (rows 8-15,k lo) (0-7,k hi) (8-15,k hi)
                    const int row = wm + i * 16 + r8 + (mi & 1) * 8, ch = ks * 2 + (mi >> 1);
                    ldmatrix_x4(af[i], tA + kmajor_offset(row, ch));
                } else {  // smem rows are k; .trans hands each thread A[m][k..k+1]
                    const int krow = ks * 16 + r8 + (mi >> 1) * 8, ch = (wm + i * 16) / 8 + (mi & 1);
                    ldmatrix_x4_trans(af[i], tA + mnmajor_offset(krow, ch));
                }
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {  // each x4 covers two n8 tiles: (n lo,k lo)(n lo,k hi)(n hi,k lo)(n hi,k hi)
                if (B_KMAJOR) {
                    const int row = wn + j * 16 + r8 + (mi >> 1) * 8, ch = ks * 2 + (mi & 1);
                    ldmatrix_x4(bf[j], tB + kmajor_offset(row, ch));
                } else {
                    const int krow = ks * 16 + r8 + (mi & 1) * 8, ch = (wn + j * 16) / 8 + (mi >> 1);
                    ldmatrix_x4_trans(bf[j], tB + mnmajor_offset(krow, ch));
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    Mma<T>::run(acc[i][j], af[i], bf[j >> 1][(j & 1) * 2], bf[j >> 1][(j & 1) * 2 + 1]);
        }
        stage = (stage + 1) % CCE_STAGES;
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done reading operand tiles before the epilogue tile aliases them
    const int g4 = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = wm + i * 16 + g4, c = wn + j * 8 + t4 * 2;
            *reinterpret_cast<float2*>(&epi[r * CCE_EPI_LD + c]) = make_float2(acc[i][j][0], acc[i][j][1]);
            *reinterpret_cast<float2*>(&epi[(r + 8) * CCE_EPI_LD + c]) = make_float2(acc[i][j][2], acc[i][j][3]);
        }
    __syncthreads();  // the tile is complete before any thread's epilogue reads it
}

// ---------------------------------------------------------------------------------------------
// fp32 main loop on FFMA: exact fp32 products and sums. Operand tiles are stored k-major in shared
// memory as [BK][BM] floats (transposed on the way in), each thread computes an 8 x 8 micro-tile
// (rows ty*4 + {0..3, 64..67}, likewise for columns, so the shared reads are float4 and conflict-free).
// ---------------------------------------------------------------------------------------------
template <bool A_KMAJOR, bool B_KMAJOR, typename KSkip>
__device__ void gemm_tile_fp32(const GemmArgs<float>& g, int m0, int n0, char* smem, float* epi,
                               KSkip kskip) {
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    float* sA = reinterpret_cast<float*>(smem);  // [BK][BM]
    float* sB = sA + CCE_BK * CCE_BM;            // [BK][BN]
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    const int ktiles = (g.K + CCE_BK - 1) / CCE_BK;
    for (int kt = 0; kt < ktiles; ++kt) {
        if (kskip(kt)) continue;
        const int k0 = kt * CCE_BK;
        __syncthreads();  // the previous K-block's tiles have been read by all threads
        for (int idx = tid; idx < CCE_BK * CCE_BM; idx += CCE_THREADS) {
            int m, k;
            if (A_KMAJOR) { m = idx / CCE_BK; k = idx % CCE_BK; } else { k = idx / CCE_BM; m = idx % CCE_BM; }
            const int gm = m0 + m, gk = k0 + k;
            sA[k * CCE_BM + m] = (gm < g.M && gk < g.K)
                ? (A_KMAJOR ? g.a[(i64)gm * g.lda + gk] : g.a[(i64)gk * g.lda + gm]) : 0.f;
            int n, kb;
            if (B_KMAJOR) { n = idx / CCE_BK; kb = idx % CCE_BK; } else { kb = idx / CCE_BN; n = idx % CCE_BN; }
            const int gn = n0 + n, gkb = k0 + kb;
            sB[kb * CCE_BN + n] = (gn < g.N && gkb < g.K)
                ? (B_KMAJOR ? g.b[(i64)gn * g.ldb + gkb] : g.b[(i64)gkb * g.ldb + gn]) : 0.f;
        }
        __syncthreads();  // tiles complete before the products read them
#pragma unroll 4
        for (int k = 0; k < CCE_BK; ++k) {
            float a[8], b[8];
            *reinterpret_cast<float4*>(&a[0]) = *reinterpret_cast<const float4*>(&sA[k * CCE_BM + ty * 4]);
            *reinterpret_cast<float4*>(&a[4]) = *reinterpret_cast<const float4*>(&sA[k * CCE_BM + 64 + ty * 4]);
            *reinterpret_cast<float4*>(&b[0]) = *reinterpret_cast<const float4*>(&sB[k * CCE_BN + tx * 4]);
            *reinterpret_cast<float4*>(&b[4]) = *reinterpret_cast<const float4*>(&sB[k * CCE_BN + 64 + tx * 4]);
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
    }
    __syncthreads();  // operand tiles are dead before the epilogue tile aliases them
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int r = (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
        *reinterpret_cast<float4*>(&epi[r * CCE_EPI_LD + tx * 4]) =
            make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        *reinterpret_cast<float4*>(&epi[r * CCE_EPI_LD + 64 + tx * 4]) =
            make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
    }
    __syncthreads();  // the tile is complete before any thread's epilogue reads it
}

// One entry point for all element types: fp32 goes to FFMA, 16-bit types to tensor cores.
template <typename T, bool A_KMAJOR, bool B_KMAJOR, bool ALIGNED, typename KSkip>
__device__ __forceinline__ void gemm_tile(const GemmArgs<T>& g, int m0, int n0, char* smem, float* epi,
                                          KSkip kskip) {
    if constexpr (sizeof(T) == 4) {
        gemm_tile_fp32<A_KMAJOR, B_KMAJOR>(g, m0, n0, smem, epi, kskip);
    } else {
        gemm_tile_mma<T, A_KMAJOR, B_KMAJOR, ALIGNED>(g, m0, n0, smem, epi, kskip);
    }
}

struct NoSkip {
    __device__ __forceinline__ bool operator()(int) const { return false; }
};

// Thread-block cluster primitives (sm_90; only called from code built for it).
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }
// The shared::cluster address of `p` (a shared-memory address of this block) in block `rank`.
__device__ __forceinline__ unsigned cluster_addr(const void* p, unsigned rank) {
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_u32(p)), "r"(rank));
    return remote;
}
// The float at `p` in block `rank` of the cluster.
__device__ __forceinline__ float cluster_load(const float* p, unsigned rank) {
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(cluster_addr(p, rank)) : "memory");
    return v;
}

// The tiled backward's kernels can be launched as the fallback of the sparse one, to run only if
// the sparse recompute overflowed (a device flag: no host synchronization). run_if: null (always
// run) or that flag; the kernel does nothing while it is 0.
__device__ __forceinline__ bool not_requested(const int* run_if) { return run_if != nullptr && *run_if == 0; }

// Softcap and its derivative: y = s * tanh(z / s), dy/dz = 1 - tanh^2(z / s).
template <bool SOFTCAP> __device__ __forceinline__ float apply_softcap(float z, float s) {
    if constexpr (SOFTCAP) return s * tanhf(z / s);
    else return z;
}
// dy/dz as 4 u / (1 + u)^2 with u = exp(-2 |z / s|): keeps its relative accuracy where tanh
// saturates, which 1 - (y / s)^2 loses (at |z / s| = 5 that form is off by ~1e-3 in fp32, and the
// target logit, the largest gradient element, is the one that sits there).
__device__ __forceinline__ float softcap_grad(float z, float s) {
    const float u = __expf(-2.f * fabsf(z / s)), d = 1.f + u;
    return 4.f * u / (d * d);
}
