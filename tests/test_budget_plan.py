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
    starts = sorted((x for x in plan.offsets if x[1][1]), key=lambda x: x[1][0])  # empty ones take no room
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


def _in_dc_checks(plan, n, v, d, itemsize=2):
    """Buffers in the dC output's bytes: disjoint, aligned, inside them, none also in the scratch;
    with dc_split, x, a_f and a_t above the rows of the first dC GEMM."""
    dc_nbytes = v * d * itemsize
    spans = sorted(off for _, off in plan.in_dc)
    for (o1, s1), (o2, _) in zip(spans, spans[1:]):
        assert o1 + s1 <= o2 and o2 % 256 == 0
    assert all(off + size <= dc_nbytes for off, size in spans)
    assert not {k for k, _ in plan.in_dc} & {k for k, (_, size) in plan.offsets if size}
    if plan.dc_split:  # x, a_f, a_t above the first dC GEMM's rows (the early buffers are dead before it)
        late = [off for k, (off, _) in plan.in_dc if k in ("x", "a_f", "a_t")]
        assert len(late) == 3 and d <= plan.dc_split < v and plan.dc_split * d * itemsize <= min(late)


@pytest.mark.parametrize("shape", ["gemma2", "llama3"])
def test_one_chunk_keeps_early_buffers_in_dc(shape):
    """One chunk: the forward's scratch and the shifts live in the dC output's bytes (dead before
    its GEMM), so a 4 GiB plan holds the kept softmax, x and the per-row factors, and no split."""
    n, d, v = SHAPES[shape]
    plan = budget.budget_plan(n, v, d, BF16, CCEOptions(memory_budget=4 << 30))
    assert plan.rows == n and plan.dc_split == 0
    assert {k for k, _ in plan.in_dc} == {"forward", "shift", "z_target", "unsafe"}
    assert plan.nbytes - n * v * 2 == _round(n * d * 4) + _round(n * 4) + _round(n * 2)  # x, a_f, a_t
    _in_dc_checks(plan, n, v, d)


def _round(x):
    return -(-x // 256) * 256


@pytest.mark.parametrize("shape", ["gemma2", "llama3"])
def test_one_chunk_at_the_bf16_logits_bytes(shape):
    """A budget of the bf16 logits' bytes (what torch.compile holds beyond its inputs and gradients)
    still takes every row at once: x and the per-row factors move into dC's last rows too (dc_split),
    and the call holds the kept softmax alone."""
    n, d, v = SHAPES[shape]
    o = CCEOptions(memory_budget=n * v * 2)
    plan = budget.budget_plan(n, v, d, BF16, o)
    assert plan.rows == n and plan.dc_split > 0 and plan.nbytes == n * v * 2
    assert {k for k, _ in plan.in_dc} >= {"x", "a_f", "a_t", "forward"}
    _in_dc_checks(plan, n, v, d)
    # label smoothing fills dC before the shifts' last read, and fp32 gradients have no x: no split
    for opts in ({"label_smoothing": 0.1}, {"grad_dtype": "float32"}):
        other = budget.budget_plan(n, v, d, BF16, o.replace(**opts))
        assert other is None or other.rows < n or not other.dc_split


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("shape", ["small", "gemma2"])
def test_one_chunk_in_dc_layout(shape, dtype):
    n, d, v = SHAPES[shape]
    for mib in (8192, 4096, 64):
        plan = budget.budget_plan(n, v, d, dtype, CCEOptions(memory_budget=mib << 20))
        if plan is not None and plan.rows == n:
            _in_dc_checks(plan, n, v, d)
            early = {"forward", "scales"} if plan.mode == "tile" else {"forward", "shift", "z_target", "unsafe"}
            # small: the forward's scratch alone is over dC's 125 KiB, and everything stays in the scratch
            assert {k for k, _ in plan.in_dc} == (set() if shape == "small" else early)


@pytest.mark.parametrize("shape", ["gemma2", "llama3", "small"])
@pytest.mark.parametrize("dc_later", [False, True])
def test_plan_forward_scratch_covers_every_chunk(shape, dc_later):
    """The forward's partials follow its grid's vocabulary splits, which a shorter chunk can have more
    of: the plan's forward buffer holds what each chunk it runs (the full ones and the last) needs.
    At gemma2, 2560 MiB, the last of three 2816-row chunks (2560 rows) needs 7.3 MiB against 5.4."""
    from cce_cupy.cuda.plan import forward_scratch_nbytes

    n, d, v = SHAPES[shape]
    one = budget.budget_plan(n, v, d, BF16, CCEOptions(memory_budget=1 << 40))
    for k in range(1, 64):
        o = CCEOptions(memory_budget=one.nbytes * k // 64 + 4096 * k)
        plan = budget.budget_plan(n, v, d, BF16, o, dc_later=dc_later)
        if plan is None:
            continue
        last = n - (-(-n // plan.rows) - 1) * plan.rows
        have = {**dict(plan.offsets), **dict(plan.in_dc)}["forward"][1]
        for rows in (plan.rows, last):
            assert have >= forward_scratch_nbytes(rows, v, d, BF16), (o.memory_budget, plan.rows, rows)
