// Hopper (sm_90a) versions of the two kernels that recompute logit tiles: the forward partials
// (online logsumexp) and the backward logit gradient. Same contracts and outputs as the sm_80
// kernels in lce_forward.cu / lce_backward.cu, with a 128 x 256 tile computed by warpgroup MMA
// (wgmma) straight from shared memory, and the epilogue run on the accumulator registers: no
// logit is written to shared or global memory by the forward.
//
// Main loop (hopper_tiles_ws): three warpgroups. Consumer warpgroup w (threads 128 + 128 w ..)
// owns rows [64 w, 64 w + 64) of the 128-row E tile and all 256 columns (C rows) of the tile: one
// wgmma.m64n256k16 per 16 of K. One thread of the producer warpgroup (threads 0-127, which give
// their registers to the consumers through setmaxnreg) feeds a ring of H_STAGES stages with TMA
// bulk tensor copies; full/empty mbarriers per stage hand stages over, and no block-wide barrier
// runs in the loop. Blocks run in clusters of CLUSTER (a template parameter, 1 or 2, picked per
// shape by cce_cupy.cuda.autotune) consecutive row blocks that share each stage's C tile through
// TMA multicast: each loads 256 / CLUSTER rows of it and multicasts them to all, which cuts the
// L2 -> SM traffic per block from 48 to 32 KiB a stage at CLUSTER 2 but ties blocks in pairs to
// one GPC. The launcher rounds grid.x up to a multiple of CLUSTER. Operand tiles are K-major,
// 128 bytes (64 16-bit or 32 fp32 elements) per row, 128-byte swizzled (see wgmma_desc), each
// 1024-byte aligned. The loop runs over the (tile, k-block) pairs of all the block's tiles as one
// stream, so the next tile's first k-blocks load during an epilogue. The forward with STORE ROW
// (and D >= 256) splits each warpgroup's 64 x 256 tile into two 64 x 128 halves, one
// wgmma.m64n128k16 each per 16 of K, ordered so that one half's epilogue runs under the other
// half's MMAs (hopper_consume_halves); every other kernel takes whole tiles (hopper_consume_tiles).
// Requirements (checked by the launcher): T is bf16 or fp16 (or fp32 for the forward, as TF32, only
// with allow_tf32), D * sizeof(T) % 16 == 0, 16-byte aligned bases (TMA's stride and address rules).
//
// Accumulator layout of wgmma m64nNk16 (f32), thread t of warpgroup w, warp q = (t / 32) % 4,
// lane l: acc[4 j + {0, 1, 2, 3}] hold (row, col) = (16 q + l / 4 + {0, 0, 8, 8},
// 8 j + 2 (l % 4) + {0, 1, 0, 1}) of the warpgroup's 64 x 256 tile.
#include "common.cuh"

// From the generated preamble (cce_cupy/cuda/sources.py): H_BM x H_BN tiles (128 x 256); H_THREADS
// threads, the producer warpgroup (H_PRODUCERS = 128) ahead of the two consumer warpgroups; K
// stages of H_ROW_BYTES = 128-byte rows (64 16-bit or 32 fp32 elements: the TMA box's inner extent
// and the swizzle width); H_STAGES stages in H_SMEM_BYTES of dynamic shared memory.
static_assert(H_BM == 128 && H_BN == 256 && H_PRODUCERS == 128 && H_THREADS == H_PRODUCERS + 256 &&
                  H_ROW_BYTES == 128,
              "the warpgroup layout and wgmma shapes below are written for these values");
// Stage = A tile (H_BM rows) + B tile (H_BN rows). +1024: the dynamic shared memory base is only
// 16-byte aligned; the swizzle needs 1024.
#define H_A_BYTES (H_BM * H_ROW_BYTES)
#define H_STAGE_BYTES (H_A_BYTES + H_BN * H_ROW_BYTES)
static_assert(H_STAGES * H_STAGE_BYTES + 1024 <= H_SMEM_BYTES,
              "H_SMEM_BYTES (cce_cupy/cuda/sources.py) does not hold H_STAGES stages");

// Shared-memory matrix descriptor: start address, leading byte offset (unused by K-major
// swizzled operands), stride byte offset 1024 (8 rows of 128 bytes), 128-byte swizzle: 16-byte
// chunk c of row r at r * 128 + ((c ^ (r % 8)) * 16), the layout TMA writes with SWIZZLE_128B.
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned smem_addr) {
    return (unsigned long long)((smem_addr & 0x3FFFF) >> 4) | ((unsigned long long)1 << 16) |
           ((unsigned long long)(1024 >> 4) << 32) | ((unsigned long long)1 << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
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
// One specialization per input type; only the instruction differs: its shape and types, and the
// trailing immediates (scale-a, scale-b, and for 16-bit types the two no-transpose flags).
// fp32 inputs (the forward with allow_tf32) run TF32: K = 8 per instruction (32 bytes, like k16 of
// 16-bit types), products of the inputs' top 10 mantissa bits, fp32 accumulation.
template <typename T, int NV> struct Wgmma;
#define WGMMA_M64N256(T, INSTR, IMMEDIATES)                                                               \
    template <> struct Wgmma<T, 128> {                                                                    \
        static __device__ __forceinline__ void run(float (&d)[128], unsigned long long da,                \
                                                   unsigned long long db, int accumulate) {                \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n" INSTR " " WG_D128                   \
                         ", %128, %129, p, " IMMEDIATES ";\n}\n"                                          \
                         : WG_F128                                                                        \
                         : "l"(da), "l"(db), "r"(accumulate));                                            \
        }                                                                                                 \
    };
WGMMA_M64N256(__nv_bfloat16, "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16", "1, 1, 0, 0")
WGMMA_M64N256(__half, "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16", "1, 1, 0, 0")
WGMMA_M64N256(float, "wgmma.mma_async.sync.aligned.m64n256k8.f32.tf32.tf32", "1, 1")
#undef WGMMA_M64N256

// The same for one 128-column half of the tile (the split schedule of hopper_tiles_ws): d is 64 x 128,
// acc layout as above with j < 16. 16-bit types only (its one user, STORE ROW, is bf16). NV: the
// accumulator's values a thread (128 or 64).
#define WG_F64 WG_F8(0), WG_F8(8), WG_F8(16), WG_F8(24), WG_F8(32), WG_F8(40), WG_F8(48), WG_F8(56)
#define WG_D64                                                                                   \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                       \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"               \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"               \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define WGMMA_M64N128(T, INSTR)                                                                          \
    template <> struct Wgmma<T, 64> {                                                                    \
        static __device__ __forceinline__ void run(float (&d)[64], unsigned long long da,                \
                                                   unsigned long long db, int accumulate) {               \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" INSTR " " WG_D64                    \
                         ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                               \
                         : WG_F64                                                                        \
                         : "l"(da), "l"(db), "r"(accumulate));                                           \
        }                                                                                                \
    };
WGMMA_M64N128(__nv_bfloat16, "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16")
WGMMA_M64N128(__half, "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16")
#undef WGMMA_M64N128

// The per-tile geometry shared by both main loops.
struct HopperTiles {
    int KT, ntiles, total;  // k-blocks per tile, tiles, (tile, k-block) pairs
    __device__ HopperTiles(int D, int bk, int n_begin, int n_end)
        : KT((D + bk - 1) / bk), ntiles((n_end - n_begin + H_BN - 1) / H_BN), total(0) {
        total = KT * ntiles;
    }
};

template <bool B> struct BoolConstant {
    static constexpr bool value = B;
};

__device__ __forceinline__ char* align_1024(char* p) {
    return reinterpret_cast<char*>((reinterpret_cast<size_t>(p) + 1023) & ~size_t(1023));
}

// The 4 MMAs of k-block `it` for consumer warpgroup `cwg` (0 or 1) into acc: the whole 256-column
// tile (NV = 128), or one 128-column half of it (NV = 64): B's rows [b_row0, + 128) of the stage, at
// a multiple of the swizzle's 1024-byte period (b_row0 = 0 or 128).
template <typename T, int NV>
__device__ __forceinline__ void hopper_mma(float (&acc)[NV], unsigned smem_base, int it, int kt, int cwg, int b_row0 = 0) {
    const unsigned stage = smem_base + (it % H_STAGES) * H_STAGE_BYTES;
    const unsigned sA = stage + cwg * (64 * H_ROW_BYTES);
    const unsigned sB = stage + H_A_BYTES + b_row0 * H_ROW_BYTES;
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < H_ROW_BYTES / 32; ++ks)  // 32 bytes of K per MMA: k16 (16-bit), k8 (tf32)
        Wgmma<T, NV>::run(acc, wgmma_desc(sA + ks * 32), wgmma_desc(sB + ks * 32), (kt != 0) || (ks != 0));
    wgmma_commit();
}

__device__ __forceinline__ void mbar_init(unsigned long long* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, int parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(smem_u32(bar)), "r"(parity) : "memory");
}

// A TMA tensor map (CUtensorMap: 128 opaque bytes, 64-byte aligned), passed by value as a
// __grid_constant__ kernel parameter. The launcher (cce_cupy.cuda.device.hopper_operands) encodes
// one per operand: 2-D (rows, D); box of H_ROW_BYTES (64 16-bit or 32 fp32 elements) of K by
// H_BM = 128 rows for E, by H_BN / CLUSTER = 256 / CLUSTER rows for C (each block of a cluster
// loads its share of the C tile); 128-byte swizzle; out-of-bounds elements read as zero.
struct alignas(64) TmaDesc {
    unsigned long long bytes[16];
};

__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned long long* bar, unsigned tx_bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n"
                 ::"r"(smem_u32(bar)), "r"(tx_bytes) : "memory");
}
// Arrives on the barrier at `bar`'s offset in block `rank` of the cluster (this block included).
__device__ __forceinline__ void mbar_arrive_cluster(unsigned long long* bar, unsigned rank) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr(bar, rank)) : "memory");
}
// Box of `tmap` at (k0, row0) -> shared memory at dst, in every block of `cta_mask`; completes its
// bytes on the barrier at `bar`'s offset in each of them.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const TmaDesc* tmap, int k0, int row0,
                                                      unsigned long long* bar, unsigned short cta_mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3}], [%4], %5;\n"
        ::"r"(smem_u32(dst)), "l"(reinterpret_cast<unsigned long long>(tmap)), "r"(k0), "r"(row0),
        "r"(smem_u32(bar)), "h"(cta_mask) : "memory");
}
// Box of `tmap` at (k0, row0) -> shared memory at dst; completes `bytes` on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaDesc* tmap, int k0, int row0,
                                            unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(smem_u32(dst)), "l"(reinterpret_cast<unsigned long long>(tmap)), "r"(k0), "r"(row0),
        "r"(smem_u32(bar)) : "memory");
}

