"""Certified filtering on CUDA (filter_eps): on Hopper the sparse backward, its per-row certificate
and the exact path of the uncertified rows (gathered on the host, or gated on the device under
JAX); elsewhere exact. Checked row by row against float64: a filtered row's error may exceed the
exact path's by at most tol ||g_i||_1 max_j ||C_j|| (docs/design.md, "Certified filtering").
Run on a GPU: pytest -m gpu -q -rs."""

from __future__ import annotations

import numpy as np
import pytest
from _gpu_helpers import _assert_no_nan, _cp, _device_inputs, _poisoned_outputs, _skip_unless_hopper
from conftest import (
    DTYPES,
    assert_rel_close,
    certificate_model,
    dense_reference,
    make_problem,
    make_sharp_problem,
    make_zipf_problem,
    to_f64,
)

import cce_cupy as cce
from cce_cupy.cuda import backward as cuda_backward
from cce_cupy.cuda import device, filtered, sparse
from cce_cupy.cuda import forward as cuda_forward
from cce_cupy.options import CCEOptions, certificate_margin, grad_dtype, row_coefficients

pytestmark = pytest.mark.gpu
OUT_ROUNDING = 2.0**-8  # two roundings of a 16-bit output element (2**-9 each), relative


def _run(e, c, t, b, o, grad_loss=1.0, grad_lse=None, **backward_kw):
    """Forward + backward through the launchers, every output poisoned with NaN first."""
    cp = _cp()
    ge, gc, gt = cp.asarray(e), cp.asarray(c), cp.asarray(t)
    gb = None if b is None else cp.asarray(b)
    n, d = e.shape
    v = c.shape[0]
    lse, tgt = cp.full(n, cp.nan, cp.float32), cp.full(n, cp.nan, cp.float32)
    cuda_forward.launch_forward(ge, gc, gt, gb, o, lse, tgt)
    gl = None if grad_lse is None else cp.asarray(grad_lse, cp.float32)
    cpp, cq = row_coefficients(cp, o, gt != o.ignore_index, lse, cp.asarray(grad_loss, dtype=cp.float32), gl)
    cpp, cq = cp.ascontiguousarray(cp.broadcast_to(cpp, (n,))), cp.ascontiguousarray(cp.broadcast_to(cq, (n,)))
    gdt = grad_dtype(ge.dtype, o)
    de, dc = cp.full((n, d), cp.nan, gdt), cp.full((v, d), cp.nan, gdt)
    db = None if b is None else cp.full((v,), cp.nan, gdt)
    cuda_backward.launch_backward(ge, gc, gt, gb, o, lse, cpp, cq, de, dc, db, **backward_kw)
    cp.cuda.Device().synchronize()
    out = {"lse": lse, "tgt": tgt, "de": de, "dc": dc, "db": db}
    _assert_no_nan(out)
    return {k: (None if x is None else to_f64(x)) for k, x in out.items()}


def _run_fused(e, c, t, b, o, grad_loss=1.0, stats=None):
    """The fused filtered launcher (candidates from the forward), every output poisoned first."""
    cp = _cp()
    ge, gc, gt, gb = _device_inputs(e, c, t, b)
    n, d = e.shape
    v = c.shape[0]
    assert filtered.filtered_applies(ge, gc, o)
    lse, tgt, de, dc, db = _poisoned_outputs(n, d, v, grad_dtype(ge.dtype, o), b is not None)
    g = cp.asarray(grad_loss, dtype=cp.float32)
    filtered.launch_fused_filtered(ge, gc, gt, gb, o, gt != o.ignore_index, g, lse, tgt, de, dc, db, stats)
    cp.cuda.Device().synchronize()
    out = {"lse": lse, "tgt": tgt, "de": de, "dc": dc, "db": db}
    _assert_no_nan(out)
    return {k: (None if x is None else to_f64(x)) for k, x in out.items()}


