"""CuPy launchers: grids, scratch layout and kernel choice for flattened, validated arrays.

Every launcher writes into outputs the caller provides and runs on CuPy's current stream, so the
same code serves the CuPy API (which allocates) and the JAX bridge (which hands in XLA buffers and
scratch, and sets the stream). Shapes and dtypes are checked by the API layers, not here.
"""

from __future__ import annotations

import functools
import heapq
import os
import threading

import numpy as np

from cce_cupy import autotune
from cce_cupy.kernel_loader import get_kernel
from cce_cupy.kernel_sources import (
    CE_CLUSTER_SIZES,
    CE_SLICE_BYTES_MAX,
    CE_SLICE_BYTES_SHARED_SM,
    GEMM_SMEM_BYTES,
    HOPPER_DTYPES,
    HOPPER_SMEM_BYTES,
    HOPPER_THREADS,
    HOPPER_TILE_N,
    THREADS,
    TILE_M,
    TILE_N,
    dtype_name,
    template_name,
)
from cce_cupy.options import CCEOptions, dtype_eps

# Forward: enough (row-block x vocab-split) blocks to fill the GPU several times over, from the
# shape alone (so JAX can size the scratch at trace time).
FORWARD_TARGET_BLOCKS = 1024
# Hopper forward splits (forward_splits): blocks of at most this many 256-column tiles, and at most
# this much scratch for the per-split partials.
HOPPER_MAX_BLOCK_TILES = 8
FORWARD_PARTIALS_BYTES = 12 << 20
# The Hopper forward runs one 193 KiB block per SM; its splits are chosen for this many SMs (an
# H100 SXM / H200), from the shape alone like the above. Other SM counts only lose balance. A
# block costs about this fraction of a tile beyond its tiles (fitted to NOTES.md v12's timings).
HOPPER_SMS = 132
HOPPER_BLOCK_OVERHEAD = 0.1
HOPPER_DRIFT_WAVES = 4  # grids of this many waves or more finish ragged (see _hopper_schedule_length)
# Backward: the logit-gradient chunk (rows x Vc) is kept under GRAD_CHUNK_BYTES, the fp32 dE
# accumulator of a row part (rows x D) that 16-bit gradients need under DE_ACC_BYTES, the two
# together under BACKWARD_BUFFERS_BYTES, and a part under BACKWARD_PART_ROWS rows: with the O(N)
# buffers the scratch stays under 64 MiB at any N, D, V. Fewer, taller parts re-read dC less often
# but leave narrower chunks: parts of 2048-2176 rows with chunks of 6144-8192 columns were the
# fastest measured plans, 1408-1664 rows and 2816-3328 rows slower by 4-10% (NOTES.md, b1).
GRAD_CHUNK_BYTES = 32 << 20
DE_ACC_BYTES = 32 << 20
BACKWARD_BUFFERS_BYTES = 56 << 20
BACKWARD_PART_ROWS = 2304
# Filtered backward on Hopper (sparse): each row keeps a list of at most `slots` non-negligible
# gradient elements, 8 bytes each, twice (by row, then sorted by column): the lists get at most
# SPARSE_LIST_BYTES, a row at most SPARSE_MAX_SLOTS, and with fewer than SPARSE_MIN_SLOTS per row
# (N > 196608) the tiled backward runs instead. A row needing more slots than it has falls back
# to the tiled backward at run time (see launch_backward).
SPARSE_LIST_BYTES = 48 << 20
SPARSE_MAX_SLOTS = 1024
SPARSE_MIN_SLOTS = 16
KERNEL_FAMILIES = ("auto", "sm80")


def kernels_from_env() -> str:
    """The kernel family CCE_CUPY_KERNELS names: "auto" (also when unset or empty): the wgmma kernels
    on compute capability 9.0 for 16-bit inputs where their alignment holds; "sm80": always the
    mma.sync / FFMA kernels (the fallback, and the way to test it on a Hopper GPU)."""
    value = os.environ.get("CCE_CUPY_KERNELS", "").strip()
    if not value:
        return "auto"
    if value not in KERNEL_FAMILIES:
        raise ValueError(f"CCE_CUPY_KERNELS must be one of {', '.join(KERNEL_FAMILIES)} (or unset: auto), "
                         f"got {value!r}")
    return value


KERNELS = kernels_from_env()
_ALIGN = 256  # scratch sub-buffers start on 256-byte boundaries


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _itemsize(dtype) -> int:
    return 2 if dtype_name(dtype) in ("float16", "bfloat16") else 4


def _null():
    return np.uint64(0)  # a null pointer kernel argument


def _ptr(a):
    return _null() if a is None else a


def _aligned(*arrays, ld: int) -> bool:
    """16-byte vector loads are legal: leading dimension and every base pointer allow them."""
    itemsize = arrays[0].dtype.itemsize
    return (ld * itemsize) % 16 == 0 and all(a.data.ptr % 16 == 0 for a in arrays)


