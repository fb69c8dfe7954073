"""Shape-only planning of the CUDA launchers: forward splits (with the Hopper schedule model), the
backward's row parts and vocabulary chunks, the sparse backward's list slots, and the scratch
layouts and sizes. From the shapes and options alone, so that JAX can size the scratch at trace time.
Nothing here touches CUDA.
"""

from __future__ import annotations

import functools
import heapq

from cce_cupy.cuda.sources import HOPPER_DTYPES, HOPPER_TILE_N, TILE_M, TILE_N, dtype_name
from cce_cupy.options import CCEOptions

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
# Filtered backward on Hopper (sparse): each row keeps a list of at most `slots` candidate
# gradient elements, 8 bytes each, twice (by row, then sorted by column): the lists get at most
# SPARSE_LIST_BYTES, a row at most SPARSE_MAX_SLOTS, and with fewer than SPARSE_MIN_SLOTS per row
# (N > 196608) the exact backward runs instead. A row needing more slots than it has, like any row
# whose certificate fails, takes the exact path at run time (see launch_backward).
SPARSE_LIST_BYTES = 48 << 20
SPARSE_MAX_SLOTS = 1024
SPARSE_MIN_SLOTS = 16
_ALIGN = 256  # scratch sub-buffers start on 256-byte boundaries


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _itemsize(dtype) -> int:
    return 2 if dtype_name(dtype) in ("float16", "bfloat16") else 4


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
        candidates = [
            t for t in range(1, min(col_tiles, HOPPER_MAX_BLOCK_TILES) + 1) if _cdiv(col_tiles, t) <= max_splits
        ] or [_cdiv(col_tiles, max_splits)]
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


def _backward_layout(
    n: int, v: int, d: int, dtype, opts: CCEOptions, device_fallback: bool = True
) -> dict[str, tuple[int, int]]:
    """Byte (offset, size) of each scratch buffer of the backward.

    Exact: the tiled backward's buffers (G, flags, de_acc). Filtered with sparse lists: the
    counters (the uncertified-row count first, row_count, col_count), the per-row arrays of the
    certificate, the smoothing vectors and the lists, then, with `device_fallback` (JAX callbacks,
    no host sync), the tiled buffers of the exact pass of the uncertified rows, which runs while the
    lists are alive (so nothing overlaps). Offsets do not depend on `device_fallback`.
    """
    rows, vc, need_acc = backward_blocking(n, v, d, dtype, opts)
    slots = sparse_slots(n, d, dtype, opts)
    tiled = {
        "G": rows * vc * _itemsize(dtype),
        "flags": _cdiv(rows, TILE_M) * _cdiv(vc, TILE_N) * 4,
        "de_acc": rows * d * 4 if need_acc else 0,
    }
    if slots:
        sizes = {
            "counts": (1 + n + v) * 4,  # uncertified-row count, row_count (N), col_count (V)
            "dropped": n * 4,
            "fallback_rows": n * 4,
            "fb_coef_p": n * 4,
            "fb_coef_q": n * 4,
            "cert_q": n * 4,
            "smooth": 2 * (d + 1) * 4,  # sum_j C[j] and sum_i cert_q[i] E[i], each with its weight sum
            "col_start": (v + 1) * 4,
            "entries": n * slots * 8,
            "by_col": n * slots * 8,
        }
        if device_fallback:
            sizes.update(tiled)
    else:
        sizes = {"counts": 0, **tiled}
    layout: dict[str, tuple[int, int]] = {}
    off = 0
    for name, size in sizes.items():
        layout[name] = (off, size)
        off = _round_up(off + size, _ALIGN)
    return layout


def backward_scratch_nbytes(n: int, v: int, d: int, dtype, opts: CCEOptions, device_fallback: bool = True) -> int:
    layout = _backward_layout(n, v, d, dtype, opts, device_fallback)
    return max(_ALIGN, max(off + size for off, size in layout.values()))


__all__ = [
    "backward_blocking",
    "backward_scratch_nbytes",
    "forward_scratch_nbytes",
    "forward_splits",
    "sparse_slots",
]