def _check_certificate(e, c, t, b, o, grad_loss=1.0, grad_lse=None, host_sync=True, fused=False):
    """Run filtered and exact; assert the certificate row by row (dE), and summed over rows (dC,
    dbias), against float64. fused: the filtered run is the fused launcher's (cce_cupy.cuda.filtered).
    Returns (stats, float64 model)."""
    stats = {}
    if fused:
        assert grad_lse is None and host_sync
        filt = _run_fused(e, c, t, b, o, grad_loss, stats)
    else:
        kw = {"host_sync": host_sync, **({"stats": stats} if host_sync else {})}
        filt = _run(e, c, t, b, o, grad_loss, grad_lse, **kw)
    exact = _run(e, c, t, b, o.replace(filter_eps=None, filter_tol=None), grad_loss, grad_lse)
    ref = dense_reference(e, c, t, b, o.replace(filter_eps=None, filter_tol=None), grad_loss, grad_lse)
    model = certificate_model(ref, o, c.shape[0])
    tol = o.resolved_filter_tol() * (1 + certificate_margin(c.shape[0]))
    e64, c64 = to_f64(e), to_f64(c)
    cmax = np.linalg.norm(c64, axis=1).max()
    norm1 = model["norm1"]

    def err_rows(x):
        return np.linalg.norm(x - ref["de"], axis=1)

    row_limit = err_rows(exact["de"]) + tol * norm1 * cmax + OUT_ROUNDING * np.linalg.norm(ref["de"], axis=1)
    over = np.flatnonzero(~(err_rows(filt["de"]) <= row_limit + 1e-30))
    assert over.size == 0, (
        f"dE: {over.size} rows over the certificate; row {over[0]}: err {err_rows(filt['de'])[over[0]]:.3e} > "
        f"{row_limit[over[0]]:.3e} (model certified {model['certified'][over[0]]}, ||g||_1 {norm1[over[0]]:.3e})"
    )
    dc_limit = (
        np.linalg.norm(exact["dc"] - ref["dc"])
        + tol * np.sum(norm1 * np.linalg.norm(e64, axis=1))
        + OUT_ROUNDING * np.linalg.norm(ref["dc"])
    )
    dc_err = np.linalg.norm(filt["dc"] - ref["dc"])
    assert dc_err <= dc_limit, f"dC: err {dc_err:.3e} > {dc_limit:.3e}"
    if b is not None:
        db_limit = np.abs(exact["db"] - ref["db"]).sum() + tol * norm1.sum() + OUT_ROUNDING * np.abs(ref["db"]).sum()
        assert np.abs(filt["db"] - ref["db"]).sum() <= db_limit
    if host_sync:
        active = (ref["coef_p"] != 0) | (ref["coef_q"] != 0)
        assert stats["rows"] == active.sum()
        # the GPU decides like the float64 model, borderline rows aside
        frac = 1.0 - stats["fallback_rows"] / max(stats["rows"], 1)
        assert abs(frac - model["certified"][active].mean()) <= 0.02, (frac, model["certified"][active].mean())
    return stats, model


def _data(kind, dtype, n=512, v=32768, seed=0):
    if kind == "sharp":
        return (*make_sharp_problem(n, 256, v, dtype, seed=seed), None)
    if kind == "zipf":
        return (*make_zipf_problem(n, 64, v, dtype, seed=seed), None)
    return make_problem(n, 136, 4096, dtype, peaked=(kind == "peaked"), seed=seed)


class _PathSpy:
    """Records whether the sparse lists were built (by the recompute pass: lists; by the forward:
    fused) and how many rows took the host-side exact path."""

    def __init__(self, monkeypatch):
        self.lists, self.fused, self.exact_rows = 0, 0, []
        real_lists, real_rows, real_fused = (
            sparse.build_lists,
            cuda_backward._exact_rows,
            filtered.launch_fused_filtered,
        )

        def lists(*a, **k):
            self.lists += 1
            return real_lists(*a, **k)

        def fused(*a, **k):
            self.fused += 1
            return real_fused(*a, **k)

        monkeypatch.setattr(filtered, "launch_fused_filtered", fused)

        def rows(idx, *a, **k):
            self.exact_rows.append(int(idx.size))
            return real_rows(idx, *a, **k)

        monkeypatch.setattr(sparse, "build_lists", lists)
        monkeypatch.setattr(cuda_backward, "_exact_rows", rows)