// Box of `tmap` at (col0, row0) <- shared memory at src (the layout tma_load_2d writes), as one bulk
// async group of this thread: cp.async.bulk.commit_group closes it, wait_group(.read) waits on it.
__device__ __forceinline__ void tma_store_2d(const TmaDesc* tmap, int col0, int row0, unsigned src) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n"
                 ::"l"(reinterpret_cast<unsigned long long>(tmap)), "r"(col0), "r"(row0), "r"(src) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// This thread's stores have read their shared memory (it may be rewritten) / have completed.
__device__ __forceinline__ void bulk_wait_read_all() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Generic-proxy writes to shared memory become visible to the async proxy (TMA).
__device__ __forceinline__ void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Four 8 x 8 matrices of 16-bit values to shared memory: register k of each lane holds its pair of
// matrix k (row lane / 4, columns 2 (lane % 4), + 1: the MMA accumulator layout); lanes 8 k .. 8 k + 7
// give the addresses of matrix k's 8 rows (16 bytes each).
__device__ __forceinline__ void stmatrix_x4(unsigned addr, unsigned r0, unsigned r1, unsigned r2, unsigned r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n"
                 ::"r"(addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}
// Barrier `id` over `count` threads (ids 2, 3: one per consumer warpgroup; 1 is consumers_any's).
__device__ __forceinline__ void named_barrier(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// The consumers' loop of hopper_tiles_ws: each k-block's MMAs, then each whole tile's epilogue.
template <typename T, typename Epi, typename Release>
__device__ __forceinline__ void hopper_consume_tiles(const HopperTiles& g, unsigned long long* full,
                                                     unsigned smem_base, int cwg, Release& release,
                                                     int n_begin, Epi& epi) {
    float acc[128];  // written first by the accumulate = 0 MMA of each tile
    int unreleased = -1;  // the k-block whose stage an MMA may still be reading
    for (int tile = 0, it = 0; tile < g.ntiles; ++tile) {
        for (int kt = 0; kt < g.KT; ++kt, ++it) {
            mbar_wait(&full[it % H_STAGES], (it / H_STAGES) & 1);
            hopper_mma<T>(acc, smem_base, it, kt, cwg);
            wgmma_wait<1>();  // k-block it - 1 is done: its stage can be refilled
            if (unreleased >= 0) release(unreleased);
            unreleased = it;
        }
        wgmma_wait<0>();
        release(unreleased);
        unreleased = -1;
        epi(n_begin + tile * H_BN, acc);  // may overwrite acc: the next tile starts with accumulate = 0
    }
}

// The consumers' loop of hopper_tiles_ws for an epilogue that takes each tile as two 128-column
// halves (Epi::SPLIT_HALVES): the tensor cores then keep working through most of the epilogue,
// which in the plain loop stalls them (both warpgroups run it at once). Each half has its own
// accumulator (lo, hi: 64 registers each, as the plain loop's 128), and the MMAs run in this order:
//   hi(k), k < LEAD                  the high halves of the k-blocks whose low halves ran early
//   lo(k), hi(k), LEAD <= k < KT - LEAD
//   lo(k), then hi(k), k >= KT - LEAD
//   wait for the low halves; epilogue(lo)    while the tail's high halves run
//   lo(k) of the next tile, k < LEAD
//   wait for the high halves; epilogue(hi)   while those run
// The tail holds LEAD stages and the next tile's lead takes LEAD others, so 2 LEAD <= H_STAGES. A
// stage is released once its high half (always its last reader) is done. Every wgmma wait count is a
// compile-time constant (the last tile, which has no next lead, is a separate instance): a wait
// ptxas cannot place statically makes it insert its own in the epilogue's divergent paths, and
// serialize every MMA (C7518). Needs KT >= 2 LEAD (D >= 256 for 16-bit types; see hopper_tiles_ws).
#define H_SPLIT_LEAD 2
template <typename T, typename Epi, typename Release>
__device__ __forceinline__ void hopper_consume_halves(const HopperTiles& g, unsigned long long* full,
                                                      unsigned smem_base, int cwg, Release& release,
                                                      int n_begin, Epi& epi) {
    constexpr int LEAD = H_SPLIT_LEAD;
    static_assert(2 * LEAD <= H_STAGES, "the tail and the next tile's lead each hold LEAD stages");
    float lo[64], hi[64];  // each written first by the accumulate = 0 MMA of its half
    auto wait_full = [&](int it) { mbar_wait(&full[it % H_STAGES], (it / H_STAGES) & 1); };
    auto issue_lead = [&](int tile) {
#pragma unroll
        for (int kt = 0; kt < LEAD; ++kt) {
            wait_full(tile * g.KT + kt);
            hopper_mma<T>(lo, smem_base, tile * g.KT + kt, kt, cwg);
        }
    };
    auto run_tile = [&](int tile, auto has_next) {
        const int base = tile * g.KT, n0 = n_begin + tile * H_BN;
#pragma unroll
        for (int kt = 0; kt < LEAD; ++kt) {
            hopper_mma<T>(hi, smem_base, base + kt, kt, cwg, H_BN / 2);
            wgmma_wait<1>();  // hi(kt - 1) is done
            if (kt > 0) release(base + kt - 1);
        }
        int unreleased = base + LEAD - 1;  // the k-block whose high half may still be reading its stage
        for (int kt = LEAD; kt < g.KT - LEAD; ++kt) {
            wait_full(base + kt);
            hopper_mma<T>(lo, smem_base, base + kt, kt, cwg);
            hopper_mma<T>(hi, smem_base, base + kt, kt, cwg, H_BN / 2);
            wgmma_wait<2>();  // hi(kt - 1) is done
            release(unreleased);
            unreleased = base + kt;
        }
#pragma unroll
        for (int i = 0; i < LEAD; ++i) {
            wait_full(base + g.KT - LEAD + i);
            hopper_mma<T>(lo, smem_base, base + g.KT - LEAD + i, g.KT - LEAD + i, cwg);
        }
#pragma unroll
        for (int i = 0; i < LEAD; ++i) hopper_mma<T>(hi, smem_base, base + g.KT - LEAD + i, g.KT - LEAD + i, cwg, H_BN / 2);
        wgmma_wait<LEAD>();  // all but the tail's high halves: lo is final
        release(unreleased);
        epi(n0, lo);
        if constexpr (decltype(has_next)::value) {
            issue_lead(tile + 1);
            wgmma_wait<LEAD>();  // all but the next tile's lead: hi is final
        } else {
            wgmma_wait<0>();
        }
#pragma unroll
        for (int i = 0; i < LEAD; ++i) release(base + g.KT - LEAD + i);
        epi(n0 + H_BN / 2, hi);
    };
    issue_lead(0);
    for (int tile = 0; tile + 1 < g.ntiles; ++tile) run_tile(tile, BoolConstant<true>{});
    run_tile(g.ntiles - 1, BoolConstant<false>{});
}

// Run the K loop of every 128 x 256 tile with columns [n_begin + 256 i, ...) < n_end of the
// block's rows [m0, m0 + 128), calling epi(n0, acc) after each tile on the consumer threads. Rows
// of E >= N and of C >= V and k >= D read as zero (TMA fills them). One producer thread per block
// fills a ring of stages: its own A tile, and 256 / CLUSTER rows of the C tile multicast to every
// block of the cluster (all blocks of a cluster walk the same C tiles). Consumers wait on the
// stage's `full` mbarrier (48 KiB of transaction bytes, from every block's copies) and, once their
// MMAs of it have completed, release it on the `empty` mbarrier of every block of the cluster: a
// producer refills a stage only when all the blocks it writes into are done with it. Returns on
// every thread, after a cluster barrier (no block exits while a peer may still write into it).
// c_row0 offsets the C rows (a vocabulary chunk).
template <int CLUSTER, typename T, typename Epi>
__device__ __forceinline__ void hopper_tiles_ws(const TmaDesc* tmap_e, const TmaDesc* tmap_c, int c_row0, int D,
                                                int m0, int n_begin, int n_end, char* smem_raw, Epi& epi) {
    __shared__ __align__(8) unsigned long long full[H_STAGES], empty[H_STAGES];
    char* smem = align_1024(smem_raw);
    constexpr int BK = H_ROW_BYTES / sizeof(T);  // K elements per stage
    const HopperTiles g(D, BK, n_begin, n_end);
    const unsigned rank = cluster_rank();
    constexpr int B_ROWS = H_BN / CLUSTER;  // C rows this block loads per stage
    if (threadIdx.x == 0) {
        for (int s = 0; s < H_STAGES; ++s) {
            mbar_init(&full[s], 1);                 // the producer's arrive + the stage's transaction bytes
            mbar_init(&empty[s], 8 * CLUSTER);      // each consumer warp of each block is done reading it
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    cluster_arrive();  // every block's barriers are initialized before any copy or arrive reaches them
    cluster_wait();
    if (threadIdx.x < H_PRODUCERS) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x == 0) {
            for (int it = 0; it < g.total; ++it) {
                const int s = it % H_STAGES;
                if (it >= H_STAGES) mbar_wait(&empty[s], ((it / H_STAGES) - 1) & 1);
                char* sA = smem + s * H_STAGE_BYTES;
                const int k0 = (it % g.KT) * BK, n0 = n_begin + (it / g.KT) * H_BN;
                mbar_arrive_expect_tx(&full[s], H_STAGE_BYTES);
                tma_load_2d(sA, tmap_e, k0, m0, &full[s]);
                char* sB = sA + H_A_BYTES + rank * B_ROWS * H_ROW_BYTES;
                if (CLUSTER == 1) tma_load_2d(sB, tmap_c, k0, c_row0 + n0, &full[s]);
                else tma_load_2d_multicast(sB, tmap_c, k0, c_row0 + n0 + rank * B_ROWS, &full[s],
                                           (unsigned short)((1u << CLUSTER) - 1));
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        const unsigned smem_base = smem_u32(smem);
        const int cwg = (threadIdx.x - H_PRODUCERS) >> 7;
        // After a wgmma wait (warp-synchronous), one lane per warp releases the stage everywhere.
        auto release = [&](int it) {
            if ((threadIdx.x & 31) == 0)
                for (unsigned r = 0; r < CLUSTER; ++r) mbar_arrive_cluster(&empty[it % H_STAGES], r);
        };
        // The split schedule needs 2 H_SPLIT_LEAD k-blocks a tile; smaller D take the plain loop.
        if constexpr (Epi::SPLIT_HALVES) {
            if (g.KT >= 2 * H_SPLIT_LEAD) hopper_consume_halves<T>(g, full, smem_base, cwg, release, n_begin, epi);
            else hopper_consume_tiles<T>(g, full, smem_base, cwg, release, n_begin, epi);
        } else {
            hopper_consume_tiles<T>(g, full, smem_base, cwg, release, n_begin, epi);
        }
    }
    cluster_arrive();
    cluster_wait();
}

#define H_LOG2E 1.4426950408889634f
// 2^x by the SFU (what __expf uses after scaling by log2 e): exp(y - m) as fast_exp2(fmaf(y, log2e,
// -m log2e)) is one FFMA and one MUFU op per element.
__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Consumer threads only: rank among the 256 consumers.
__device__ __forceinline__ int consumer_tid() { return threadIdx.x - H_PRODUCERS; }
__device__ __forceinline__ bool is_consumer() { return threadIdx.x >= H_PRODUCERS; }

// This thread's two rows (local to the 128-row tile) and its column offset within each 8-column group.
__device__ __forceinline__ int hopper_row0() {
    const int tid = consumer_tid(), lane = tid & 31;
    return (tid >> 7) * 64 + ((tid >> 5) & 3) * 16 + (lane >> 2);
}
__device__ __forceinline__ int hopper_col0() { return (consumer_tid() & 3) * 2; }

// Lane k of each 4-lane group gets word k of every lane's w: w[m] = (lane m's w[k]) afterwards.
// `lanes`: the active lanes (whole groups of 4).
__device__ __forceinline__ void quad_transpose(unsigned (&w)[4], unsigned lanes) {
    const unsigned lane = threadIdx.x;
#pragma unroll
    for (int s = 2; s >= 1; s >>= 1) {
        const bool upper = lane & s;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (i & s) continue;
            // Keep the words whose bit s matches ours, swap the others with lane ^ s.
            const unsigned got = __shfl_xor_sync(lanes, upper ? w[i] : w[i ^ s], s);
            if (upper) w[i] = got;
            else w[i ^ s] = got;
        }
    }
}
template <typename T> __device__ __forceinline__ unsigned pack_pair(float lo, float hi) {
    T pair[2] = {from_f32<T>(lo), from_f32<T>(hi)};
    return *reinterpret_cast<unsigned*>(pair);
}

// ---------------------------------------------------------------------------------------------
// lce_forward_partials_sm90<CLUSTER, T, HAS_BIAS, SOFTCAP, SMOOTH, STORE>
//   The partials of lce_forward_partials (lce_forward.cu), with v_per_split a multiple of 256; no
//   target logits (the finish kernel gathers them). T: bf16, fp16, or fp32 run as TF32 (the
//   launcher uses it only with allow_tf32). Grid: (ceil(N / 128) rounded up to a multiple of CLUSTER, splits). Block: H_THREADS.
//   Dynamic smem: H_SMEM_BYTES (+ H_STAGING_BYTES with STORE ROW). tmap_c's box: 256 / CLUSTER rows.
//   Each thread keeps a running (max, sum exp, sum y) for its two rows over its own columns; the
//   four threads sharing a row combine once at the end.
//   STORE (a SoftmaxStore other than NONE; 16-bit T; the memory-budgeted backward, cce_cupy/cuda/budget.py)
//   also keeps the softmax for the backward, so that no logit is recomputed; s: (N, lds), lds % 8 == 0,
//   16-byte aligned. Rows >= N and columns >= V are not written.
//     TILE (fp16 s, read by the gradient pass lce_budget_grad): with m the row's max over the
//       256-column tile, s[row * lds + col] = exp(y - m) (<= 1; 11 mantissa bits where bf16 has 8)
//       and scales[row * ntiles + col / 256] = m, so that p_ij = s_ij exp(m - lse_i). The tile's
//       sum joins the running one as a split's partial would (see fold_and_store).
//     ROW (T = bf16 s, read by the GEMMs themselves; written through tmap_s, a TMA map of s's
//       first V columns with 16 x 64 boxes): with c = row_shift[row] (the target logit; +inf, so
//       that the row stores 0, for an ignored row, a target outside [0, V), and a row without
//       gradient where lce_budget_shift had row_grad),
//       s[row * lds + col] = exp(y - c) * softcap'(z)   (softcap' = 1 without SOFTCAP),
//       so that p_ij softcap'_ij = s_ij exp(c_i - lse_i). The partials of a warp whose rows all have
//       a finite c are (c, sum exp(y - c), ...) (see shifted_exps). bf16 keeps fp32's exponent
//       range: only a row whose logits exceed c by more than STORE_ROW_RANGE (60 nats, a loss that
//       large) could overflow the GEMMs' fp32 sums; such a row (or one whose sum against c passed
//       e^60) sets unsafe[row] = 1, and lce_budget_recompute recomputes its lse and its s.
//     LISTS (the certified filter's candidates, cce_cupy/cuda/filtered.py; no softmax is kept):
//       with tau = row_shift[row] (the row's target logit + log eps, less a margin; +inf for a row
//       without any gradient, coef_p = coef_q = 0), every column whose y >= tau is appended to the row's list:
//           slot = atomicAdd(&unsafe[row], 1);  s_out[row * lds + slot] = (col, y as float bits) (int2)
//       (unsafe: the row counts, from 0; lds: the slots a row). A thread stops appending to a row once
//       a slot it drew is >= lds, so the count ends above lds exactly when the list overflowed. The
//       other columns' mass, against the split's max m (part's first slot), goes to
//       scales[split * N + row] = sum_{y < tau} exp(y - m): no column of it has p >= eps, since
//       lse >= the target logit. sparse_prune_lists finishes the lists against the lse. The other
//       mass is complete only for rows whose list did not overflow and that have a gradient: the
//       others' sums stop early (the exact path takes them, or they need nothing).
// ---------------------------------------------------------------------------------------------
#define STORE_ROW_RANGE 60.f

template <bool HAS_BIAS, bool SOFTCAP, bool SMOOTH, SoftmaxStore STORE, typename T> struct ForwardEpilogue {
    const T* bias;
    int v_end;
    float softcap;
    void* s_out;  // STORE only (null otherwise), as the members up to m0
    i64 lds;
    float* scales;  // TILE
    int ntiles;
    const float* row_shift;  // ROW
    int* unsafe;
    int N, m0;
    // ROW: this thread's warpgroup's staging buffer (shared address), s's TMA map, and whether every
    // row of this warp has a finite shift c (then run_max stays c, and the exps are taken against
    // c itself: see shifted_exps); shift_b = c log2 e of the thread's two rows.
    unsigned staging = 0;
    const TmaDesc* tmap_s = nullptr;
    bool shifted = false;
    float shift_b[2] = {0.f, 0.f};
    // LISTS: the rows' thresholds tau, their other mass against run_max (rescaled with run_sum), and
    // whether this thread's list of the row has overflowed (or the row has no gradient): its other
    // mass is then no longer needed.
    float thr[2] = {INFINITY, INFINITY}, drop[2] = {0.f, 0.f};
    bool overflowed[2] = {false, false}, any_candidate = false;
    int seen_count[2] = {0, 0};  // LISTS: see fetch_counts
    float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.f, 0.f}, run_y[2] = {0.f, 0.f};

    // ROW takes each tile as two 128-column halves (hopper_tiles_ws's split schedule), so that one
    // half's epilogue overlaps the other half's MMAs: its stores made the epilogue longest.
    static constexpr bool SPLIT_HALVES = STORE == SoftmaxStore::ROW;

    // acc: this thread's NV values of the columns [n0, n0 + 2 NV): a whole 256-column tile (NV = 128)
    // or a half (NV = 64, ROW), in the accumulator layout (value 4 j + q in column n0 + 8 j + ...).
    // Overwrites acc with the masked logits y (the next tile's first MMA does not read acc).
    template <int NV> __device__ __forceinline__ void operator()(int n0, float (&acc)[NV]) {
        if (!HAS_BIAS && !SOFTCAP && n0 + 2 * NV <= v_end) {
            full_tile(n0, acc);
            return;
        }
        const int col0 = n0 + hopper_col0();
        float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < NV / 4; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int col = col0 + j * 8 + (q & 1);
                float y = acc[4 * j + q];
                if (HAS_BIAS) y += (col < v_end) ? to_f32(bias[col]) : 0.f;
                y = apply_softcap<SOFTCAP>(y, softcap);
                if (col >= v_end) y = -INFINITY;  // the next split's columns, or past V
                else if (SMOOTH) run_y[q >> 1] += y;
                acc[4 * j + q] = y;
                tmax[q >> 1] = fmaxf(tmax[q >> 1], y);
            }
        if constexpr (STORE == SoftmaxStore::TILE) {
            fold_and_store(n0, tmax, acc);
            return;
        }
        if constexpr (STORE == SoftmaxStore::ROW) {
            if (shifted) {
#pragma unroll
                for (int half = 0; half < NV / 64; ++half) {
                    shifted_exps<true>(half, acc);
                    stage_half(n0, half, acc);
                }
                return;
            }
        }
        raise_max(tmax);
#pragma unroll
        for (int j = 0; j < NV / 4; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float y = acc[4 * j + q];
                const float ex = (y == -INFINITY) ? 0.f : __expf(y - run_max[q >> 1]);
                run_sum[q >> 1] += ex;
                if (STORE == SoftmaxStore::ROW) acc[4 * j + q] = SOFTCAP ? ex * softcap_factor(y) : ex;
                // Inline here: a second pass over the tile (as full_tile's) would keep too many
                // registers alive with bias or softcap, and serialize the MMAs (ptxas C7511).
                if (STORE == SoftmaxStore::LISTS) {
                    add_other_mass(4 * j + q, y, ex);
                    if (y >= thr[q >> 1]) append(n0, 4 * j + q, y);
                }
            }
        if (STORE == SoftmaxStore::ROW) store_row_shifted(n0, acc);
    }

    // softcap'(z) from y = softcap tanh(z / softcap): 1 - (y / softcap)^2 (0 for a masked y = -inf,
    // whose exp is 0). Relatively less accurate where tanh saturates, on elements that small; the
    // target's own factor is recomputed exactly by lce_budget_rows.
    __device__ __forceinline__ float softcap_factor(float y) const {
        const float r = y / softcap;
        return (y == -INFINITY) ? 0.f : (1.f - r) * (1.f + r);
    }

    // A tile with no column past v_end and y = acc: no masks, one FFMA and one exp per element. The
    // epilogue stalls the tensor cores (both warpgroups run it at once), so its instruction count is
    // forward time.
    template <int NV> __device__ __forceinline__ void full_tile(int n0, float (&acc)[NV]) {
        if (STORE == SoftmaxStore::ROW && shifted) {  // no max: the exps are against the fixed c
#pragma unroll
            for (int half = 0; half < NV / 64; ++half) {
                shifted_exps<false>(half, acc);
                stage_half(n0, half, acc);  // its TMA store reads shared memory while the next half's exps run
            }
            return;
        }
        if (STORE == SoftmaxStore::LISTS) note_counts();
        float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int i = 0; i < NV; ++i) {
            tmax[(i >> 1) & 1] = fmaxf(tmax[(i >> 1) & 1], acc[i]);
            if (SMOOTH) run_y[(i >> 1) & 1] += acc[i];
        }
        if constexpr (STORE == SoftmaxStore::TILE) {
            fold_and_store(n0, tmax, acc);
            return;
        }
        raise_max(tmax);
        // LISTS: once every row of the warp has overflowed its list (long-tailed rows do within the
        // first few tiles), the rows go to the exact path, and the tile costs what STORE NONE's does.
        if constexpr (STORE == SoftmaxStore::LISTS) {
            if (!__all_sync(0xffffffffu, overflowed[0] && overflowed[1])) {
                tile_exps<true>(acc);
                append_candidates(n0, acc);
                fetch_counts();
                return;
            }
        }
        tile_exps<false>(acc);
        if (STORE == SoftmaxStore::ROW) store_row_shifted(n0, acc);
    }

    // A full tile's exps against the running max into run_sum (ROW: acc = the exps); with COLLECT
    // (LISTS), each element's mass also joins its row's other mass unless it is a candidate. The
    // sums are the same arithmetic either way, so the lse does not depend on COLLECT.
    template <bool COLLECT, int NV> __device__ __forceinline__ void tile_exps(float (&acc)[NV]) {
        const float mb[2] = {run_max[0] * H_LOG2E, run_max[1] * H_LOG2E};
#pragma unroll
        for (int i = 0; i < NV; ++i) {
            const float ex = fast_exp2(fmaf(acc[i], H_LOG2E, -mb[(i >> 1) & 1]));
            run_sum[(i >> 1) & 1] += ex;
            if (STORE == SoftmaxStore::ROW) acc[i] = ex;
            if (COLLECT) add_other_mass(i, acc[i], ex);
        }
    }

    // ROW with a finite shift c: s = exp(y - c) (times softcap') of the 64 values of columns
    // [128 half, + 128) of the tile, and run_sum += exp(y - c): with run_max = c throughout, the
    // split's partial is (c, sum exp(y - c)). No running max, no rescaling: the target's own term
    // is exp(0) = 1, the sum cannot underflow, and only a row whose logits exceed c by ~88 nats
    // could overflow it (the kernel flags rows whose sum passes e^60 as unsafe; lce_budget_recompute
    // then recomputes their lse and s). MASKED: acc holds y (-inf past v_end, whose exp is 0), the
    // smoothing sum is taken already; else acc holds the raw logits.
    template <bool MASKED, int NV> __device__ __forceinline__ void shifted_exps(int half, float (&acc)[NV]) {
#pragma unroll
        for (int i = 64 * half; i < 64 * half + 64; ++i) {
            const int h = (i >> 1) & 1;
            if (!MASKED && SMOOTH) run_y[h] += acc[i];
            const float ex = fast_exp2(fmaf(acc[i], H_LOG2E, -shift_b[h]));
            run_sum[h] += ex;
            acc[i] = SOFTCAP ? ex * softcap_factor(acc[i]) : ex;
        }
    }

    // LISTS: the rows' list counts, loaded at the end of a tile (and at the block's start) and looked
    // at in the next tile, so that the load's latency hides behind the MMAs. A count above lds means
    // some thread already failed to append to the row (overflowed: the exact path takes it), so this
    // thread can stop collecting for it too; a count of exactly lds cannot stop it (a full list whose
    // every candidate is in it is complete, and this thread's next candidate must mark it overflowed).
    // Without it, each thread of each vocabulary split learns of an overflow only from an append of
    // its own, which a row with few candidates a split may never make: long-tailed data then ran the
    // collecting exps and append passes in most tiles (+3.4 ms at gemma2).
    __device__ __forceinline__ void fetch_counts() {
#pragma unroll
        for (int h = 0; h < 2; ++h)
            if (!overflowed[h]) seen_count[h] = __ldcg(unsafe + m0 + hopper_row0() + 8 * h);  // < N: see overflowed
    }
    __device__ __forceinline__ void note_counts() {
#pragma unroll
        for (int h = 0; h < 2; ++h) overflowed[h] = overflowed[h] || seen_count[h] > (int)lds;
    }

    // LISTS: element i of acc (logit y, ex = exp(y - run_max)) is a candidate, or its mass joins the
    // row's other mass: no branch here, in the epilogue's straight-line exps.
    __device__ __forceinline__ void add_other_mass(int i, float y, float ex) {
        const int h = (i >> 1) & 1;
        const bool candidate = y >= thr[h];
        drop[h] += candidate ? 0.f : ex;
        any_candidate |= candidate;
    }

    // LISTS, after the tile's exps: its candidates (acc holds the logits y) join their rows' lists.
    // Candidates are rare on the rows the filter can certify (a few a row); a row with many
    // overflows its list, and the exact path takes it.
    __device__ __forceinline__ void append_candidates(int n0, const float (&acc)[128]) {
        if (!any_candidate) return;
        any_candidate = false;
        if (overflowed[0] && overflowed[1]) return;  // long-tailed rows: every tile has candidates
#pragma unroll
        for (int i = 0; i < 128; ++i)
            if (acc[i] >= thr[(i >> 1) & 1]) append(n0, i, acc[i]);
    }

    // Candidate i of the tile (logit y) to its row's list, unless this thread saw the list full.
    __device__ __forceinline__ void append(int n0, int i, float y) {
        const int h = (i >> 1) & 1;
        if (overflowed[h]) return;
        const int row = m0 + hopper_row0() + 8 * h;  // < N: rows >= N have thr = +inf
        const int col = n0 + (i >> 2) * 8 + hopper_col0() + (i & 1);
        const int slot = atomicAdd(unsafe + row, 1);
        if (slot < (int)lds) reinterpret_cast<int2*>(s_out)[(i64)row * lds + slot] = make_int2(col, __float_as_int(y));
        else overflowed[h] = true;
    }

    // Folds this tile's row maxima into the running ones, rescaling the running sums. A thread
    // whose columns are all masked keeps max = -inf and sum = 0.
    __device__ __forceinline__ void raise_max(const float (&tmax)[2]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float new_max = fmaxf(run_max[h], tmax[h]);
            const float scale = (new_max == -INFINITY) ? 0.f : __expf(run_max[h] - new_max);
            // Rounded as written: left to the compiler, this product fuses with the tile's first add
            // into an FMA in some variants and not in others (across the LISTS branch), and the
            // variants' lse would differ in the last bit.
            run_sum[h] = __fmul_rn(run_sum[h], scale);
            if (STORE == SoftmaxStore::LISTS) drop[h] *= scale;
            run_max[h] = new_max;
        }
    }

    // STORE: the tile's exps are taken against the tile's own row max m (one for the row's four
    // threads), not the running max, so that each tile's fp16 values keep 11 bits relative to that
    // tile's largest: against a running max, every tile after a peaked row's target would hold
    // subnormals (absolute error 3e-8 each, ~1e-2 of a peaked row's gradient over 256k columns).
    // The tile's sum then joins the running one like a split's partial in the finish kernel.
    __device__ __forceinline__ void fold_and_store(int n0, float (&tmax)[2], float (&acc)[128]) {
        float tsum[2] = {0.f, 0.f}, mb[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            tmax[h] = fmaxf(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 1));
            tmax[h] = fmaxf(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 2));
            mb[h] = (tmax[h] == -INFINITY) ? 0.f : tmax[h] * H_LOG2E;  // a masked y = -inf then gives 0
        }