# ------------------------------------------------------------------------------------ forward
@functools.lru_cache(maxsize=256)
def forward_splits(n: int, v: int, tile_n: int = TILE_N) -> tuple[int, int]:
    """(number of vocab splits, columns per split) for the forward grid with `tile_n`-wide tiles.

    Cached: it runs at every forward and backward call (and JAX traces), and the Hopper search
    below is a few hundred microseconds of Python."""
    row_blocks = max(1, _cdiv(n, TILE_M))
    col_tiles = max(1, _cdiv(v, tile_n))
    if tile_n == HOPPER_TILE_N:
        # One block per SM, so the grid runs as a list schedule: pick the tiles a block with the
        # shortest simulated schedule (NOTES.md v12), fewer splits among equals. At most
        # HOPPER_MAX_BLOCK_TILES tiles a block (NOTES.md v10: 500-tile blocks were 10-15% slower),
        # and at most FORWARD_PARTIALS_BYTES of partials.
        max_splits = max(1, FORWARD_PARTIALS_BYTES // (12 * n))
        candidates = [t for t in range(1, min(col_tiles, HOPPER_MAX_BLOCK_TILES) + 1)
                      if _cdiv(col_tiles, t) <= max_splits] or [_cdiv(col_tiles, max_splits)]
        per_tiles = min(candidates, key=lambda t: (_hopper_schedule_length(row_blocks, col_tiles, t), -t))
        splits = _cdiv(col_tiles, per_tiles)
    else:
        splits = min(col_tiles, max(1, _cdiv(FORWARD_TARGET_BLOCKS, row_blocks)))
    per_split = _cdiv(col_tiles, splits) * tile_n
    return _cdiv(v, per_split), per_split


def _hopper_schedule_length(row_blocks: int, col_tiles: int, tiles: int) -> float:
    """Expected time, in tiles, until the last SM finishes a Hopper grid of blocks of `tiles`
    tiles (the last split shorter), each costing HOPPER_BLOCK_OVERHEAD more (pipeline fill,
    partials store, launch).

    The blocks go in grid order to HOPPER_SMS SMs, each to the SM free first. That list schedule is
    what runs while the blocks of a wave start and end together; over several waves they drift
    apart (clocks, L2 hits), and the SMs then finish anywhere within the last block: half a block
    more on average, which is what makes shorter blocks pay at large grids (NOTES.md v12).
    """
    splits = _cdiv(col_tiles, tiles)
    full = (splits - 1) * row_blocks  # blocks of `tiles` tiles, before the last split's
    cost = tiles + HOPPER_BLOCK_OVERHEAD
    waves, extra = divmod(full, HOPPER_SMS)
    busy = [(waves + 1) * cost] * extra + [waves * cost] * (HOPPER_SMS - extra)
    heapq.heapify(busy)
    last = col_tiles - (splits - 1) * tiles + HOPPER_BLOCK_OVERHEAD
    for _ in range(row_blocks):
        heapq.heappush(busy, heapq.heappop(busy) + last)
    drift = 0.5 * tiles if splits * row_blocks >= HOPPER_DRIFT_WAVES * HOPPER_SMS else 0.0
    return max(busy) + drift


def forward_scratch_nbytes(n: int, v: int, d: int, dtype) -> int:
    """Bytes of scratch `launch_forward` needs: 3 fp32 partials per (row, split), for either kernel
    family, then the (N,) fp32 target logits the tiled forward takes from its tiles."""
    return max(_ALIGN, _forward_target_offset(n, v) + n * 4)


def _forward_target_offset(n: int, v: int) -> int:
    """Byte offset of the target logits in the forward scratch: after the larger family's partials."""
    splits = max(forward_splits(n, v, TILE_N)[0], forward_splits(n, v, HOPPER_TILE_N)[0])
    return _round_up(3 * splits * n * 4, _ALIGN)


_TMA_CACHE: dict[tuple, np.ndarray] = {}


def tma_desc(a, box_rows: int) -> np.ndarray:
    """TMA tensor map of a row-major (rows, D) CuPy array (16-bit, or fp32 for TF32), box of
    box_rows x 128 bytes (64 or 32 elements), 128-byte swizzle, zero fill out of bounds: the 128
    bytes of a CUtensorMap as a one-element NumPy array, which CuPy passes by value (the kernels'
    __grid_constant__ TmaDesc parameter).
    Cached by address and shape: encoding costs a driver call."""
    import ctypes

    from cuda.bindings import driver

    rows, d = a.shape
    key = (a.data.ptr, rows, d, a.strides[0], a.dtype.name, box_rows)
    desc = _TMA_CACHE.get(key)
    if desc is not None:
        return desc
    dtypes = {
        "bfloat16": driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        "float16": driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        "float32": driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
    }
    err, tmap = driver.cuTensorMapEncodeTiled(
        dtypes[a.dtype.name], 2, a.data.ptr,
        [driver.cuuint64_t(d), driver.cuuint64_t(max(rows, 1))], [driver.cuuint64_t(a.strides[0])],
        [driver.cuuint32_t(128 // a.itemsize), driver.cuuint32_t(box_rows)],
        [driver.cuuint32_t(1), driver.cuuint32_t(1)],
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err}) for a {a.dtype.name} array of shape {a.shape}")
    desc = np.frombuffer(ctypes.string_at(tmap.getPtr(), 128), dtype=np.dtype((np.void, 128))).copy()
    if len(_TMA_CACHE) > 256:  # addresses of freed arrays accumulate; keep the cache small
        _TMA_CACHE.clear()
    _TMA_CACHE[key] = desc
    return desc


def use_hopper(*arrays, ld: int, tf32: bool = False) -> bool:
    """The wgmma kernels apply: Hopper GPU, 16-bit inputs (or fp32 ones with `tf32`: the forward
    under allow_tf32), 16-byte aligned rows and bases."""
    import cupy

    dtypes = HOPPER_DTYPES + (("float32",) if tf32 else ())
    return (
        KERNELS == "auto"
        and dtype_name(arrays[0].dtype) in dtypes
        and cupy.cuda.Device().compute_capability == "90"
        and _aligned(*arrays, ld=ld)
    )


def hopper_row_blocks(n: int, cluster: int) -> int:
    """grid.x of the Hopper kernels: the 128-row blocks, rounded up to whole clusters."""
    return _round_up(_cdiv(n, TILE_M), cluster)


def hopper_operands(e, c, cluster: int) -> tuple[np.ndarray, np.ndarray]:
    """The Hopper kernels' two TMA maps: E in 128-row boxes, C in 256 / cluster-row boxes (each
    block of a cluster loads its share of the C tile and multicasts it)."""
    return tma_desc(e, TILE_M), tma_desc(c, HOPPER_TILE_N // cluster)


_GPU_NAMES: dict[int, str] = {}


def gpu_name() -> str:
    """The current device's name (the autotuner's cache is per GPU model)."""
    import cupy

    dev = cupy.cuda.Device().id
    if dev not in _GPU_NAMES:
        _GPU_NAMES[dev] = cupy.cuda.runtime.getDeviceProperties(dev)["name"].decode()
    return _GPU_NAMES[dev]


def launch_forward(e, c, targets, bias, opts: CCEOptions, lse_out, tgt_out, scratch=None, bad_target=None,
                   tune: bool = True):
    """Per-row lse and target term of softcap(e @ c.T + bias); see CONTRACT.md.

    tune: on Hopper, a shape class seen for the first time may be timed with each kernel variant
    (cce_cupy.autotune; it synchronizes once; tune() does it ahead). False (JAX callbacks): cached choice or default.
    """
    import cupy

    n, d = e.shape
    v = c.shape[0]
    if n == 0:
        return
    hopper = use_hopper(e, c, ld=d, tf32=opts.allow_tf32)
    splits, per_split = forward_splits(n, v, HOPPER_TILE_N if hopper else TILE_N)
    if scratch is None:
        scratch = cupy.empty(forward_scratch_nbytes(n, v, d, e.dtype), dtype=cupy.uint8)
    part = scratch[: 3 * splits * n * 4].view(cupy.float32)
    # The tiled forward hands the finish kernel its target logits; the Hopper one leaves null (gather-dot).
    y_off = _forward_target_offset(n, v)
    y_target = None if hopper else scratch[y_off : y_off + n * 4].view(cupy.float32)
    if bad_target is None:
        bad_target = target_error_flag()
    flags = (bias is not None, opts.softcap is not None, opts.label_smoothing > 0.0)
    softcap = np.float32(opts.softcap or 0.0)

    if hopper:

        def run_partials(cluster: int) -> None:
            partials = get_kernel("lce_hopper.cu",
                                  template_name("lce_forward_partials_sm90", cluster, e.dtype, *flags))
            partials(
                (hopper_row_blocks(n, cluster), splits), (HOPPER_THREADS,),
                (*hopper_operands(e, c, cluster), _ptr(bias), part, np.int32(n),
                 np.int32(v), np.int32(d), np.int32(per_split), softcap),
                shared_mem=HOPPER_SMEM_BYTES,
            )

        def time_candidate(cluster: int) -> float:
            return autotune.time_on_stream(lambda: run_partials(cluster))

        run_partials(autotune.hopper_cluster(gpu_name(), dtype_name(e.dtype), n, d, v,
                                             time_candidate if tune else None))
    else:
        partials = get_kernel("lce_forward.cu", template_name("lce_forward_partials", e.dtype, *flags, targets.dtype))
        partials(
            (_cdiv(n, TILE_M), splits), (THREADS,),
            (e, c, _ptr(bias), targets, part, y_target, np.int32(n), np.int32(v), np.int32(d), np.int32(per_split),
             softcap, np.int32(_aligned(e, c, ld=d))),
            shared_mem=GEMM_SMEM_BYTES,
        )
    finish = get_kernel("lce_forward.cu", template_name("lce_forward_finish", e.dtype, *flags, targets.dtype))
    rows_per_block = THREADS // 32
    finish(
        (_cdiv(n, rows_per_block),), (THREADS,),
        (e, c, _ptr(bias), targets, part, _ptr(y_target), lse_out, tgt_out, bad_target, np.int32(n), np.int32(v),
         np.int32(d), np.int32(splits), softcap, np.float32(opts.label_smoothing), np.int64(opts.ignore_index),
         np.int32(hopper and e.dtype == np.float32)),
    )


# ----------------------------------------------------------------------------------- backward
def backward_blocking(n: int, v: int, d: int, dtype, opts: CCEOptions) -> tuple[int, int, bool]:
    """(rows per part, vocabulary columns per chunk, fp32 dE accumulator needed) of the backward.

    The backward walks row parts, and inside each the vocabulary in chunks: the logit gradient of
    one (part, chunk) lives in scratch (<= GRAD_CHUNK_BYTES). 16-bit gradients over several chunks
    accumulate dE in an fp32 buffer of one part's rows (<= DE_ACC_BYTES), hence the row parts.
    """
    itemsize = _itemsize(dtype)

    def chunk(rows, nbytes=GRAD_CHUNK_BYTES):
        cols = nbytes // max(1, rows * itemsize) // HOPPER_TILE_N * HOPPER_TILE_N
        return max(HOPPER_TILE_N, min(_round_up(v, HOPPER_TILE_N), cols))

    rows = max(n, 1)
    vc = chunk(rows)
    need_acc = opts.grad_dtype != "float32" and itemsize == 2 and vc < v
    if need_acc:
        cap = max(TILE_M, min(BACKWARD_PART_ROWS, DE_ACC_BYTES // (d * 4)) // TILE_M * TILE_M)
        rows = min(rows, _round_up(_cdiv(rows, _cdiv(rows, cap)), TILE_M))
        vc = chunk(rows, min(GRAD_CHUNK_BYTES, BACKWARD_BUFFERS_BYTES - rows * d * 4))
        need_acc = vc < v
    if rows * vc * itemsize > GRAD_CHUNK_BYTES:  # even the narrowest chunk is too big: fewer rows a part
        rows = max(TILE_M, GRAD_CHUNK_BYTES // (vc * itemsize) // TILE_M * TILE_M)
    return rows, vc, need_acc


def sparse_slots(n: int, d: int, dtype, opts: CCEOptions) -> int:
    """List slots per row of the sparse filtered backward, or 0 where it is not used.

    From the shapes and options alone (JAX sizes the scratch at trace time); launch_backward adds
    the run-time conditions (a Hopper GPU, aligned arrays). Not with deterministic=True: the lists
    are filled in block-timing order, so their sums are not bitwise reproducible.
    """
    if opts.filter_eps is None or opts.deterministic or dtype_name(dtype) not in HOPPER_DTYPES or d % 8:
        return 0
    slots = min(SPARSE_MAX_SLOTS, SPARSE_LIST_BYTES // (16 * max(n, 1)))
    return slots if slots >= SPARSE_MIN_SLOTS else 0


def _backward_layout(n: int, v: int, d: int, dtype, opts: CCEOptions) -> dict[str, tuple[int, int]]:
    """Byte (offset, size) of each scratch buffer of the backward.

    The sparse backward's counters (its overflow flag first) come first; after them the tiled
    backward's buffers and the sparse lists overlap: the tiled backward runs only where the
    sparse one gave up (overflow), and reads the flag, so the flag is outside the overlap.
    """
    rows, vc, need_acc = backward_blocking(n, v, d, dtype, opts)
    slots = sparse_slots(n, d, dtype, opts)
    counters = {"counts": (1 + n + v) * 4 if slots else 0}  # overflow flag, row_count (N), col_count (V)
    tiled = {
        "G": rows * vc * _itemsize(dtype),
        "flags": _cdiv(rows, TILE_M) * _cdiv(vc, TILE_N) * 4,
        "de_acc": rows * d * 4 if need_acc else 0,
    }
    lists = {"col_start": (v + 1) * 4, "entries": n * slots * 8, "by_col": n * slots * 8} if slots else {}

    def place(sizes, off):
        for name, size in sizes.items():
            layout[name] = (off, size)
            off = _round_up(off + size, _ALIGN)
        return off

    layout: dict[str, tuple[int, int]] = {}
    shared = place(counters, 0)
    place(tiled, shared)
    place(lists, shared)
    return layout


def backward_scratch_nbytes(n: int, v: int, d: int, dtype, opts: CCEOptions) -> int:
    return max(_ALIGN, max(off + size for off, size in _backward_layout(n, v, d, dtype, opts).values()))


def launch_backward(e, c, targets, bias, opts: CCEOptions, lse, coef_p, coef_q, de_out, dc_out, dbias_out=None,
                    scratch=None, use_cublas: bool = True, host_sync: bool = True):
    """dE, dC (and dbias) of the loss whose per-row coefficients are coef_p, coef_q; see CONTRACT.md.

    Exact gradients: a recompute kernel writes the logit gradient of one (row part, vocabulary
    chunk) at a time, and cuBLAS runs the two gradient GEMMs on it, unless `use_cublas` is False
    (CUDA-graph capture, where CuPy refuses cuBLAS calls: our tiled GEMMs run instead). Each
    gradient element is written by one kernel or GEMM in a fixed order: bitwise reproducible.

    Filtered gradients (filter_eps) on Hopper, where sparse_slots() allows: the sparse backward
    (lce_grad_sparse_sm90, lce_sparse.cu) keeps only the gradient elements with
    |softmax - onehot| >= eps (and each row's target) as lists and sums dE and dC over them. A row
    with more such elements than its slots makes it give up; the tiled filtered backward (dense
    chunks, our GEMMs skipping the 128 x 128 tiles where every element is below eps) then runs
    instead. host_sync: find that out by reading the flag (CuPy API); False (JAX callbacks): the
    tiled kernels are launched anyway and do nothing unless the flag is set. Elsewhere, and with
    deterministic=True, filtered gradients always take the tiled path.
    """
    import cupy

    n, d = e.shape
    v = c.shape[0]
    if n == 0 or v == 0:  # no rows: every gradient is zero
        de_out.fill(0)
        dc_out.fill(0)
        if dbias_out is not None:
            dbias_out.fill(0)
        return
    layout = _backward_layout(n, v, d, e.dtype, opts)
    if scratch is None:
        scratch = cupy.empty(backward_scratch_nbytes(n, v, d, e.dtype, opts), dtype=cupy.uint8)

    def buf(name, dtype, shape):
        off, size = layout[name]
        return scratch[off : off + size].view(dtype).reshape(shape)

    rows, vc_max, need_acc = backward_blocking(n, v, d, e.dtype, opts)
    eps = opts.resolved_filter_eps(dtype_eps(e.dtype))
    hopper = use_hopper(e, c, ld=d)
    # The forward of this shape picked (and cached) the cluster size; the recompute uses the same.
    cluster = autotune.hopper_cluster(gpu_name(), dtype_name(e.dtype), n, d, v) if hopper else 1
    run_if = None
    slots = sparse_slots(n, d, e.dtype, opts)
    if slots and hopper and _aligned(de_out, dc_out, ld=d):
        counts = buf("counts", np.int32, (1 + n + v,))
        lists = {name: buf(name, np.int32, (-1,)) for name in ("col_start", "entries", "by_col")}
        overflow = _sparse_backward(e, c, targets, bias, opts, eps, lse, coef_p, coef_q, de_out, dc_out, dbias_out,
                                    counts, lists, slots, cluster)
        if not host_sync:
            run_if = overflow  # the tiled kernels below run only if the sparse lists overflowed
        elif not int(overflow.get()[0]):
            return
    plan = _BackwardPlan(
        opts=opts, eps=eps, vc_max=vc_max,
        G=buf("G", e.dtype, (rows, vc_max)),
        flags=buf("flags", np.int32, (_cdiv(rows, TILE_M), _cdiv(vc_max, TILE_N))) if eps is not None else None,
        de_acc=buf("de_acc", np.float32, (rows, d)) if need_acc else None,
        hopper=hopper, use_cublas=use_cublas and eps is None, cluster=cluster, run_if=run_if,
    )
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        plan.run_part(e[r0:r1], c, targets[r0:r1], bias, lse[r0:r1], coef_p[r0:r1], coef_q[r0:r1], de_out[r0:r1],
                      dc_out, dbias_out, first_part=(r0 == 0))


def _sparse_backward(e, c, targets, bias, opts, eps, lse, coef_p, coef_q, de_out, dc_out, dbias_out, counts, lists,
                     slots, cluster):
    """The five steps of the sparse filtered backward (lce_hopper.cu, lce_sparse.cu); returns its
    overflow flag ((1,) int32 on the device: 1 if some row had more than `slots` elements, and
    then nothing was written)."""
    import cupy

    n, d = e.shape
    v = c.shape[0]
    overflow, row_count, col_count = counts[:1], counts[1 : 1 + n], counts[1 + n :]
    cupy.cuda.runtime.memsetAsync(counts.data.ptr, 0, counts.nbytes, cupy.cuda.get_current_stream().ptr)
    col_start, entries, by_col = lists["col_start"], lists["entries"], lists["by_col"]
    splits, per_split = forward_splits(n, v, HOPPER_TILE_N)
    recompute = get_kernel("lce_hopper.cu", template_name(
        "lce_grad_sparse_sm90", cluster, e.dtype, bias is not None, opts.softcap is not None, targets.dtype))
    recompute(
        (hopper_row_blocks(n, cluster), splits), (HOPPER_THREADS,),
        (*hopper_operands(e, c, cluster), _ptr(bias), targets, lse, coef_p, coef_q,
         entries, row_count, overflow, np.int32(n), np.int32(v), np.int32(d), np.int32(per_split), np.int32(slots),
         np.float32(opts.softcap or 0.0), np.float32(np.log(eps))),
        shared_mem=HOPPER_SMEM_BYTES,
    )

    def sparse(name):
        return get_kernel("lce_sparse.cu", name)

    warp_rows = (_cdiv(n, 8),), (256,)  # one warp per row
    sparse("sparse_count_cols")(*warp_rows, (entries, row_count, col_count, overflow, np.int32(n), np.int32(slots)))
    sparse("sparse_scan_cols")((1,), (1024,), (col_count, col_start, overflow, np.int32(v)))
    sparse("sparse_scatter_cols")(
        *warp_rows, (entries, row_count, col_count, col_start, by_col, overflow, np.int32(n), np.int32(slots)))
    sparse(template_name("sparse_grad_rows", e.dtype, de_out.dtype))(
        (n,), (128,), (c, entries, row_count, overflow, de_out, np.int32(d), np.int32(slots)))
    sparse(template_name("sparse_grad_cols", e.dtype, dc_out.dtype, dbias_out is not None))(
        (v,), (128,), (e, by_col, col_start, overflow, dc_out, _ptr(dbias_out), np.int32(d)))
    return overflow


class _BackwardPlan:
    """The kernels of one backward call, run over the row parts (see backward_blocking)."""

    def __init__(self, opts, eps, vc_max, G, flags, de_acc, hopper, use_cublas, cluster, run_if=None):
        self.opts, self.eps, self.vc_max, self.G, self.flags, self.de_acc, self.hopper = (
            opts, eps, vc_max, G, flags, de_acc, hopper)
        self.use_cublas = use_cublas
        self.cluster = cluster  # of the Hopper recompute kernel
        # None, or a device flag: every kernel does nothing unless it is set (the sparse path's fallback).
        self.run_if = _ptr(run_if)

    def run_part(self, e, c, targets, bias, lse, coef_p, coef_q, de_out, dc_out, dbias_out, first_part):
        n, d = e.shape
        v = c.shape[0]
        opts, vc_max, flags = self.opts, self.vc_max, self.flags
        G = self.G[:n]
        use_filter = self.eps is not None
        if self.hopper:
            grad_logits = get_kernel("lce_hopper.cu", template_name(
                "lce_grad_logits_sm90", self.cluster, e.dtype, e.dtype, bias is not None, opts.softcap is not None,
                use_filter, targets.dtype))
            grad_smem, grad_threads = HOPPER_SMEM_BYTES, HOPPER_THREADS
        else:
            grad_logits = get_kernel("lce_backward.cu", template_name(
                "lce_grad_logits", e.dtype, e.dtype, bias is not None, opts.softcap is not None, use_filter,
                targets.dtype))
            grad_smem, grad_threads = GEMM_SMEM_BYTES, THREADS
        g_aligned = _aligned(G, ld=vc_max)
        if self.hopper and not g_aligned:  # its 16-byte stores; the scratch layout guarantees this
            raise RuntimeError(f"backward scratch not 16-byte aligned (at {G.data.ptr:#x}); pass an aligned buffer")
        aligned_in = np.int32(_aligned(e, c, ld=d))
        aligned_g = np.int32(bool(aligned_in) and g_aligned)

        nchunks = _cdiv(v, vc_max)
        for k in range(nchunks):
            v0 = k * vc_max
            vc = min(vc_max, v - v0)
            flag_cols = _cdiv(vc, TILE_N)
            if self.hopper:
                # Several tiles a block, one grid wave where it can (the forward's split rule): a
                # block's pipeline fill and the last wave's idle SMs are paid once, not per tile.
                col_blocks, cols_per_block = forward_splits(n, vc, HOPPER_TILE_N)
                operands = hopper_operands(e, c, self.cluster)
                grid, tail = (hopper_row_blocks(n, self.cluster), col_blocks), (np.int32(cols_per_block),)
            else:
                operands, grid, tail = (e, c), (_cdiv(n, TILE_M), _cdiv(vc, TILE_N)), (aligned_in,)
            grad_logits(
                grid, (grad_threads,),
                (*operands, _ptr(bias), targets, lse, coef_p, coef_q, G, _ptr(flags), np.int32(n), np.int32(v),
                 np.int32(d), np.int32(v0), np.int32(vc), np.int64(vc_max), np.float32(opts.softcap or 0.0),
                 np.float32(opts.label_smoothing), np.float32(self.eps or 0.0), *tail, self.run_if),
                shared_mem=grad_smem,
            )
            Gc = G[:, :vc]
            # dC[v0 : v0 + vc] (+)= G^T @ E: written by the first row part, accumulated by the others.
            dc_chunk = dc_out[v0 : v0 + vc]
            # dE (+)= G @ C[v0 : v0 + vc]: 16-bit gradients accumulate in fp32 and are cast at the end.
            if self.de_acc is None:
                de_target, de_accumulate, de_final = de_out, k > 0, None
            else:
                de_target, de_accumulate = self.de_acc[:n], k > 0
                de_final = de_out if k == nchunks - 1 else None
            if self.use_cublas:
                _gemm_rowmajor(Gc, e, dc_chunk, trans_a=True, accumulate=not first_part)
                _gemm_rowmajor(Gc, c[v0 : v0 + vc], de_target, trans_a=False, accumulate=de_accumulate)
                if de_final is not None:
                    de_final[...] = de_target
            else:
                self._gemms_tiled(Gc, e, c[v0 : v0 + vc], dc_chunk, de_target, de_accumulate, de_final, flag_cols,
                                     first_part, aligned_g)
            if dbias_out is not None:
                bias_grad = get_kernel("reductions.cu", template_name(
                    "lce_bias_grad", e.dtype, dbias_out.dtype, not first_part))
                bias_grad(
                    (_cdiv(vc, 32),), (32, 32),
                    (G, _ptr(flags), dbias_out, np.int32(n), np.int32(vc), np.int64(vc_max), np.int32(v0),
                     self.run_if),
                )

    def _gemms_tiled(self, Gc, e, c_chunk, dc_chunk, de_target, de_accumulate, de_final, flag_cols, first_part,
                        aligned_g):
        """dC and dE of one chunk with our tiled GEMMs (skipping the K-blocks of dead tiles when filtering)."""
        n, d = e.shape
        vc = c_chunk.shape[0]
        flag_ld = np.int64(flag_cols)
        ld_g = np.int64(self.vc_max)

        def gemm(out, a_kmajor: bool, mode: int):
            return get_kernel("lce_backward.cu", template_name("lce_gemm", e.dtype, out.dtype, a_kmajor, False, mode))

        # dC = G^T @ E   (M = vc, N = d, K = n); later row parts add to it (mode 1)
        gemm(dc_chunk, False, 0 if first_part else 1)(
            (_cdiv(vc, TILE_M), _cdiv(d, TILE_N)), (THREADS,),
            (Gc, e, dc_chunk, _null(), _ptr(self.flags), flag_ld, np.int32(2), np.int32(vc), np.int32(d),
             np.int32(n), ld_g, np.int64(d), np.int64(d), aligned_g, self.run_if),
            shared_mem=GEMM_SMEM_BYTES,
        )
        # dE = G @ C_chunk   (M = n, N = d, K = vc); the last chunk of a 16-bit dE folds the
        # fp32 accumulator and casts (mode 2)
        if de_final is not None:
            target, mode, acc_in = de_final, 2, de_target
        else:
            target, mode, acc_in = de_target, (1 if de_accumulate else 0), _null()
        gemm(target, True, mode)(
            (_cdiv(n, TILE_M), _cdiv(d, TILE_N)), (THREADS,),
            (Gc, c_chunk, target, acc_in, _ptr(self.flags), flag_ld, np.int32(1), np.int32(n), np.int32(d),
             np.int32(vc), ld_g, np.int64(d), np.int64(d), aligned_g, self.run_if),
            shared_mem=GEMM_SMEM_BYTES,
        )


_CUDA_DTYPES = {"float32": 0, "float16": 2, "bfloat16": 14}  # cudaDataType: CUDA_R_32F, _16F, _16BF
_CUBLAS_COMPUTE_32F = 68  # fp32 accumulation, no TF32
_CUBLAS_GEMM_DEFAULT = -1


def _gemm_rowmajor(a, b, out, *, trans_a: bool, accumulate: bool) -> None:
    """out (+)= op(a) @ b in fp32 through cuBLAS, on CuPy's current stream.

    Row-major views: a is (K, M) when trans_a else (M, K); b is (K, N); out is (M, N). Each may
    have a row stride larger than its width (a column slice of a wider buffer). cuBLAS is
    column-major, so this computes out^T = b^T @ op(a)^T.
    """
    import cupy
    from cupy_backends.cuda.libs import cublas

    m, n = out.shape
    k = b.shape[0]
    alpha = np.ones(1, np.float32)
    beta = np.full(1, 1.0 if accumulate else 0.0, np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.gemmEx(
        handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N if not trans_a else cublas.CUBLAS_OP_T, n, m, k,
        alpha.ctypes.data, b.data.ptr, _CUDA_DTYPES[b.dtype.name], b.strides[0] // b.itemsize,
        a.data.ptr, _CUDA_DTYPES[a.dtype.name], a.strides[0] // a.itemsize,
        beta.ctypes.data, out.data.ptr, _CUDA_DTYPES[out.dtype.name], out.strides[0] // out.itemsize,
        _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT,
    )


# ------------------------------------------------------------------------- logits-level loss
def launch_cross_entropy(logits, targets, opts: CCEOptions, lse_out, tgt_out, row_grad=None, bad_target=None):
    """Loss terms of materialized logits; with row_grad, dloss/dlogits written in place.

    In place on Hopper the row is read once (ce_logits_inplace_cluster holds it in the shared
    memory of a thread-block cluster); elsewhere ce_logits reads it a second time to write it.
    """
    n, v = logits.shape
    if n == 0:
        return
    if bad_target is None:
        bad_target = target_error_flag()
    flags = (opts.softcap is not None, opts.label_smoothing > 0.0)
    cluster = ce_cluster_size(logits) if row_grad is not None else None
    if cluster is None:
        kernel = get_kernel("reductions.cu", template_name("ce_logits", logits.dtype, targets.dtype, *flags,
                                                           row_grad is not None))
        grid, smem = (n,), 0
    else:
        kernel = get_kernel("reductions.cu", template_name("ce_logits_inplace_cluster", logits.dtype, targets.dtype,
                                                           *flags, cluster))
        grid, smem = (n * cluster,), _ce_slice_bytes(v, logits.itemsize, cluster)
    kernel(
        grid, (THREADS,),
        (logits, targets, _ptr(row_grad), lse_out, tgt_out, bad_target, np.int32(n), np.int32(v),
         np.float32(opts.softcap or 0.0), np.float32(opts.label_smoothing), np.float32(opts.z_loss),
         np.int64(opts.ignore_index)),
        shared_mem=smem,
    )


def ce_cluster_size(logits) -> int | None:
    """Blocks per row of ce_logits_inplace_cluster for these logits, or None where it does not apply.

    It needs a Hopper GPU (clusters), rows that start on 16 bytes, and a row that fits the shared
    memory of at most 8 blocks. The smallest cluster whose slices let two blocks share an SM wins;
    failing that, the smallest whose slices fit at all.
    """
    import cupy

    n, v = logits.shape
    if KERNELS != "auto" or cupy.cuda.Device().compute_capability != "90":
        return None
    if (v * logits.itemsize) % 16 or logits.data.ptr % 16:
        return None
    for limit in (CE_SLICE_BYTES_SHARED_SM, CE_SLICE_BYTES_MAX):
        for cl in CE_CLUSTER_SIZES:
            if _ce_slice_bytes(v, logits.itemsize, cl) <= limit:
                return cl
    return None


def _ce_slice_bytes(v: int, itemsize: int, cluster: int) -> int:
    """Shared memory of one ce_logits_inplace_cluster block: its ceil(V / VEC / cluster) vectors."""
    return _cdiv(v * itemsize, 16 * cluster) * 16


# Per thread: a bad target is reported to the thread whose call had it (api._TargetWatch), and no
# two threads race to create a device's flag.
_TARGET_FLAGS = threading.local()


def target_error_flag():
    """This thread's out-of-range-target flag on the current device ((1,) int32); kernels set it,
    never clear it."""
    import cupy

    flags = _TARGET_FLAGS.__dict__.setdefault("by_device", {})
    dev = cupy.cuda.Device().id
    if dev not in flags:
        flags[dev] = cupy.zeros(1, dtype=cupy.int32)
    return flags[dev]


def tune(n: int, d: int, v: int, dtype="bfloat16") -> int:
    """Tune the Hopper kernels for one shape ahead of time (e.g. before a JAX training loop, whose
    callbacks never tune), on random inputs; returns the cluster size now cached (cce_cupy.autotune)."""
    import cupy
    import ml_dtypes

    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    e = cupy.random.standard_normal((n, d), dtype=cupy.float32).astype(dt)
    c = cupy.random.standard_normal((v, d), dtype=cupy.float32).astype(dt)
    t = cupy.zeros(n, cupy.int32)
    lse, tgt = cupy.empty(n, cupy.float32), cupy.empty(n, cupy.float32)
    launch_forward(e, c, t, None, CCEOptions(), lse, tgt)
    return autotune.hopper_cluster(gpu_name(), np.dtype(dt).name, n, d, v)


def forward_flops(n: int, v: int, d: int) -> float:
    """Matmul FLOPs of the forward (the backward by recompute is 3x this)."""
    return 2.0 * n * v * d


__all__ = [
    "backward_blocking",
    "backward_scratch_nbytes",
    "ce_cluster_size",
    "forward_scratch_nbytes",
    "launch_backward",
    "launch_cross_entropy",
    "launch_forward",
    "target_error_flag",
    "tune",
]