@pytest.mark.parametrize("host_sync", [True, False], ids=["sync", "nosync"])
@pytest.mark.parametrize("data", ["sharp", "peaked", "uniform", "zipf"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_certificate_holds_row_by_row(dtype, data, host_sync, monkeypatch):
    """filter_eps="auto" on sharply peaked rows (most certified: the float64 model says > 90% on
    this data, and the GPU must decide within 2% of it), on make_problem's peaked and uniform rows,
    and on Zipf long-tailed rows (~37% of the mass below eps: none certified, all exact)."""
    cp = _cp()
    _skip_unless_hopper(cp)
    e, c, t, b = _data(data, dtype)
    spy = _PathSpy(monkeypatch)
    stats, model = _check_certificate(e, c, t, b, CCEOptions(filter_eps="auto"), host_sync=host_sync)
    assert spy.lists == 1
    active = t != -100
    if data == "sharp":
        assert model["certified"][active].mean() > 0.9
    if data == "zipf":
        assert not model["certified"].any()
        if host_sync:
            # no row certified: the exact backward over all rows at once, nothing gathered
            assert stats["fallback_rows"] == active.sum() and spy.exact_rows == []


CASES = {
    "softcap": {"softcap": 30.0},
    "smoothing": {"label_smoothing": 0.1},
    "softcap_smoothing": {"softcap": 30.0, "label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "bias": {"bias": True},
    "ignore_index": {"ignore_index": 3},
    "grad_lse": {"grad_lse": True},
    "none_grad_fp32": {"reduction": "none", "grad_dtype": "float32"},
    "tol_2^-6": {"filter_tol": 2.0**-6},
    "all": {"softcap": 30.0, "label_smoothing": 0.1, "z_loss": 1e-3, "bias": True, "reduction": "sum"},
}


def _mixed_rows(case: str):
    """(options, e, c, t, bias, grad_loss, grad_lse) of CASES[case] on 300 rows (3 row blocks,
    D = 256, V = 8192) of which ~3/4 are sharp (certifiable) and ~1/4 flat (exact path), 15% of
    them ignored; bf16."""
    kw = dict(CASES[case])
    has_bias, has_grad_lse = kw.pop("bias", False), kw.pop("grad_lse", False)
    o = CCEOptions(filter_eps="auto", **kw)
    n, d, v = 300, 256, 8192
    e, c, t = make_sharp_problem(n, d, v, "float32", seed=5)
    rng = np.random.default_rng(6)
    e[: n // 4] = rng.standard_normal((n // 4, d))  # flat rows
    t[rng.random(n) < 0.15] = o.ignore_index
    bf = DTYPES["bfloat16"]
    e, c = e.astype(bf), c.astype(bf)
    b = (0.1 * rng.standard_normal(v)).astype(bf) if has_bias else None
    grad_loss = rng.uniform(0.5, 2.0, n) if o.reduction == "none" else 0.7
    grad_lse = rng.standard_normal(n) * 0.1 if has_grad_lse else None
    return o, e, c, t, b, grad_loss, grad_lse


@pytest.mark.parametrize("host_sync", [True, False], ids=["sync", "nosync"])
@pytest.mark.parametrize("case", list(CASES))
def test_certified_options(case, host_sync):
    """Every option through the certified path, on rows of which ~3/4 are sharp (certifiable) and
    ~1/4 flat (exact path): the certificate holds row by row. 3 row blocks, D = 256."""
    cp = _cp()
    _skip_unless_hopper(cp)
    o, e, c, t, b, grad_loss, grad_lse = _mixed_rows(case)
    _, model = _check_certificate(e, c, t, b, o, grad_loss, grad_lse, host_sync=host_sync)
    if case == "softcap_smoothing" or case == "all":  # the smoothing term alone breaks every bound
        assert not model["certified"][t != o.ignore_index].any()
    else:
        assert 0.4 < model["certified"][t != o.ignore_index].mean() < 0.95  # both paths run


@pytest.mark.parametrize("kernels", ["auto", "sm80"])
@pytest.mark.parametrize("gdt", [None, "float32"])
def test_z_loss_keeps_confident_rows_gradient(kernels, gdt, monkeypatch):
    """The issue's case: bf16, N=4, V=16, target logit 20, z_loss=1e-4. Exact |dE| ~ 0.008 (2 z_loss
    lse ~ 4e-3 a row), filtered must match it, not drop it (it was 0 on the tiled filtered path);
    likewise a grad_lse alone. On Hopper through the sparse path, on sm80 exact."""
    cp = _cp()
    monkeypatch.setattr(device, "KERNELS", kernels)
    spy = _PathSpy(monkeypatch)
    e = np.zeros((4, 16), np.float32)
    e[:, 3] = 20.0
    bf = DTYPES["bfloat16"]
    ge, gc, gt = (
        cp.asarray(e.astype(bf)),
        cp.asarray(np.eye(16, dtype=np.float32).astype(bf)),
        cp.asarray(np.full(4, 3)),
    )
    o = CCEOptions(z_loss=1e-4, reduction="sum", grad_dtype=gdt)
    exact = cce.linear_cross_entropy_with_grad(ge, gc, gt, options=o)[1]
    filtered = cce.linear_cross_entropy_with_grad(ge, gc, gt, options=o.replace(filter_eps="auto"))[1]
    assert float(cp.linalg.norm(exact.astype(cp.float32))) > 7e-3
    assert_rel_close(filtered, exact, 1e-2, "de(filtered, z_loss)")
    hopper = cp.cuda.Device().compute_capability == "90" and kernels == "auto"
    assert (spy.fused, spy.lists) == ((1, 0) if hopper else (0, 0))  # with_grad: lists from the forward
    lse, _ = cce.forward(ge, gc, gt)
    o = CCEOptions(reduction="sum", grad_dtype="float32", filter_eps="auto")
    de = cce.backward(ge, gc, gt, lse, 0.0, grad_lse=cp.ones(4, cp.float32), options=o)[0]
    assert_rel_close(de, np.eye(16)[[3] * 4], 1e-2, "de(grad_lse, filtered)")


@pytest.mark.parametrize("host_sync", [True, False], ids=["sync", "nosync"])
def test_overflowed_rows_take_exact_path(host_sync, monkeypatch):
    """Uniform logits over V = 3000 with eps = 1e-4: every row has ~2000 candidates, more than its
    1024 slots; each such row takes the exact path (gathered, or the gated device pass)."""
    cp = _cp()
    _skip_unless_hopper(cp)
    o = CCEOptions(filter_eps=1e-4)
    e, c, t, b = make_problem(260, 64, 3000, "bfloat16", bias=True, seed=12)
    spy = _PathSpy(monkeypatch)
    stats, _ = _check_certificate(e, c, t, b, o, host_sync=host_sync)
    if host_sync:
        assert stats["fallback_rows"] == stats["rows"] == (t != -100).sum() and spy.exact_rows == []
    exact = _run(e, c, t, b, CCEOptions())
    filt = _run(e, c, t, b, o, host_sync=host_sync)
    for name in ("de", "dc", "db"):
        assert_rel_close(filt[name], exact[name], 1e-2, name)


@pytest.mark.parametrize("how", ["sm80", "deterministic", "float32"])
def test_filter_is_exact_where_no_sparse_path(how, monkeypatch):
    """Off Hopper, with deterministic=True, or with fp32 inputs, filtering runs the exact backward
    (trivially certified): bitwise the exact call's gradients."""
    cp = _cp()
    if how == "sm80":
        monkeypatch.setattr(device, "KERNELS", "sm80")
    spy = _PathSpy(monkeypatch)
    o = CCEOptions(deterministic=(how == "deterministic"))
    e, c, t = make_sharp_problem(200, 256, 2000, "float32" if how == "float32" else "bfloat16", seed=8)
    args = (cp.asarray(e), cp.asarray(c), cp.asarray(t))
    exact = cce.linear_cross_entropy_with_grad(*args, options=o)
    filt = cce.linear_cross_entropy_with_grad(*args, options=o.replace(filter_eps="auto"))
    assert spy.lists == spy.fused == 0
    for name, a, bb in zip(("loss", "de", "dc"), exact, filt):
        assert cp.asnumpy(a).tobytes() == cp.asnumpy(bb).tobytes(), f"{name} differs from the exact call"


# ------------------------------------------------------------- candidates collected by the forward
@pytest.mark.parametrize("data", ["sharp", "peaked", "uniform", "zipf"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_certificate_holds_row_by_row(dtype, data, monkeypatch):
    """The fused launcher (the forward collects the candidates, no recompute pass) on the same data
    as test_certificate_holds_row_by_row: the certificate holds row by row, and the GPU decides
    within 2% of the float64 model."""
    cp = _cp()
    _skip_unless_hopper(cp)
    e, c, t, b = _data(data, dtype)
    spy = _PathSpy(monkeypatch)
    stats, model = _check_certificate(e, c, t, b, CCEOptions(filter_eps="auto"), fused=True)
    assert spy.lists == 0  # no recompute pass
    active = t != -100
    if data == "sharp":
        assert stats["fallback_rows"] < 0.1 * active.sum()


@pytest.mark.parametrize("case", [k for k in CASES if k != "grad_lse"])
def test_fused_certified_options(case):
    """Every option of linear_cross_entropy_with_grad through the fused launcher, on ~3/4 sharp and
    ~1/4 flat rows (test_certified_options' data): the certificate holds row by row."""
    cp = _cp()
    _skip_unless_hopper(cp)
    o, e, c, t, b, grad_loss, _ = _mixed_rows(case)
    stats, model = _check_certificate(e, c, t, b, o, grad_loss, fused=True)
    if case not in ("softcap_smoothing", "all"):
        assert 0 < stats["fallback_rows"] < stats["rows"]  # both paths run


def test_fused_overflowed_rows_take_exact_path(monkeypatch):
    """Rows with more candidates than slots (test_overflowed_rows_take_exact_path's data) overflow
    their forward lists and take the exact path: all of them, and the result is the exact one."""
    cp = _cp()
    _skip_unless_hopper(cp)
    o = CCEOptions(filter_eps=1e-4)
    e, c, t, b = make_problem(260, 64, 3000, "bfloat16", bias=True, seed=12)
    stats, _ = _check_certificate(e, c, t, b, o, fused=True)
    assert stats["fallback_rows"] == stats["rows"] == (t != -100).sum()
    exact = _run(e, c, t, b, CCEOptions())
    filt = _run_fused(e, c, t, b, o)
    for name in ("de", "dc", "db"):
        assert_rel_close(filt[name], exact[name], 1e-2, name)


@pytest.mark.parametrize("data", ["zipf", "peaked"])
def test_fused_uncertified_call_is_the_exact_call(data, monkeypatch):
    """Where no row certifies (long-tailed and make_problem's peaked rows), the filtered call runs the
    exact backward on all rows: loss and gradients bitwise those of the exact call (the forward's
    lse is computed by the same arithmetic with or without its lists)."""
    cp = _cp()
    _skip_unless_hopper(cp)
    e, c, t, _ = _data(data, "bfloat16")
    args = (cp.asarray(e), cp.asarray(c), cp.asarray(t))
    spy = _PathSpy(monkeypatch)
    exact = cce.linear_cross_entropy_with_grad(*args)
    filt = cce.linear_cross_entropy_with_grad(*args, filter_eps="auto")
    assert spy.fused == 1 and spy.exact_rows == []  # no gather: the whole call went exact
    for name, a, bb in zip(("loss", "de", "dc"), exact, filt):
        assert cp.asnumpy(a).tobytes() == cp.asnumpy(bb).tobytes(), f"{name} differs from the exact call"


@pytest.mark.parametrize("data", ["sharp", "zipf"])
def test_api_stats_match_the_launcher(data):
    """linear_cross_entropy_with_grad(stats=...) on CuPy (the fused filtered call): rows with a
    gradient, and certified rows = those rows minus the fused launcher's fallback rows (sharp: most
    certified; Zipf: none)."""
    cp = _cp()
    _skip_unless_hopper(cp)
    e, c, t, _ = _data(data, "bfloat16")
    o = CCEOptions(filter_eps="auto")
    launcher = _check_certificate(e, c, t, None, o, fused=True)[0]
    stats = {}
    cce.linear_cross_entropy_with_grad(cp.asarray(e), cp.asarray(c), cp.asarray(t), stats=stats, options=o)
    active = int((t != -100).sum())
    assert stats["rows"] == launcher["rows"] == active
    # The certificate's sums end in float atomics: a row at the boundary may go either way per call.
    assert abs(stats["certified_rows"] - (active - launcher["fallback_rows"])) <= max(2, active // 100)
    if data == "sharp":
        assert stats["certified_rows"] > 0.9 * active
    else:
        assert stats["certified_rows"] == 0
    exact = {}
    cce.linear_cross_entropy_with_grad(cp.asarray(e), cp.asarray(c), cp.asarray(t), stats=exact)
    assert exact == {"rows": active, "certified_rows": 0}


@pytest.mark.parametrize("data", ["zipf", "sharp"])
def test_fused_filtered_memory(data):
    """The filtered call's memory beyond its outputs, against the two lists (entries and their
    column-sorted copy, N x slots x 8 bytes each): within issue 14's 64 MiB plus the lists, and at
    most the larger of the lists and the exact call's memory plus a few MiB (the forward's partials,
    the counters), not their sum: rows that fall back to the exact path run it in the lists'
    bytes (launch_backward reuses the scratch) instead of a G chunk allocated beside them."""
    from benchmarks.providers.measure import CupyPeak
    from cce_cupy.cuda.plan import sparse_slots

    cp = _cp()
    _skip_unless_hopper(cp)
    n, d, v = 4096, 512, 50000
    if data == "zipf":
        e, c, t = make_zipf_problem(n, d, v, "bfloat16", seed=3)
    else:
        e, c, t = make_sharp_problem(n, d, v, "bfloat16", seed=3)
    args = (cp.asarray(e), cp.asarray(c), cp.asarray(t))
    outputs = 4 + n * d * 2 + v * d * 2  # loss, dE, dC

    def extra(**kw):
        cce.linear_cross_entropy_with_grad(*args, **kw)  # warm: kernels loaded, cuBLAS workspace
        cp.cuda.Device().synchronize()
        with CupyPeak() as peak:
            cce.linear_cross_entropy_with_grad(*args, **kw)
            cp.cuda.Device().synchronize()
        return peak.peak - outputs

    lists = 2 * n * sparse_slots(n, d, "bfloat16", CCEOptions(filter_eps="auto")) * 8
    exact, filt = extra(), extra(filter_eps="auto")
    assert filt <= max(exact, lists) + 8 * 2**20, (filt, exact, lists)
    assert filt <= 64 * 2**20 + lists, (filt, lists)


def test_api_skips_the_filter_after_a_call_that_did_not_pay(monkeypatch):
    """linear_cross_entropy_with_grad on Zipf data (nothing certifies): the first call runs the
    fused filter, the next PROBE_EVERY - 1 run the exact path (no lists: certified 0, gradients
    bitwise the exact call's), the one after probes again; on sharp data every call filters."""
    from cce_cupy.cuda.filter_history import PROBE_EVERY

    cp = _cp()
    _skip_unless_hopper(cp)
    e, c, t, _ = _data("zipf", "bfloat16")
    args = (cp.asarray(e), cp.asarray(c), cp.asarray(t))
    spy = _PathSpy(monkeypatch)
    exact = cce.linear_cross_entropy_with_grad(*args)
    for call in range(PROBE_EVERY + 1):
        stats = {}
        out = cce.linear_cross_entropy_with_grad(*args, filter_eps="auto", stats=stats)
        probe = call in (0, PROBE_EVERY)
        assert spy.fused == 1 + (call >= PROBE_EVERY), call
        assert spy.lists == 0 and stats["certified_rows"] == 0
        if not probe:
            for name, a, b in zip(("loss", "de", "dc"), exact, out):
                assert cp.asnumpy(a).tobytes() == cp.asnumpy(b).tobytes(), f"call {call}: {name}"
    es, cs, ts, _ = _data("sharp", "bfloat16")
    sharp = (cp.asarray(es), cp.asarray(cs), cp.asarray(ts))
    before = spy.fused
    for _ in range(3):
        stats = {}
        cce.linear_cross_entropy_with_grad(*sharp, filter_eps="auto", stats=stats)
        assert stats["certified_rows"] > 0.9 * stats["rows"]
    assert spy.fused == before + 3