#pragma unroll
        for (int i = 0; i < 128; ++i) {
            const float ex = fast_exp2(fmaf(acc[i], H_LOG2E, -mb[(i >> 1) & 1]));
            tsum[(i >> 1) & 1] += ex;
            acc[i] = ex;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float new_max = fmaxf(run_max[h], tmax[h]);
            // expf, not __expf: this runs every tile with differences of up to ~20, where __expf's
            // relative error (~|x| 2^-24) would add up to ~1e-6 in the lse; two calls a row a tile.
            run_sum[h] = (new_max == -INFINITY)
                             ? 0.f
                             : run_sum[h] * expf(run_max[h] - new_max) + tsum[h] * expf(tmax[h] - new_max);
            run_max[h] = new_max;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + hopper_row0() + 8 * h;
            if (row < N && (threadIdx.x & 3) == 0) scales[(i64)row * ntiles + n0 / H_BN] = tmax[h];
        }
        const float one[2] = {1.f, 1.f};
        store_tile<__half>(n0, one, acc);
    }

    // ROW in a warp with a row of infinite shift (no gradient: it stores 0): acc holds
    // exp(y - run_max) (times softcap'); s = acc exp(run_max - c).
    template <int NV> __device__ __forceinline__ void store_row_shifted(int n0, float (&acc)[NV]) {
        float k[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + hopper_row0() + 8 * h;
            const float c = (row < N) ? row_shift[row] : INFINITY;
            // expf: an error in k scales the tile's stored values; c = +inf gives k = 0.
            k[h] = expf(run_max[h] - c);
            if (run_max[h] - c > STORE_ROW_RANGE) unsafe[row] = 1;
        }
#pragma unroll
        for (int i = 0; i < NV; ++i) acc[i] *= k[(i >> 1) & 1];
#pragma unroll
        for (int half = 0; half < NV / 64; ++half) stage_half(n0, half, acc);
    }

    // ROW: acc's values of columns [n0 + 128 half, + 128) of this warpgroup's 64 rows, as T, to s
    // through shared memory and TMA stores, which drain while the next tile's MMAs run (a direct
    // store from registers stalled the tensor cores: +1 ms at gemma2). Each warp stages and stores
    // its own 16 rows, so that only __syncwarp orders them (the warpgroup's named barriers, before,
    // cost 0.5-1% of the forward: dev/row_variants.py). A warp's staging is two 16-row boxes of 64
    // columns (128-byte rows, swizzled as TMA expects, chunk c of row r at r * 128 + ((c ^ (r % 8)) * 16);
    // each box 2 KiB, so r % 8 is the row's swizzle phase), written with stmatrix straight from the
    // accumulator layout: x4 covers the rows' two 8-row halves (h) of two 8-column groups. Rows >= N
    // and columns >= V are clipped by the TMA map (s's shape); tiles never straddle a split
    // (v_per_split % 256 == 0).
    template <int NV> __device__ __forceinline__ void stage_half(int n0, int half, const float (&acc)[NV]) {
        const int wg = consumer_tid() >> 7, warp = (consumer_tid() >> 5) & 3, lane = threadIdx.x & 31;
        const unsigned box = staging + warp * (2 * 16 * H_ROW_BYTES);  // this warp's two boxes
        if (lane == 0) bulk_wait_read_all();  // the warp's previous stores have read them
        __syncwarp();
        const int k = lane >> 3, r = 8 * (k & 1) + (lane & 7);  // matrix k's row r of the warp's 16
#pragma unroll
        for (int jj = 0; jj < 16; jj += 2) {
            const int j = 16 * half + jj, jl = jj + (k >> 1);  // jl: this lane's 8-column group in the half
            const unsigned addr = box + (jl >> 3) * (16 * H_ROW_BYTES) + r * H_ROW_BYTES + (((jl & 7) ^ (r & 7)) << 4);
            stmatrix_x4(addr, pack_pair<T>(acc[4 * j], acc[4 * j + 1]), pack_pair<T>(acc[4 * j + 2], acc[4 * j + 3]),
                        pack_pair<T>(acc[4 * j + 4], acc[4 * j + 5]), pack_pair<T>(acc[4 * j + 6], acc[4 * j + 7]));
        }
        fence_proxy_async_smem();  // the stores' async proxy sees this warp's writes
        __syncwarp();
        if (lane == 0) {
            const int row0 = m0 + 64 * wg + 16 * warp, col0 = n0 + 128 * half;
            tma_store_2d(tmap_s, col0, row0, box);
            tma_store_2d(tmap_s, col0 + 64, row0, box + 16 * H_ROW_BYTES);
            bulk_commit();
        }
    }

    // TILE: acc * k[h] of rows h = 0, 1 to s, as ST.
    template <typename ST> __device__ __forceinline__ void store_tile(int n0, const float (&k)[2], const float (&acc)[128]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + hopper_row0() + 8 * h;
            const unsigned lanes = __ballot_sync(0xffffffffu, row < N);  // the 4 lanes of a row agree
            if (row >= N) continue;
            ST* srow = reinterpret_cast<ST*>(s_out) + (i64)row * lds;
#pragma unroll
            for (int a = 0; a < 8; ++a) {  // 32 columns: groups j = 4 a .. 4 a + 3
                unsigned w[4];
#pragma unroll
                for (int jj = 0; jj < 4; ++jj)
                    w[jj] = pack_pair<ST>(acc[16 * a + 4 * jj + 2 * h] * k[h], acc[16 * a + 4 * jj + 2 * h + 1] * k[h]);
                quad_transpose(w, lanes);  // this thread now holds columns n0 + 32 a + 8 k .. + 7, k = lane % 4
                const int col = n0 + 32 * a + 8 * (threadIdx.x & 3);
                if (col + 8 <= v_end) {
                    *reinterpret_cast<uint4*>(srow + col) = make_uint4(w[0], w[1], w[2], w[3]);
                } else {  // the split's (or V's) last columns
#pragma unroll
                    for (int e = 0; e < 8; ++e)
                        if (col + e < v_end)
                            reinterpret_cast<unsigned short*>(srow)[col + e] = (unsigned short)(w[e >> 1] >> (16 * (e & 1)));
                }
            }
        }
    }
};

