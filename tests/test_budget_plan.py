"""The memory-budgeted path's plan (cce_cupy.cuda.budget.budget_plan), on the CPU: it never exceeds
the budget, takes every row at once when they fit, chunks no thinner than MIN_CHUNK_ROWS, and
picks the mode the kernels are built for."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cce_cupy.cuda import budget
from cce_cupy.options import CCEOptions

BF16, FP16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256), "small": (3000, 64, 1000)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("mib", [64, 1024, 2048, 3072, 4096, 8192])
@pytest.mark.parametrize("grad", [None, "float32"])
def test_plan_fits_the_budget(shape, dtype, mib, grad):
    n, d, v = SHAPES[shape]
    o = CCEOptions(memory_budget=mib << 20, grad_dtype=grad)
    plan = budget.budget_plan(n, v, d, dtype, o)
    if plan is None:
        return
    assert plan.nbytes <= o.memory_budget
    assert plan.rows == n or plan.rows >= budget.MIN_CHUNK_ROWS
    assert plan.dc_acc == (plan.rows < n and grad is None)
    ends = [off + size for _, (off, size) in plan.offsets]
    assert max(ends) <= plan.nbytes
    starts = sorted(plan.offsets, key=lambda x: x[1][0])
    for (_, (o1, s1)), (_, (o2, _)) in zip(starts, starts[1:]):
        assert o1 + s1 <= o2 and o2 % 256 == 0  # disjoint, aligned
    assert plan.lds % 8 == 0 and plan.lds >= v


def test_plan_takes_every_row_when_they_fit_and_declines_thin_chunks():
    n, d, v = SHAPES["gemma2"]
    # 4 GiB holds gemma2's bf16 softmax (3.9 GiB) and the rest: one chunk, no dC accumulator.
    plan = budget.budget_plan(n, v, d, BF16, CCEOptions(memory_budget=4 << 30))
    assert plan.rows == n and not plan.dc_acc and plan.mode == "row"
    # 2 GiB: the fp32 dC accumulator (2.2 GiB) alone is over it: lean.
    assert budget.budget_plan(n, v, d, BF16, CCEOptions(memory_budget=2 << 30)) is None
    assert budget.budget_plan(n, v, d, BF16, CCEOptions()) is None  # "lean"
    assert budget.budget_plan(0, v, d, BF16, CCEOptions(memory_budget=4 << 30)) is None


@pytest.mark.parametrize(
    "dtype, opts, bias, mode",
    [
        (BF16, {}, False, "row"),
        (BF16, {"softcap": 30.0}, True, "row"),
        (BF16, {"label_smoothing": 0.1}, False, "row"),
        (BF16, {"label_smoothing": 0.1, "softcap": 30.0}, False, "tile"),
        (BF16, {"label_smoothing": 0.1}, True, "tile"),
        (FP16, {}, False, "tile"),
    ],
)
def test_mode(dtype, opts, bias, mode):
    assert budget.budget_mode(dtype, CCEOptions(memory_budget=1 << 30, **opts), bias) == mode


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mib", [1024, 2048, 3072, 3207, 4000])
def test_plan_with_dc_made_later(shape, mib):
    """dc_later (the CuPy API makes dC after the chunks): the fp32 accumulator sits apart from the
    scratch, and the dC output's bytes, not yet allocated, are room for the chunks. What the call
    holds beyond its inputs and outputs stays within the budget during the chunks (scratch and
    accumulator, less the output not yet made) and after them (the accumulator); the chunks are never
    thinner than without the credit."""
    n, d, v = SHAPES[shape]
    o = CCEOptions(memory_budget=mib << 20)
    plan = budget.budget_plan(n, v, d, BF16, o, dc_later=True)
    before = budget.budget_plan(n, v, d, BF16, o)
    if plan is None:
        assert before is None
        return
    acc, dc_out = v * d * 4, v * d * 2
    if plan.rows == n:  # one chunk: nothing to accumulate, the same plan either way
        assert plan == before and not plan.acc_apart
        return
    assert plan.dc_acc and plan.acc_apart
    assert plan.nbytes + acc - dc_out <= o.memory_budget and acc <= o.memory_budget
    assert dict(plan.offsets)["dc_acc"][1] == 0  # not in the scratch
    assert before is None or plan.rows >= before.rows
    assert plan.rows >= budget.MIN_CHUNK_ROWS


def test_dc_made_later_fits_gemma2_in_quacks_memory():
    """At gemma2, 3207 MiB (what QuACK holds beyond its inputs and gradients) takes two chunks with
    the accumulator apart, where the accumulator inside the scratch leaves 1792-row chunks."""
    n, d, v = SHAPES["gemma2"]
    o = CCEOptions(memory_budget=3207 << 20)
    assert budget.budget_plan(n, v, d, BF16, o).rows == 1792
    assert budget.budget_plan(n, v, d, BF16, o, dc_later=True).rows >= n // 2
