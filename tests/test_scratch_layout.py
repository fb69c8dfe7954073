"""Backward scratch layout (CPU): sizes from shapes alone, the 64 MiB bound, and the overlap of the
sparse lists with the tiled buffers, which must leave the sparse counters (its overflow flag) alone."""

from __future__ import annotations

import numpy as np
import pytest

from cce_cupy import launch
from cce_cupy.options import CCEOptions

GEMMA2, LLAMA3 = (8192, 2304, 256000), (8192, 4096, 128256)
FILTER = CCEOptions(filter_eps="auto")


@pytest.mark.parametrize("shape", [GEMMA2, LLAMA3, (65536, 4096, 256000), (7, 13, 129)])
@pytest.mark.parametrize("opts", [CCEOptions(), FILTER, FILTER.replace(deterministic=True)],
                         ids=["exact", "filter", "filter_deterministic"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_scratch_bounded_and_counters_not_overlapped(shape, opts, dtype):
    n, d, v = shape
    dt = np.dtype(np.float32) if dtype == "float32" else np.dtype("float16")  # 16-bit stands for both
    layout = launch._backward_layout(n, v, d, dt, opts)
    total = launch.backward_scratch_nbytes(n, v, d, dt, opts)
    assert total <= 64 << 20, f"backward scratch {total / 2**20:.1f} MiB > 64 MiB"
    slots = launch.sparse_slots(n, d, dt, opts)
    sparse_expected = opts.filter_eps is not None and not opts.deterministic and dt.itemsize == 2 and d % 8 == 0
    assert (slots > 0) == (sparse_expected and n <= launch.SPARSE_LIST_BYTES // (16 * launch.SPARSE_MIN_SLOTS))
    if not slots:
        assert layout["counts"][1] == 0 and "entries" not in layout
        return
    c_off, c_size = layout["counts"]
    assert c_size == (1 + n + v) * 4
    for name in ("G", "flags", "de_acc", "col_start", "entries", "by_col"):
        off, size = layout[name]
        assert off >= c_off + c_size, f"{name} overlaps the sparse counters"
        assert off % 256 == 0 and off + size <= total
    assert layout["entries"][1] == layout["by_col"][1] == n * slots * 8
    for a, b in [("col_start", "entries"), ("entries", "by_col")]:
        assert layout[a][0] + layout[a][1] <= layout[b][0], f"{a} overlaps {b}"


def test_sparse_slots_rules():
    assert launch.sparse_slots(8192, 2304, np.dtype("float16"), FILTER) == 384
    assert launch.sparse_slots(100, 2304, np.dtype("float16"), FILTER) == launch.SPARSE_MAX_SLOTS
    assert launch.sparse_slots(8192, 2304, np.dtype("float16"), CCEOptions()) == 0  # exact: no lists
    assert launch.sparse_slots(8192, 2300, np.dtype("float16"), FILTER) == 0  # D % 8: no wgmma path
    assert launch.sparse_slots(1 << 20, 2304, np.dtype("float16"), FILTER) == 0  # < SPARSE_MIN_SLOTS a row