template <int CLUSTER, typename T, bool HAS_BIAS, bool SOFTCAP, bool SMOOTH, SoftmaxStore STORE>
__global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(H_THREADS, 1)
    lce_forward_partials_sm90(const __grid_constant__ TmaDesc tmap_e, const __grid_constant__ TmaDesc tmap_c,
                              const __grid_constant__ TmaDesc tmap_s, const T* __restrict__ bias,
                              float* __restrict__ part, int N, int V, int D, int v_per_split, float softcap,
                              void* __restrict__ s_out, long long lds, float* __restrict__ scales, int ntiles,
                              const float* __restrict__ row_shift, int* __restrict__ unsafe) {
    extern __shared__ __align__(16) char smem[];
    const int m0 = blockIdx.x * H_BM;
    const int split = blockIdx.y, splits = gridDim.y;
    const int v_begin = split * v_per_split, v_end = min(V, v_begin + v_per_split);
    ForwardEpilogue<HAS_BIAS, SOFTCAP, SMOOTH, STORE, T> epi{bias,    v_end,     softcap,   s_out, (i64)lds, scales,
                                                             ntiles, row_shift, unsafe, N,     m0};
    if (STORE == SoftmaxStore::ROW && is_consumer()) {
        epi.staging = smem_u32(align_1024(smem) + H_STAGES * H_STAGE_BYTES) + (consumer_tid() >> 7) * (H_STAGING_BYTES / 2);
        epi.tmap_s = &tmap_s;
        bool finite = true;
        float c[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + hopper_row0() + 8 * h;
            c[h] = (row < N) ? row_shift[row] : 0.f;  // rows >= N: nothing is stored or kept
            finite = finite && isfinite(c[h]);
        }
        epi.shifted = __all_sync(0xffffffffu, finite);  // warp-uniform: one path per warp
        if (epi.shifted)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                epi.run_max[h] = c[h];
                epi.shift_b[h] = c[h] * H_LOG2E;
            }
    }
    if (STORE == SoftmaxStore::LISTS && is_consumer()) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + hopper_row0() + 8 * h;
            epi.thr[h] = (row < N) ? row_shift[row] : INFINITY;
            epi.overflowed[h] = epi.thr[h] == INFINITY;  // no gradient (or row >= N): no list, no other mass needed
        }
        epi.fetch_counts();  // lists that blocks of other splits filled and overflowed already
    }
    hopper_tiles_ws<CLUSTER, T>(&tmap_e, &tmap_c, 0, D, m0, v_begin, v_end, smem, epi);
    if (!is_consumer()) return;
    if (STORE == SoftmaxStore::ROW && (consumer_tid() & 31) == 0) bulk_wait_all();  // before the block's smem goes
    // Combine the four threads (lanes 4k .. 4k+3) that share each row.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float m = epi.run_max[h], s = epi.run_sum[h], y = epi.run_y[h], dr = epi.drop[h];
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
            const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
            const float mm = fmaxf(m, m2);
            // Rounded as written (no contraction left to the compiler): every STORE variant then
            // gives the same lse, so a filtered call that certifies nothing is the exact call bit for bit.
            const float a = __expf(m - mm), b = __expf(m2 - mm);
            s = (mm == -INFINITY) ? 0.f : __fadd_rn(__fmul_rn(s, a), __fmul_rn(s2, b));
            if (STORE == SoftmaxStore::LISTS) {
                const float dr2 = __shfl_xor_sync(0xffffffffu, dr, o);
                dr = (mm == -INFINITY) ? 0.f : __fadd_rn(__fmul_rn(dr, a), __fmul_rn(dr2, b));
            }
            m = mm;
            if (SMOOTH) y += __shfl_xor_sync(0xffffffffu, y, o);
        }
        const int row = m0 + hopper_row0() + 8 * h;
        if ((threadIdx.x & 3) == 0 && row < N) {
            const i64 stride = (i64)splits * N;
            part[(i64)split * N + row] = m;
            part[stride + (i64)split * N + row] = s;
            part[2 * stride + (i64)split * N + row] = y;
            // A sum past e^60 (or inf, NaN) relative to c: see shifted_exps.
            if (STORE == SoftmaxStore::ROW && epi.shifted && !(s <= __expf(STORE_ROW_RANGE))) unsafe[row] = 1;
            if (STORE == SoftmaxStore::LISTS) scales[(i64)split * N + row] = dr;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// lce_grad_logits_sm90<CLUSTER, T, HAS_BIAS, SOFTCAP, FILTER, TI>
//   Same arguments and output as lce_grad_logits (lce_backward.cu), T 16-bit, plus
//   cols_per_block (a multiple of 256): block y computes the chunk columns [y * cols_per_block,
//   ...), several tiles (the launcher picks one grid wave where it can, as for the forward's splits).
//   Grid: (ceil(N / 128) rounded up to a multiple of CLUSTER, ceil(Vc / cols_per_block)).
//   Block: H_THREADS. Dynamic smem: H_SMEM_BYTES. tmap_c's box: 256 / CLUSTER rows.
//   Requires ldg % 8 == 0 and a 16-byte aligned G (the launcher's scratch chunk): the gradient tile
//   is stored from registers, 8 contiguous elements (16 bytes) per store, after the four threads
//   sharing a row transpose their pairs (quad_transpose). Each store then fills whole 32-byte sectors;
//   the pairs straight from the accumulator layout would write 16 bytes of 8 rows per instruction.
//   With FILTER each tile writes the live flags of its two 128-column halves.
// ---------------------------------------------------------------------------------------------
// True on every consumer thread if `p` holds on any of the 256 (named barrier 1; consumers only).
__device__ __forceinline__ bool consumers_any(bool p) {
    unsigned r;
    asm volatile("{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, 1, 256, p;\n"
                 "selp.u32 %0, 1, 0, q;\n}\n" : "=r"(r) : "r"((unsigned)p) : "memory");
    return r != 0;
}
template <bool HAS_BIAS, bool SOFTCAP, bool FILTER, typename T, typename TI> struct GradEpilogue {
    static constexpr bool SPLIT_HALVES = false;  // hopper_tiles_ws: whole tiles
    const T* bias;
    const TI* targets;
    const float *lse, *coef_p, *coef_q;
    T* G;
    int* flags;
    int N, V, v0, Vc, m0;
    i64 ldg;
    float softcap, smoothing, filter_eps;

    __device__ __forceinline__ void operator()(int n0, float (&acc)[128]) {  // n0 is chunk-relative
        const float smooth_q = smoothing / (float)V;
        bool live[2] = {false, false};  // per flag tile (CCE_BN = 128 columns): the tile's two halves
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + hopper_row0() + 8 * h;
            const unsigned lanes = __ballot_sync(0xffffffffu, row < N);  // the 4 lanes of a row agree
            if (row >= N) continue;
            const float l = lse[row], cp = coef_p[row], cq = coef_q[row];
            const long long t = (long long)targets[row] - v0;
            // g = cp p - cq ([col == t] (1 - smoothing) + smoothing / V): one of two constants a row.
            const float l2 = l * H_LOG2E, g_off = cq * smooth_q, g_off_t = cq * (1.f - smoothing + smooth_q);
            // The target's offset from this thread's column 0 of the tile, if in the tile (-1 if not):
            // compared with compile-time offsets below.
            const int t_rel = (t >= n0 && t < n0 + H_BN) ? (int)(t - n0) - hopper_col0() : -1;
            T* grow = G + (i64)row * ldg;
#pragma unroll
            for (int a = 0; a < 8; ++a) {  // 32 columns: groups j = 4 a .. 4 a + 3
                unsigned w[4];
#pragma unroll
                for (int jj = 0; jj < 4; ++jj) {
                    const int j = 4 * a + jj, col = n0 + j * 8 + hopper_col0();
                    float g[2];
#pragma unroll
                    for (int q = 0; q < 2; ++q) {
                        float z = acc[4 * j + 2 * h + q];
                        if (HAS_BIAS) z += (col + q < Vc) ? to_f32(bias[v0 + col + q]) : 0.f;
                        const float y = apply_softcap<SOFTCAP>(z, softcap);
                        const float p = fast_exp2(fmaf(y, H_LOG2E, -l2));
                        const bool is_t = t_rel == j * 8 + q;
                        if (FILTER)  // as lce_backward.cu: a z-loss / grad_lse term (cp != cq) keeps p >= eps
                            live[j * 8 / CCE_BN] |= (fabsf(p - (is_t ? 1.f : 0.f)) >= filter_eps ||
                                                     (cp != cq && p >= filter_eps)) && (cp != 0.f || cq != 0.f);
                        float gq = fmaf(cp, p, is_t ? -g_off_t : -g_off);
                        if (SOFTCAP) gq *= softcap_grad(z, softcap);
                        g[q] = gq;
                    }
                    w[jj] = pack_pair<T>(g[0], g[1]);
                }
                quad_transpose(w, lanes);  // this thread now holds columns n0 + 32 a + 8 k .. + 7, k = lane % 4
                const int col = n0 + 32 * a + 8 * (threadIdx.x & 3);
                if (col >= Vc) continue;
                if (col + 8 <= Vc) {
                    *reinterpret_cast<uint4*>(grow + col) = make_uint4(w[0], w[1], w[2], w[3]);
                } else {  // the chunk's last columns (constant indices keep w in registers)
#pragma unroll
                    for (int e = 0; e < 8; ++e)
                        if (col + e < Vc)
                            reinterpret_cast<unsigned short*>(grow)[col + e] = (unsigned short)(w[e >> 1] >> (16 * (e & 1)));
                }
            }
        }
        if (FILTER) {
            const bool live0 = consumers_any(live[0]), live1 = consumers_any(live[1]);
            const int flag_cols = (Vc + CCE_BN - 1) / CCE_BN, fc = n0 / CCE_BN;
            if (threadIdx.x == H_PRODUCERS && m0 < N) {
                flags[(i64)blockIdx.x * flag_cols + fc] = live0;
                if (fc + 1 < flag_cols) flags[(i64)blockIdx.x * flag_cols + fc + 1] = live1;
            }
        }
    }
};

