"""Backward scratch layout (CPU): sizes from shapes alone, the 64 MiB bound, and the overlap of the
sparse lists with the tiled buffers, which must leave the sparse counters (its overflow flag) alone."""

from __future__ import annotations

import numpy as np
import pytest

from cce_cupy.cuda import plan as cuda_plan
from cce_cupy.options import CCEOptions

GEMMA2, LLAMA3 = (8192, 2304, 256000), (8192, 4096, 128256)
FILTER = CCEOptions(filter_eps="auto")


@pytest.mark.parametrize("shape", [GEMMA2, LLAMA3, (65536, 4096, 256000), (7, 13, 129)])
@pytest.mark.parametrize(
    "opts", [CCEOptions(), FILTER, FILTER.replace(deterministic=True)], ids=["exact", "filter", "filter_deterministic"]
)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("device_fallback", [True, False], ids=["jax", "cupy"])
def test_scratch_bounded_and_buffers_disjoint(shape, opts, dtype, device_fallback):
    """Exact: at most 64 MiB. Certified filtering: at most 64 MiB besides the two lists (the issue's
    memory bar); every buffer 256-byte aligned, none overlapping (the device-side exact pass runs
    while the lists are alive), and the same offsets with or without that pass's buffers."""
    n, d, v = shape
    dt = np.dtype(np.float32) if dtype == "float32" else np.dtype("float16")  # 16-bit stands for both
    layout = cuda_plan._backward_layout(n, v, d, dt, opts, device_fallback)
    total = cuda_plan.backward_scratch_nbytes(n, v, d, dt, opts, device_fallback)
    slots = cuda_plan.sparse_slots(n, d, dt, opts)
    sparse_expected = opts.filter_eps is not None and not opts.deterministic and dt.itemsize == 2 and d % 8 == 0
    assert (slots > 0) == (sparse_expected and n <= cuda_plan.SPARSE_LIST_BYTES // (16 * cuda_plan.SPARSE_MIN_SLOTS))
    lists = layout["entries"][1] + layout["by_col"][1] if slots else 0
    assert total - lists <= 64 << 20, f"backward scratch {total / 2**20:.1f} MiB besides the lists > 64 MiB"
    if not slots:
        assert layout["counts"][1] == 0 and "entries" not in layout
        return
    assert layout["counts"][1] == (1 + n + v) * 4
    assert layout["entries"][1] == layout["by_col"][1] == n * slots * 8
    spans = sorted((off, off + size, name) for name, (off, size) in layout.items() if size)
    for (a0, a1, a), (b0, _, b) in zip(spans, spans[1:]):
        assert a1 <= b0, f"{a} overlaps {b}"
    assert all(off % 256 == 0 and off + size <= total for off, size in layout.values())
    assert ("G" in layout) == device_fallback
    other = cuda_plan._backward_layout(n, v, d, dt, opts, not device_fallback)
    assert all(other[k] == layout[k] for k in layout.keys() & other.keys())


def test_sparse_slots_rules():
    assert cuda_plan.sparse_slots(8192, 2304, np.dtype("float16"), FILTER) == 384
    assert cuda_plan.sparse_slots(100, 2304, np.dtype("float16"), FILTER) == cuda_plan.SPARSE_MAX_SLOTS
    assert cuda_plan.sparse_slots(8192, 2304, np.dtype("float16"), CCEOptions()) == 0  # exact: no lists
    assert cuda_plan.sparse_slots(8192, 2300, np.dtype("float16"), FILTER) == 0  # D % 8: no wgmma path
    assert cuda_plan.sparse_slots(1 << 20, 2304, np.dtype("float16"), FILTER) == 0  # < SPARSE_MIN_SLOTS a row


@pytest.mark.parametrize(
    "n,v",
    [
        (8192, 256000),
        (8192, 128256),
        (2048, 8192),
        (1408, 11776),
        (65536, 256000),
        (1, 1),
        (7, 129),
        (128, 257),
        (300000, 32000),
    ],
)
def test_hopper_forward_splits_cover_v_within_limits(n, v):
    """Every column in exactly one split, whole 256-column tiles, at most HOPPER_MAX_BLOCK_TILES of
    them a block where the partials fit FORWARD_PARTIALS_BYTES, and no empty split."""
    splits, per_split = cuda_plan.forward_splits(n, v, cuda_plan.HOPPER_TILE_N)
    assert per_split % cuda_plan.HOPPER_TILE_N == 0
    assert (splits - 1) * per_split < v <= splits * per_split
    tiles = per_split // cuda_plan.HOPPER_TILE_N
    cap = max(1, cuda_plan.FORWARD_PARTIALS_BYTES // (12 * n))
    assert tiles <= cuda_plan.HOPPER_MAX_BLOCK_TILES or splits <= cap
    assert splits <= cap or tiles == 1
    assert cuda_plan.forward_scratch_nbytes(n, v, 2304, np.dtype("float16")) >= 3 * splits * n * 4


def test_hopper_schedule_length_model():
    """The list-schedule model behind the split choice: one wave of equal blocks takes one block;
    an exact number of waves takes that many blocks; a ragged last wave costs a whole block."""
    o = cuda_plan.HOPPER_BLOCK_OVERHEAD
    sms = cuda_plan.HOPPER_SMS
    assert cuda_plan._hopper_schedule_length(1, 4, 4) == pytest.approx(4 + o)
    assert cuda_plan._hopper_schedule_length(sms, 8, 4) == pytest.approx(2 * (4 + o))  # 2 splits, 1 wave each
    # sms + 1 blocks of 4 tiles: the extra block runs after a full one
    assert cuda_plan._hopper_schedule_length(sms + 1, 4, 4) == pytest.approx(2 * (4 + o))
    # a short last split fills the SMs that the full blocks left idle
    assert cuda_plan._hopper_schedule_length(sms // 2, 5, 4) == pytest.approx(4 + o)
    # gemma2 (64 row blocks x 1000 tiles): far from the 500-tile blocks of the old cost model
    splits, per_split = cuda_plan.forward_splits(8192, 256000, cuda_plan.HOPPER_TILE_N)
    assert 4 <= per_split // cuda_plan.HOPPER_TILE_N <= 12


@pytest.mark.parametrize(
    "shape,plan", [(GEMMA2, (2048, 8192)), (LLAMA3, (2048, 6144)), ((6500, 2304, 256000), (2176, 7680))]
)
def test_backward_blocking_keeps_the_measured_plans(shape, plan):
    """The (rows a part, chunk columns) that measured fastest on the H100 (NOTES.md, b1): the
    blocking rule must keep producing them for 16-bit inputs."""
    n, d, v = shape
    rows, cols, need_acc = cuda_plan.backward_blocking(n, v, d, np.dtype("float16"), CCEOptions())
    assert (rows, cols) == plan and need_acc
    assert rows * d * 4 + rows * cols * 2 <= cuda_plan.BACKWARD_BUFFERS_BYTES
