"""The memory-budgeted path (cce_cupy.cuda.budget): every option against the float64 reference,
several chunks with the fp32 dC accumulator, poisoned outputs, its accuracy against the lean path,
and which path a call takes. Run on a GPU: pytest -m gpu -q -rs."""

from __future__ import annotations

import numpy as np
import pytest
from _gpu_helpers import TOL, _assert_no_nan, _cp, _device_inputs, _poisoned_outputs, _skip_unless_hopper
from conftest import DTYPES, assert_rel_close, dense_reference, make_problem, rel_err

import cce_cupy as cce
from cce_cupy.cuda import backward as cuda_backward
from cce_cupy.cuda import budget as cuda_budget
from cce_cupy.options import CCEOptions, grad_dtype, row_loss_grads

pytestmark = pytest.mark.gpu

BIG = 1 << 34  # 16 GiB: every test shape runs as one chunk


@pytest.fixture(params=["row", "tile"])
def mode(request, monkeypatch):
    """Both ways of the budgeted backward (cce_cupy.cuda.budget): "tile" forced where "row" would run."""
    if request.param == "tile":
        monkeypatch.setattr(cuda_budget, "budget_mode", lambda *a: "tile")
    return request.param


def _run_budgeted(e, c, t, b, o: CCEOptions, grad_loss=1.0):
    """The budgeted launcher with every output poisoned with NaN first."""
    cp = _cp()
    ge, gc, gt, gb = _device_inputs(e, c, t, b)
    n, d = ge.shape
    v = gc.shape[0]
    assert cuda_budget.budget_applies(ge, gc, o)
    plan = cuda_budget.budget_plan(n, v, d, ge.dtype, o, b is not None)
    assert plan is not None
    lse, tgt, de, dc, db = _poisoned_outputs(n, d, v, grad_dtype(ge.dtype, o), b is not None)
    scratch = cp.full(plan.nbytes, 0xFF, cp.uint8)  # NaN fp16 / fp32 everywhere: unwritten reads show
    row_grad = row_loss_grads(cp, o, gt != o.ignore_index, cp.asarray(grad_loss, dtype=cp.float32))
    row_grad = cp.ascontiguousarray(cp.broadcast_to(row_grad, (n,)), dtype=cp.float32)
    cuda_budget.launch_fused_budgeted(ge, gc, gt, gb, o, plan, row_grad, lse, tgt, de, dc, db, scratch)
    cp.cuda.Device().synchronize()
    return plan, {"lse": lse, "tgt": tgt, "de": de, "dc": dc, "db": db}