template <int CLUSTER, typename T, bool HAS_BIAS, bool SOFTCAP, bool FILTER, typename TI>
__global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(H_THREADS, 1)
    lce_grad_logits_sm90(const __grid_constant__ TmaDesc tmap_e, const __grid_constant__ TmaDesc tmap_c,
                         const T* __restrict__ bias,
                         const TI* __restrict__ targets, const float* __restrict__ lse,
                         const float* __restrict__ coef_p, const float* __restrict__ coef_q, T* __restrict__ G,
                         int* __restrict__ flags, int N, int V, int D, int v0, int Vc, long long ldg,
                         float softcap, float smoothing, float filter_eps, int cols_per_block,
                         const int* __restrict__ run_if) {
    if (not_requested(run_if)) return;  // before any cluster barrier: every block of the grid returns
    extern __shared__ __align__(16) char smem[];
    const int m0 = blockIdx.x * H_BM, n_begin = blockIdx.y * cols_per_block;
    GradEpilogue<HAS_BIAS, SOFTCAP, FILTER, T, TI> epi{bias, targets, lse, coef_p, coef_q, G, flags, N, V, v0,
                                                      Vc, m0, (i64)ldg, softcap, smoothing, filter_eps};
    // The chunk's C rows start at v0; columns past Vc (the next chunk's) are computed, not stored.
    hopper_tiles_ws<CLUSTER, T>(&tmap_e, &tmap_c, v0, D, m0, n_begin, min(Vc, n_begin + cols_per_block), smem, epi);
}

// ---------------------------------------------------------------------------------------------
// lce_grad_sparse_sm90<CLUSTER, T, HAS_BIAS, SOFTCAP, TI>
//   Filtered backward, step 1 (the others are in lce_sparse.cu): the logit gradient kept as
//   per-row lists of candidate elements, never as a dense chunk, and each row's dropped softmax mass
//   for its certificate (docs/design.md, "Certified filtering").
//   Same operands, grid and smem as lce_forward_partials_sm90 (row blocks x vocabulary splits of
//   v_per_split columns; tmap_c's box 256 / CLUSTER rows). lse, coef_p, coef_q: (N,) fp32.
//   For each row i whose coefficients are not both 0, every column j that is the row's target or
//   has softmax p_ij >= filter_eps (tested as y_ij >= lse_i + log_eps, so no exp is taken for
//   the others) is appended to row i's list:
//       slot = atomicAdd(&row_count[i], 1);  entries[i * slots + slot] = (j, g_ij as float bits)
//       g_ij = (coef_p_i * p_ij - coef_q_i * ((1 - ls) [j == t_i] + ls / V)) * softcap'(z_ij),
//   except that without SOFTCAP the constant -coef_q_i ls / V is left out of every entry (the
//   sparse sums add it for all V columns as rank-one terms). A row with more than `slots` such
//   columns keeps counting (row_count[i] > slots: its list is incomplete, and the certificate sends
//   it to the exact path). dropped[i] += the sum of p_ij over the other columns, in fp32 (each
//   thread sums its share of the block's columns, the four threads of a row combine, one atomicAdd
//   a row and block). row_count and dropped start at 0.
//   The list order depends on block timing: sums over it are not bitwise reproducible.
// ---------------------------------------------------------------------------------------------
template <bool HAS_BIAS, bool SOFTCAP, typename T, typename TI> struct SparseGradEpilogue {
    static constexpr bool SPLIT_HALVES = false;  // hopper_tiles_ws: whole tiles
    const T* bias;
    const TI* targets;
    const float *lse, *coef_p, *coef_q;
    int2* entries;
    int* row_count;
    int N, v_end, m0, slots;
    float softcap, log_eps, smooth_t, smooth_all;  // smooth_t = 1 - ls; smooth_all = ls / V, 0 unless SOFTCAP
    float dropped[2] = {0.f, 0.f};  // this thread's share of its two rows' dropped mass

    __device__ __forceinline__ void operator()(int n0, float (&acc)[128]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + hopper_row0() + 8 * h;
            if (row >= N) continue;
            const float cp = coef_p[row], cq = coef_q[row];
            if (cp == 0.f && cq == 0.f) continue;  // ignored row: no gradient
            const float l = lse[row], threshold = l + log_eps, l2 = l * H_LOG2E;
            const long long t = (long long)targets[row];
            float drop = 0.f;
#pragma unroll
            for (int j = 0; j < 32; ++j)
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    const int col = n0 + j * 8 + hopper_col0() + q;
                    float z = acc[4 * j + 2 * h + q];
                    if (HAS_BIAS) z += (col < v_end) ? to_f32(bias[col]) : 0.f;
                    const float y = apply_softcap<SOFTCAP>(z, softcap);
                    const bool is_t = (t == (long long)col);
                    if (col >= v_end) continue;
                    if (y >= threshold || is_t) {
                        float g = cp * __expf(y - l) - cq * ((is_t ? smooth_t : 0.f) + smooth_all);
                        if (SOFTCAP) g *= softcap_grad(z, softcap);
                        const int slot = atomicAdd(row_count + row, 1);
                        if (slot < slots) entries[(i64)row * slots + slot] = make_int2(col, __float_as_int(g));
                    } else {
                        drop += fast_exp2(fmaf(y, H_LOG2E, -l2));  // the exact path's p_ij
                    }
                }
            dropped[h] += drop;
        }
    }
};