OPTION_CASES = {
    "plain": {},
    "softcap": {"softcap": 4.0},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "reduction_sum": {"reduction": "sum"},
    "reduction_none": {"reduction": "none"},
    "grad_fp32": {"grad_dtype": "float32"},
    "deterministic": {"deterministic": True},
    "all": {"softcap": 4.0, "label_smoothing": 0.1, "z_loss": 1e-3, "grad_dtype": "float32"},
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("bias", [False, True])
def test_budget_launcher_every_option(dtype, case, bias, mode):
    cp = _cp()
    _skip_unless_hopper(cp)
    # V = 1000: a tile (256) and a split both end mid-tile; 20% ignored targets (make_problem).
    e, c, t, b = make_problem(300, 64, 1000, dtype, bias=bias, peaked=True, seed=11)
    o = CCEOptions(memory_budget=BIG, **OPTION_CASES[case])
    grad_loss = np.linspace(0.5, 1.5, 300).astype(np.float32) if o.reduction == "none" else 1.0
    plan, out = _run_budgeted(e, c, t, b, o, grad_loss)
    assert plan.rows == 300 and not plan.dc_acc
    expected = (
        "row" if mode == "row" and dtype == "bfloat16" and not (o.label_smoothing and (bias or o.softcap)) else "tile"
    )
    assert plan.mode == expected
    _assert_no_nan(out)
    truth = dense_reference(e, c, t, b, o, grad_loss=grad_loss)
    tol = TOL[dtype]
    valid = t != o.ignore_index
    assert_rel_close(out["lse"].get()[valid], truth["lse"].reshape(-1)[valid], 1e-5, "lse")
    for name in ("de", "dc") + (("db",) if bias else ()):
        assert_rel_close(out[name], truth[name], tol, name)


@pytest.mark.parametrize("grad_dtype_opt", [None, "float32"])
@pytest.mark.parametrize("bias", [False, True])
def test_budget_several_chunks(grad_dtype_opt, bias, mode):
    """A budget just below one chunk of every row: several chunks, dC accumulated over them (in an
    fp32 buffer for bf16 gradients), through the public API with shift and a batch dimension."""
    cp = _cp()
    _skip_unless_hopper(cp)
    n, d, v = 2 * 1100, 64, 3000  # chunks of at least MIN_CHUNK_ROWS = 1024 rows
    e, c, t, b = make_problem(n, d, v, "bfloat16", bias=bias, peaked=True, batch_shape=(2, 1100), seed=3)
    base = CCEOptions(shift=True, z_loss=1e-4, label_smoothing=0.05, grad_dtype=grad_dtype_opt)
    one = cuda_budget.budget_plan(n, v, d, e.dtype, base.replace(memory_budget=BIG), bias)
    assert one.rows == n
    o = base.replace(memory_budget=one.nbytes - 1)
    plan = cuda_budget.budget_plan(n, v, d, e.dtype, o, bias)
    assert plan is not None and plan.rows < n and plan.nbytes <= o.memory_budget, plan
    assert plan.dc_acc == (grad_dtype_opt is None)
    # The API makes dC after the chunks (dc_later): for bf16 gradients its fp32 accumulator sits apart.
    api_plan = cuda_budget.budget_plan(n, v, d, e.dtype, o, bias, dc_later=True)
    assert api_plan.rows < n and api_plan.acc_apart == (grad_dtype_opt is None), api_plan
    out = cce.linear_cross_entropy_with_grad(
        cp.asarray(e), cp.asarray(c), cp.asarray(t), None if b is None else cp.asarray(b), options=o
    )
    truth = dense_reference(e, c, t, b, o)
    assert_rel_close(out[0], truth["loss"], 1e-5, "loss")
    for name, ours in zip(("de", "dc", "db"), out[1:]):
        assert_rel_close(ours, truth[name], TOL["bfloat16"], name)


@pytest.mark.parametrize("grad_dtype_opt", [None, "float32"])
def test_budget_holds_its_budget(grad_dtype_opt):
    """Beyond its inputs and the outputs it returns, a budgeted call holds at most the budget (and
    O(N) per-row terms), counted by a hook on CuPy's pool: with several chunks, the fp32 dC
    accumulator apart and the dC output made after them."""
    from benchmarks.providers.measure import CupyPeak

    cp = _cp()
    _skip_unless_hopper(cp)
    n, d, v = 4096, 64, 3000
    e, c, t, _ = make_problem(n, d, v, "bfloat16", peaked=True, seed=5)
    ge, gc, gt = cp.asarray(e), cp.asarray(c), cp.asarray(t)
    base = CCEOptions(grad_dtype=grad_dtype_opt)
    one = cuda_budget.budget_plan(n, v, d, ge.dtype, base.replace(memory_budget=BIG))
    o = base.replace(memory_budget=one.nbytes // 2)
    plan = cuda_budget.budget_plan(n, v, d, ge.dtype, o, dc_later=True)
    assert plan is not None and plan.rows < n and plan.acc_apart == (grad_dtype_opt is None), plan

    cce.linear_cross_entropy_with_grad(ge, gc, gt, options=o)  # kernels loaded, tuning done
    cp.cuda.Device().synchronize()
    with CupyPeak() as pool:
        out = cce.linear_cross_entropy_with_grad(ge, gc, gt, options=o)
        cp.cuda.Device().synchronize()
    kept = pool.hook.cur  # what the call returned (and the pool still hands out for it)
    assert kept >= sum(x.nbytes for x in out)
    per_row = 64 * n  # the loss terms, row gradients, masks: a few fp32 / bool values a row
    assert pool.peak - kept <= o.memory_budget + per_row, (pool.peak - kept, o.memory_budget)
    truth = dense_reference(e, c, t, None, o)
    for name, ours in zip(("de", "dc"), out[1:]):
        assert_rel_close(ours, truth[name], TOL["bfloat16"], name)


@pytest.mark.parametrize("data", ["uniform", "peaked"])
def test_budget_accuracy_against_lean(data, mode):
    """The kept softmax (fp16, one scale per 256-column tile) costs at most 1.5x the lean path's
    error against float64 (issue 17's bar), on model-like sizes of V."""
    cp = _cp()
    _skip_unless_hopper(cp)
    e, c, t, _ = make_problem(512, 256, 20000, "bfloat16", peaked=data == "peaked", seed=21)
    ge, gc, gt = cp.asarray(e), cp.asarray(c), cp.asarray(t)
    truth = dense_reference(e, c, t, None, CCEOptions())
    loss_lean, de_lean, dc_lean = cce.linear_cross_entropy_with_grad(ge, gc, gt)
    loss, de_b, dc_b = cce.linear_cross_entropy_with_grad(ge, gc, gt, memory_budget=BIG)
    # The loss is as accurate as the lean path's (both 2e-5 on these peaked rows, whose loss of 0.15
    # is lse - y_t of two numbers ~10, so fp32 rounding of the lse shows).
    e_lean, e_ours = rel_err(loss_lean, truth["loss"]), rel_err(loss, truth["loss"])
    assert e_ours <= TOL["bfloat16"] and e_ours <= 1.5 * e_lean + 1e-6, (e_ours, e_lean)
    for name, lean, ours in (("de", de_lean, de_b), ("dc", dc_lean, dc_b)):
        e_lean, e_ours = rel_err(lean, truth[name]), rel_err(ours, truth[name])
        assert e_ours <= 1.5 * e_lean, f"{name}: budgeted {e_ours:.3e} > 1.5 x lean {e_lean:.3e}"


@pytest.mark.parametrize("grad_loss", ["one", "zero", "per_row_with_zeros"])
def test_budget_row_grad_made_after_forward(grad_loss, mode):
    """The API launches the forward before it makes row_grad (launch_fused_budgeted takes a function
    for it, for a scalar grad_loss): the target-logit kernel then tells ignored rows by ignore_index
    alone (here a class inside [0, V), so not by its range), and rows with a target but no gradient
    (grad_loss 0) keep their s, which their zero factor removes from the GEMMs. A per-row grad_loss
    is made first, and its zeros skip their rows' s."""
    cp = _cp()
    _skip_unless_hopper(cp)
    n, d, v = 300, 64, 1000
    e, c, t, _ = make_problem(n, d, v, "bfloat16", peaked=True, ignore_index=3, seed=13)
    assert (t == 3).any() and (t >= 0).all()  # every target in range: ignored rows only by their value
    per_row = grad_loss == "per_row_with_zeros"
    o = CCEOptions(memory_budget=BIG, ignore_index=3, reduction="none" if per_row else "mean")
    g = np.where(np.arange(n) % 3 == 0, 0.0, 1.0).astype(np.float32) if per_row else float(grad_loss == "one")
    ge, gc, gt = cp.asarray(e), cp.asarray(c), cp.asarray(t)
    out = cce.linear_cross_entropy_with_grad(ge, gc, gt, grad_loss=cp.asarray(g) if per_row else g, options=o)
    truth = dense_reference(e, c, t, None, o, grad_loss=g)
    assert_rel_close(out[0], truth["loss"], 1e-5, "loss")
    for name, ours in zip(("de", "dc"), out[1:]):
        if grad_loss == "zero":
            assert not bool(cp.any(ours.astype(cp.float32) != 0)), f"{name} is not all zero"
        else:
            assert_rel_close(ours, truth[name], TOL["bfloat16"], name)


def test_budget_dispatch(monkeypatch):
    """A budget that fits runs the budgeted launcher and not the recompute backward; a budget below
    one chunk, fp32 inputs, and 'lean' run the recompute backward."""
    cp = _cp()
    _skip_unless_hopper(cp)
    e, c, t, _ = make_problem(256, 64, 1000, "bfloat16", seed=1)
    ge, gc, gt = cp.asarray(e), cp.asarray(c), cp.asarray(t)
    calls = []
    real_budgeted, real_backward = cuda_budget.launch_fused_budgeted, cuda_backward.launch_backward
    monkeypatch.setattr(
        cuda_budget, "launch_fused_budgeted", lambda *a, **k: (calls.append("budget"), real_budgeted(*a, **k))
    )
    monkeypatch.setattr(
        cuda_backward, "launch_backward", lambda *a, **k: (calls.append("lean"), real_backward(*a, **k))
    )
    cce.linear_cross_entropy_with_grad(ge, gc, gt, memory_budget=BIG)
    cce.linear_cross_entropy_with_grad(ge, gc, gt, memory_budget=4096)  # below one 128-row chunk
    cce.linear_cross_entropy_with_grad(ge, gc, gt)
    cce.linear_cross_entropy_with_grad(ge.astype(cp.float32), gc.astype(cp.float32), gt, memory_budget=BIG)
    assert calls == ["budget", "lean", "lean", "lean"]


def test_budget_row_far_above_its_target(mode):
    """Rows whose largest logit is ~100 nats over the target's (loss ~100): the row-shifted forward
    marks them unsafe and lce_budget_recompute rewrites them; the result stays exact."""
    cp = _cp()
    _skip_unless_hopper(cp)
    n, d, v = 256, 64, 2000
    e, c, t, _ = make_problem(n, d, v, "float32", ignore_frac=0.0, seed=9)
    rng = np.random.default_rng(9)
    far = rng.choice(n, 16, replace=False)
    other = (t[far] + 1) % v
    e[far] = 100.0 * c[other] / (c[other] ** 2).sum(1, keepdims=True)  # z_other ~ 100, z_target ~ 0
    e, c = e.astype(DTYPES["bfloat16"]), c.astype(DTYPES["bfloat16"])
    o = CCEOptions(memory_budget=BIG)
    plan, out = _run_budgeted(e, c, t, None, o)
    _assert_no_nan(out)
    truth = dense_reference(e, c, t, None, o)
    assert float(np.min(truth["loss_tok"].reshape(-1)[far])) > 60.0
    for name in ("de", "dc"):
        assert_rel_close(out[name], truth[name], TOL["bfloat16"], name)
    # Their sums against the target logit overflow fp32 (e^100): the recompute also rewrites their lse.
    assert_rel_close(out["lse"], truth["lse"].reshape(-1), 1e-5, "lse")


@pytest.mark.parametrize("case", ["plain", "softcap", "z_loss", "reduction_none", "deterministic"])
@pytest.mark.parametrize("bias", [False, True])
def test_budget_at_the_kept_softmax_bytes(case, bias):
    """A budget of the kept softmax's bytes alone: every row at once, with x, a_f and a_t in the dC
    output's last rows and dC's GEMM split around the dE GEMM (BudgetPlan.dc_split); every output
    against the float64 reference, poisoned first (dC's bytes are scratch until its GEMMs)."""
    cp = _cp()
    _skip_unless_hopper(cp)
    n, d, v = 300, 64, 3000
    e, c, t, b = make_problem(n, d, v, "bfloat16", bias=bias, peaked=True, seed=13)
    o = CCEOptions(memory_budget=n * v * 2, **OPTION_CASES[case])
    grad_loss = np.linspace(0.5, 1.5, n).astype(np.float32) if o.reduction == "none" else 1.0
    plan, out = _run_budgeted(e, c, t, b, o, grad_loss)
    assert plan.rows == n and plan.dc_split > 0 and plan.nbytes == n * v * 2, plan
    _assert_no_nan(out)
    truth = dense_reference(e, c, t, b, o, grad_loss=grad_loss)
    valid = t != o.ignore_index
    assert_rel_close(out["lse"].get()[valid], truth["lse"].reshape(-1)[valid], 1e-5, "lse")
    for name in ("de", "dc") + (("db",) if bias else ()):
        assert_rel_close(out[name], truth[name], TOL["bfloat16"], name)


def test_budget_at_the_kept_softmax_bytes_holds_it():
    """Through the API, a call with that budget holds the kept softmax and O(N) per-row terms beyond
    its inputs and outputs (a hook on CuPy's pool), and matches the lean path's loss."""
    from benchmarks.providers.measure import CupyPeak

    cp = _cp()
    _skip_unless_hopper(cp)
    n, d, v = 1024, 128, 8000
    e, c, t, _ = make_problem(n, d, v, "bfloat16", peaked=True, seed=6)
    ge, gc, gt = cp.asarray(e), cp.asarray(c), cp.asarray(t)
    budget = n * v * 2
    assert cuda_budget.budget_plan(n, v, d, ge.dtype, CCEOptions(memory_budget=budget), dc_later=True).dc_split
    cce.linear_cross_entropy_with_grad(ge, gc, gt, memory_budget=budget)
    cp.cuda.Device().synchronize()
    with CupyPeak() as pool:
        out = cce.linear_cross_entropy_with_grad(ge, gc, gt, memory_budget=budget)
        cp.cuda.Device().synchronize()
    kept = pool.hook.cur
    assert pool.peak - kept <= budget + 64 * n, (pool.peak - kept, budget)
    lean = cce.linear_cross_entropy_with_grad(ge, gc, gt)
    assert_rel_close(out[0], lean[0], 1e-5, "loss")
    for name, x, y in zip(("de", "dc"), out[1:], lean[1:]):
        assert_rel_close(x, y, TOL["bfloat16"], name)


def test_budget_last_chunk_needs_more_forward_scratch(mode):
    """Chunks of 1920 rows over 3000: the last one (1080 rows) gets more vocabulary splits, so more
    forward partials, than a full one. The plan's forward buffer holds them (it once held a full
    chunk's only, and the last chunk's forward wrote past it: wrong gradients at gemma2, 2560 MiB)."""
    from cce_cupy.cuda.plan import forward_scratch_nbytes

    cp = _cp()
    _skip_unless_hopper(cp)
    n, d, v = 3000, 64, 12000
    e, c, t, _ = make_problem(n, d, v, "bfloat16", peaked=True, seed=9)
    o = CCEOptions(memory_budget=53739520, z_loss=1e-4)
    plan, out = _run_budgeted(e, c, t, None, o)
    last = n - (-(-n // plan.rows) - 1) * plan.rows
    need = forward_scratch_nbytes(last, v, d, e.dtype)
    assert plan.rows < n and need > forward_scratch_nbytes(plan.rows, v, d, e.dtype), plan
    _assert_no_nan(out)
    truth = dense_reference(e, c, t, None, o)
    valid = t != o.ignore_index
    assert_rel_close(out["lse"].get()[valid], truth["lse"].reshape(-1)[valid], 1e-5, "lse")
    for name in ("de", "dc"):
        assert_rel_close(out[name], truth[name], TOL["bfloat16"], name)


def test_forward_refuses_a_short_scratch():
    """launch_forward raises where its scratch is smaller than forward_scratch_nbytes, rather than
    let the kernels write past it."""
    from cce_cupy.cuda.forward import launch_forward

    cp = _cp()
    ge, gc, gt, _ = _device_inputs(*make_problem(256, 64, 1000, "bfloat16", seed=1))
    lse, tgt = cp.empty(256, cp.float32), cp.empty(256, cp.float32)
    with pytest.raises(ValueError, match="scratch has 16 bytes"):
        launch_forward(ge, gc, gt, None, CCEOptions(), lse, tgt, cp.empty(16, cp.uint8))