template <int CLUSTER, typename T, bool HAS_BIAS, bool SOFTCAP, typename TI>
__global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(H_THREADS, 1)
    lce_grad_sparse_sm90(const __grid_constant__ TmaDesc tmap_e, const __grid_constant__ TmaDesc tmap_c,
                         const T* __restrict__ bias, const TI* __restrict__ targets, const float* __restrict__ lse,
                         const float* __restrict__ coef_p, const float* __restrict__ coef_q,
                         int2* __restrict__ entries, int* __restrict__ row_count, float* __restrict__ dropped, int N,
                         int V, int D, int v_per_split, int slots, float softcap, float log_eps, float smoothing) {
    extern __shared__ __align__(16) char smem[];
    const int m0 = blockIdx.x * H_BM;
    const int v_begin = blockIdx.y * v_per_split, v_end = min(V, v_begin + v_per_split);
    SparseGradEpilogue<HAS_BIAS, SOFTCAP, T, TI> epi{
        bias, targets, lse, coef_p, coef_q, entries, row_count, N, v_end, m0, slots, softcap, log_eps,
        1.f - smoothing, SOFTCAP ? smoothing / (float)V : 0.f};
    hopper_tiles_ws<CLUSTER, T>(&tmap_e, &tmap_c, 0, D, m0, v_begin, v_end, smem, epi);
    if (!is_consumer()) return;
    // Combine the four threads (lanes 4k .. 4k+3) that share each row, then one atomic a row.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float s = epi.dropped[h];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        const int row = m0 + hopper_row0() + 8 * h;
        if ((threadIdx.x & 3) == 0 && row < N && s != 0.f) atomicAdd(dropped + row, s);
    }
}
