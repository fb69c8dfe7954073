"""CUDA path (cupy + the cce_cupy.cuda launchers) against the float64 reference. Run on a GPU: pytest -m gpu -q -rs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DTYPES, assert_rel_close, dense_reference, logits_reference, make_problem, rel_err, to_f64

import cce_cupy as cce
from cce_cupy.cuda import backward as cuda_backward
from cce_cupy.cuda import device, plan
from cce_cupy.cuda import forward as cuda_forward
from cce_cupy.cuda import logits as cuda_logits
from cce_cupy.cuda import sparse as cuda_sparse
from cce_cupy.options import CCEOptions, dtype_eps, grad_dtype, row_coefficients

pytestmark = pytest.mark.gpu

OPTION_CASES = {
    "default": {},
    "softcap": {"softcap": 2.5},
    "smooth_zloss_none": {"label_smoothing": 0.1, "z_loss": 1e-2, "reduction": "none"},
    "grad_fp32_sum": {"grad_dtype": "float32", "reduction": "sum"},
    "ignore_index": {"ignore_index": 3},
    "all": {
        "softcap": 2.5,
        "label_smoothing": 0.1,
        "z_loss": 1e-2,
        "reduction": "none",
        "grad_dtype": "float32",
        "deterministic": True,
    },
}
SHAPES = [(7, 13, 129), (252, 123, 507), (130, 64, 300), (1, 8, 1), (257, 136, 1000)]  # (N, D, V)
TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}


def _cp():
    import cupy

    return cupy


def _naive(e, c, t, b, o: CCEOptions, coef_p, coef_q, dtype):
    """A naive same-dtype computation: logits and the logit gradient rounded to `dtype` (fp32 accumulate)."""
    dt = DTYPES[dtype]
    rnd = lambda x: np.asarray(x, np.float32).astype(dt).astype(np.float64)  # noqa: E731
    e64, c64 = e.astype(np.float64), c.astype(np.float64)
    z = rnd(e.astype(np.float32) @ c.astype(np.float32).T)
    if b is not None:
        z = rnd(z + b.astype(np.float64))
    y = rnd(o.softcap * np.tanh(z / o.softcap)) if o.softcap else z
    m = y.max(1, keepdims=True)
    lse = (m + np.log(np.exp(y - m).sum(1, keepdims=True)))[:, 0]
    n, v = y.shape
    valid = t != o.ignore_index
    ls = o.label_smoothing
    yt = y[np.arange(n), np.clip(t, 0, v - 1)]
    tgt = np.where(valid, (1 - ls) * yt + ls / v * y.sum(1), 0.0)
    onehot = np.zeros_like(y)
    onehot[np.arange(n)[valid], t[valid]] = 1.0
    g = coef_p[:, None] * np.exp(y - lse[:, None]) - coef_q[:, None] * ((1 - ls) * onehot + ls / v)
    if o.softcap:
        g = g * (1 - (y / o.softcap) ** 2)
    g = rnd(g)
    return {"lse": lse, "tgt": tgt, "de": rnd(g @ c64), "dc": rnd(g.T @ e64)}


def _run_launchers(e, c, t, b, o: CCEOptions, grad_loss, **backward_kw):
    """Forward + backward through the cce_cupy.cuda launchers with every output poisoned with NaN first."""
    cp = _cp()
    ge, gc, gt = cp.asarray(e), cp.asarray(c), cp.asarray(t)
    gb = None if b is None else cp.asarray(b)
    n, d = e.shape
    v = c.shape[0]
    lse = cp.full(n, cp.nan, cp.float32)
    tgt = cp.full(n, cp.nan, cp.float32)
    cuda_forward.launch_forward(ge, gc, gt, gb, o, lse, tgt)
    cpp, cq = row_coefficients(cp, o, gt != o.ignore_index, lse, cp.asarray(grad_loss, dtype=cp.float32))
    gdt = grad_dtype(ge.dtype, o)
    de = cp.full((n, d), cp.nan, gdt)
    dc = cp.full((v, d), cp.nan, gdt)
    db = None if b is None else cp.full((v,), cp.nan, gdt)
    cuda_backward.launch_backward(ge, gc, gt, gb, o, lse, cpp, cq, de, dc, db, **backward_kw)
    cp.cuda.Device().synchronize()
    return {
        "lse": lse,
        "tgt": tgt,
        "de": de,
        "dc": dc,
        "db": db,
        "coef_p": cp.asnumpy(cpp).astype(np.float64),
        "coef_q": cp.asnumpy(cq).astype(np.float64),
    }


def _assert_no_nan(out):
    for k in ("lse", "tgt", "de", "dc", "db"):
        if out[k] is not None:
            a = to_f64(out[k])
            bad = np.argwhere(np.isnan(a))
            assert bad.size == 0, (
                f"{k}: {len(bad)} elements never written (still NaN), first at {bad[0].tolist()}"
            )


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_launchers_vs_float64(dtype, case, shape, with_bias):
    n, d, v = shape
    o = CCEOptions(**OPTION_CASES[case])
    e, c, t, b = make_problem(n, d, v, dtype, bias=with_bias, peaked=(n % 2 == 0), seed=n * 7 + v)
    if o.ignore_index != -100:
        t = np.where(t == -100, o.ignore_index, t)
    gl = np.random.default_rng(0).random(n).astype(np.float32) if o.reduction == "none" else 0.5
    out = _run_launchers(e, c, t, b, o, gl)
    _assert_no_nan(out)
    truth = dense_reference(e, c, t, b, o, grad_loss=gl)
    # the coefficients come from the (fp32) lse of the kernel; feed the truth the same
    tol = TOL[dtype]
    assert_rel_close(out["lse"], truth["lse"], tol, "lse")
    assert_rel_close(out["tgt"], truth["tgt"], tol, "tgt")
    assert_rel_close(out["de"], truth["de"], tol, "de")
    assert_rel_close(out["dc"], truth["dc"], tol, "dc")
    if with_bias:
        assert_rel_close(out["db"], truth["db"], tol, "dbias")
    if dtype != "float32":
        naive = _naive(e, c, t, b, o, out["coef_p"], out["coef_q"], dtype)
        for k in ("lse", "tgt", "de", "dc"):
            ref = truth[k].reshape(naive[k].shape)
            ours_err = np.linalg.norm(to_f64(out[k]) - ref)
            naive_err = np.linalg.norm(naive[k] - ref)
            assert ours_err <= naive_err + tol * np.linalg.norm(ref), (
                f"{k}: |ours - truth| = {ours_err:.3e} > |naive - truth| = {naive_err:.3e} + tol"
            )


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_api_cupy_batch_shift_all_options(dtype):
    cp = _cp()
    e, c, t, b = make_problem(2 * 65, 40, 333, dtype, bias=True, peaked=True, batch_shape=(2, 65), seed=5)
    o = CCEOptions(
        shift=True,
        softcap=5.0,
        label_smoothing=0.05,
        z_loss=1e-3,
        return_lse=True,
        return_z_loss=True,
        grad_dtype="float32",
    )
    loss, de, dc, db, lse, zl = cce.linear_cross_entropy_with_grad(
        cp.asarray(e), cp.asarray(c), cp.asarray(t), cp.asarray(b), options=o
    )
    assert isinstance(loss, cp.ndarray) and de.shape == e.shape and de.dtype == np.float32
    truth = dense_reference(e, c, t, b, o)
    tol = TOL[dtype]
    for name, ours in (("loss", loss), ("de", de), ("dc", dc), ("db", db), ("lse", lse), ("z_loss", zl)):
        assert_rel_close(ours, truth[name], tol, name)


def test_api_n0_and_v1():
    cp = _cp()
    e, c, t, b = make_problem(0, 8, 10, bias=True)
    loss, de, dc, db = cce.linear_cross_entropy_with_grad(
        cp.asarray(e), cp.asarray(c), cp.asarray(t), cp.asarray(b)
    )
    assert float(loss) == 0.0 and de.shape == (0, 8) and not cp.any(dc) and not cp.any(db)
    e, c, t, _ = make_problem(5, 8, 1, ignore_frac=0.0)
    loss, de, dc = cce.linear_cross_entropy_with_grad(cp.asarray(e), cp.asarray(c), cp.asarray(t))
    assert abs(float(loss)) < 1e-5 and float(cp.abs(de).max()) < 1e-5


@pytest.mark.parametrize("data", ["peaked", "uniform"])
def test_filter_auto_bf16_tiled(data, monkeypatch):
    """The tiled filtered backward (sm_80, deterministic=True, and the sparse path's fallback)."""
    cp = _cp()
    monkeypatch.setattr(plan, "SPARSE_LIST_BYTES", 0)  # no slots: the sparse backward is off
    e, c, t, _ = make_problem(512, 128, 4096, "bfloat16", peaked=(data == "peaked"), seed=6)
    o = CCEOptions(filter_eps="auto")
    out = _run_launchers(e, c, t, None, o, 1.0)
    truth = dense_reference(e, c, t, None, CCEOptions())
    err = max(rel_err(out["de"], truth["de"]), rel_err(out["dc"], truth["dc"]))
    print(f"filter_eps='auto' bf16 {data}: rel err {err:.3e}")
    if data == "peaked":
        assert err <= 1e-2, f"filter_eps='auto' on peaked bf16 logits: rel err {err:.3e} > 1e-2"
    else:  # the tile rule's prediction (the NumPy backend keeps all 128 tiles of this data)
        pred = dense_reference(e, c, t, None, o, filter_eps=o.resolved_filter_eps(dtype_eps(e.dtype)))
        assert_rel_close(out["de"], pred["de"], 1e-2, "de(filtered)")
        assert_rel_close(out["dc"], pred["dc"], 1e-2, "dc(filtered)")
    del cp


def _skip_unless_hopper(cp):
    if cp.cuda.Device().compute_capability != "90" or device.KERNELS != "auto":
        pytest.skip("the Hopper kernels (wgmma, sparse filtered backward) run only on compute capability 9.0")


class _PathSpy:
    """Records which backward ran: the sparse one (and its overflow flag) and/or the tiled one."""

    def __init__(self, monkeypatch):
        self.overflow, self.tiled_parts = [], 0
        real_sparse, real_part = cuda_backward._sparse_backward, cuda_backward._BackwardPlan.run_part

        def sparse(*a, **k):
            flag = real_sparse(*a, **k)
            self.overflow.append(flag)
            return flag

        def part(plan, *a, **k):
            self.tiled_parts += 1
            return real_part(plan, *a, **k)

        monkeypatch.setattr(cuda_backward, "_sparse_backward", sparse)
        monkeypatch.setattr(cuda_backward._BackwardPlan, "run_part", part)

    def overflowed(self) -> bool:
        assert len(self.overflow) == 1, "the sparse backward did not run"
        return bool(int(self.overflow[0].get()[0]))


SPARSE_CASES = {
    "default": {},
    "softcap_bias": {"softcap": 2.5, "bias": True},
    "zloss_none_ignore3": {"z_loss": 1e-2, "reduction": "none", "ignore_index": 3},
    "grad_fp32_sum": {"grad_dtype": "float32", "reduction": "sum"},
}


@pytest.mark.parametrize("host_sync", [True, False], ids=["sync", "nosync"])
@pytest.mark.parametrize("case", list(SPARSE_CASES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sparse_filtered_backward(dtype, case, host_sync, monkeypatch):
    """filter_eps on Hopper: the sparse backward keeps each row's target and the columns with
    softmax >= eps, exactly (float64 reference with that element rule; 6.6% away from the exact
    gradient here, so the comparison tells the rules apart), without falling back. 3 row blocks,
    4 column tiles, D not a multiple of 64."""
    cp = _cp()
    _skip_unless_hopper(cp)
    kw = dict(SPARSE_CASES[case])
    has_bias = kw.pop("bias", False)
    o = CCEOptions(filter_eps=1e-3, **kw)
    e, c, t, b = make_problem(300, 136, 1000, dtype, peaked=True, bias=has_bias, seed=11,
                              ignore_index=o.ignore_index)
    spy = _PathSpy(monkeypatch)
    grad_loss = np.random.default_rng(3).standard_normal(300) if o.reduction == "none" else 0.7
    out = _run_launchers(e, c, t, b, o, grad_loss, host_sync=host_sync)
    assert not spy.overflowed() and spy.tiled_parts == (0 if host_sync else 1)
    _assert_no_nan(out)
    ref = dense_reference(e, c, t, b, o, grad_loss, filter_eps=1e-3, filter_mode="element")
    # fp32 gradients: only fp32 arithmetic separates us from the reference (and elements within
    # rounding of eps); 16-bit ones are rounded once at the end.
    tol = 1e-4 if o.grad_dtype == "float32" else TOL[dtype]
    for name in ("de", "dc", "db"):
        if out[name] is not None:
            assert_rel_close(out[name], ref[name], tol, name)


@pytest.mark.parametrize("host_sync", [True, False], ids=["sync", "nosync"])
def test_sparse_overflow_falls_back_to_tiled(host_sync, monkeypatch):
    """Uniform logits over V = 3000 with eps = 1e-4: every row has ~2000 columns above eps, more
    than its 1024 slots; the flag is set and the tiled backward (read on the host, or launched
    anyway and gated on the device flag) writes every gradient."""
    cp = _cp()
    _skip_unless_hopper(cp)
    o = CCEOptions(filter_eps=1e-4)
    e, c, t, b = make_problem(260, 64, 3000, "bfloat16", bias=True, seed=12)
    assert plan.sparse_slots(260, 64, e.dtype, o) == plan.SPARSE_MAX_SLOTS
    spy = _PathSpy(monkeypatch)
    out = _run_launchers(e, c, t, b, o, 1.0, host_sync=host_sync)
    assert spy.overflowed() and spy.tiled_parts == 1
    _assert_no_nan(out)
    ref = dense_reference(e, c, t, b, o, filter_eps=1e-4)
    for name in ("de", "dc", "db"):
        assert_rel_close(out[name], ref[name], TOL["bfloat16"], name)


def test_sparse_filter_auto_on_lm_like_logits():
    """filter_eps="auto" through the API on logits shaped like a trained LM's at a large vocabulary
    (the benchmark's peaked data: each row's target ~10 above the background and two distractors
    ~8 above it, the background softmax far below eps): within the bf16 bound of the exact
    gradient. The element rule alone (float64) is 4.3e-3 (dE) and 9.4e-4 (dC) from it here; on
    flatter softmaxes it drops more (see test_sparse_filtered_backward's 6.6%)."""
    cp = _cp()
    _skip_unless_hopper(cp)
    n, d, v = 256, 512, 32768
    rng = np.random.default_rng(13)
    c = rng.standard_normal((v, d)) / np.sqrt(d)
    t = rng.integers(0, v, n)
    hot = rng.integers(0, v, (n, 2))
    e = rng.standard_normal((n, d)) + 15 * c[t] + 13 * (c[hot[:, 0]] + c[hot[:, 1]])
    bf = DTYPES["bfloat16"]
    e, c = e.astype(np.float32).astype(bf), c.astype(np.float32).astype(bf)
    o = CCEOptions(filter_eps="auto")
    loss, de, dc = cce.linear_cross_entropy_with_grad(cp.asarray(e), cp.asarray(c), cp.asarray(t), options=o)
    truth = dense_reference(e, c, t, None, CCEOptions())
    assert_rel_close(loss, truth["loss"], TOL["bfloat16"], "loss")
    assert_rel_close(de, truth["de"], TOL["bfloat16"], "dE")
    assert_rel_close(dc, truth["dc"], TOL["bfloat16"], "dC")


@pytest.mark.parametrize("data", ["uniform", "peaked"])
def test_allow_tf32_forward(data, monkeypatch):
    """fp32 inputs with allow_tf32 on Hopper. A loss only evaluated runs the wgmma forward as TF32
    (checked by the kernel name): TF32 keeps 10 mantissa bits like fp16, so it is held to the
    16-bit tolerance. With gradients the forward is the exact fp32 one (no TF32 kernel), held to
    the fp32 tolerance."""
    cp = _cp()
    _skip_unless_hopper(cp)
    names = []
    for mod in (cuda_forward, cuda_backward, cuda_sparse, cuda_logits):  # every launcher's get_kernel
        real_get = mod.get_kernel
        monkeypatch.setattr(mod, "get_kernel",
                            lambda f, name, real_get=real_get: (names.append(name), real_get(f, name))[1])
    e, c, t, _ = make_problem(300, 136, 1000, "float32", peaked=(data == "peaked"), seed=14)
    ge, gc, gt = cp.asarray(e), cp.asarray(c), cp.asarray(t)
    o = CCEOptions(allow_tf32=True)
    truth = dense_reference(e, c, t, None, CCEOptions())
    loss = cce.linear_cross_entropy(ge, gc, gt, options=o)
    tf32 = [n for n in names if n.startswith("lce_forward_partials_sm90") and ", float," in n]
    assert tf32, names
    print(f"allow_tf32 {data}: loss rel err {rel_err(loss, truth['loss']):.2e}")
    assert_rel_close(loss, truth["loss"], TOL["float16"], "loss (TF32 forward)")
    names.clear()
    loss, de, dc = cce.linear_cross_entropy_with_grad(ge, gc, gt, options=o)
    assert not any(n.startswith("lce_forward_partials_sm90") for n in names), names
    assert_rel_close(loss, truth["loss"], TOL["float32"], "loss (differentiated: exact)")
    assert_rel_close(de, truth["de"], TOL["float32"], "dE")
    assert_rel_close(dc, truth["dc"], TOL["float32"], "dC")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_deterministic_bitwise(dtype):
    cp = _cp()
    e, c, t, b = make_problem(300, 72, 2000, dtype, bias=True, peaked=True, seed=7)
    o = CCEOptions(deterministic=True)
    args = (cp.asarray(e), cp.asarray(c), cp.asarray(t), cp.asarray(b))
    r1 = cce.linear_cross_entropy_with_grad(*args, options=o)
    r2 = cce.linear_cross_entropy_with_grad(*args, options=o)
    for name, a, bb in zip(("loss", "de", "dc", "db"), r1, r2):
        assert cp.asnumpy(a).tobytes() == cp.asnumpy(bb).tobytes(), f"{name} differs between two runs"


def test_out_of_range_target_flag():
    cp = _cp()
    cce.check_targets()  # clear anything pending from earlier tests
    device.target_error_flag().fill(0)
    e, c, t, _ = make_problem(20, 16, 50, ignore_frac=0.0, seed=8)
    t[3] = 50
    ge, gc = cp.asarray(e), cp.asarray(c)
    loss = cce.linear_cross_entropy(ge, gc, cp.asarray(t), reduction="none")
    l3 = cp.asnumpy(loss)
    assert np.isnan(l3[3]) and np.isfinite(np.delete(l3, 3)).all(), l3
    with pytest.raises(ValueError, match="outside"):
        cce.check_targets()
    assert int(device.target_error_flag()[0]) == 0  # cleared after reporting
    cce.check_targets()  # nothing pending any more
    # reported at the start of the next call once the flag copy has landed
    cce.linear_cross_entropy(ge, gc, cp.asarray(t))
    cp.cuda.Device().synchronize()
    t_ok = cp.asarray(np.clip(t, 0, 49))
    with pytest.raises(ValueError, match="outside"):
        cce.linear_cross_entropy(ge, gc, t_ok)
    cce.linear_cross_entropy(ge, gc, t_ok)
    cce.check_targets()
    # negative targets too, through the logits kernel
    logits = cp.asarray((e @ c.T).astype(np.float32))
    t_neg = t_ok.copy()
    t_neg[0] = -1
    assert cp.isnan(cce.cross_entropy(logits, t_neg))
    with pytest.raises(ValueError, match="outside"):
        cce.check_targets()


# (N, V) of the logits-level tests, and the cluster size ce_logits_inplace_cluster gets on an H100
# per element size (None: the two-sweep ce_logits). V = 1003: rows start off 16 bytes (scalar
# head and tail); the others take every cluster size and the fallback past the largest.
LOGITS_SHAPES = {
    (77, 1003): {2: None, 4: None},
    (64, 1024): {2: 1, 4: 1},
    (6, 140000): {2: 4, 4: 8},
    (3, 520000): {2: 8, 4: None},
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "kw",
    [{}, {"softcap": 3.0, "label_smoothing": 0.1, "z_loss": 1e-2, "reduction": "sum"}, {"reduction": "none"}],
)
@pytest.mark.parametrize("shape", list(LOGITS_SHAPES))
def test_cross_entropy_logits_kernel(dtype, kw, shape):
    cp = _cp()
    o = CCEOptions(**kw)
    n, v = shape
    e, c, t, _ = make_problem(n, 24, v, peaked=True, seed=9)
    logits = (e @ c.T).astype(DTYPES[dtype])
    # fp16 gradients of a large vocabulary (~1/V each) fall below fp16's normal range (6e-5) and
    # keep only a few bits; fp16 training scales the loss for this reason, and so does this test.
    grad_loss = 1024.0 if dtype == "float16" else 1.0
    truth = logits_reference(logits, t, o, grad_loss=grad_loss)
    tol = TOL[dtype]
    gx, gt = cp.asarray(logits), cp.asarray(t)
    if cp.cuda.Device().compute_capability == "90" and device.KERNELS == "auto":
        assert cuda_logits.ce_cluster_size(gx) == LOGITS_SHAPES[shape][gx.itemsize], "not the kernel this case is for"
    lse = cp.full(n, cp.nan, cp.float32)
    tgt = cp.full(n, cp.nan, cp.float32)
    cuda_logits.launch_cross_entropy(gx, gt, o, lse, tgt)
    cp.cuda.Device().synchronize()
    assert not cp.isnan(lse).any() and not cp.isnan(tgt).any(), "lse/tgt not fully written"
    assert_rel_close(lse, truth["lse"], tol, "lse")
    assert_rel_close(tgt, truth["tgt"], tol, "tgt")
    assert cp.array_equal(gx, cp.asarray(logits)), "logits changed without row_grad"
    loss = cce.cross_entropy(gx, gt, options=o)
    assert_rel_close(loss, truth["loss"], tol, "loss")
    buf = cp.asarray(logits)
    loss2 = cce.cross_entropy(buf, gt, inplace_backward=True, grad_loss=grad_loss, options=o)
    assert_rel_close(loss2, truth["loss"], tol, "loss(inplace)")
    assert_rel_close(buf, truth["g"], max(tol, 1e-5), "dlogits(inplace)")


@pytest.mark.parametrize("cluster", [1, 2])
@pytest.mark.parametrize("filtered", [False, True])
def test_hopper_cluster_sizes(cluster, filtered, monkeypatch):
    """Each cluster size the autotuner can pick, forced, at a row-block count that is not a multiple
    of it (3 blocks of 128 rows: the last cluster has a block with no rows)."""
    cp = _cp()
    if cp.cuda.Device().compute_capability != "90" or device.KERNELS != "auto":
        pytest.skip("the Hopper kernels run only on compute capability 9.0")
    monkeypatch.setenv("CCE_CUPY_HOPPER_CLUSTER", str(cluster))
    n, d, v = 300, 136, 1000
    e, c, t, _ = make_problem(n, d, v, peaked=True, seed=cluster)
    e, c = e.astype(DTYPES["bfloat16"]), c.astype(DTYPES["bfloat16"])
    o = CCEOptions(filter_eps="auto" if filtered else None)
    ge, gc = cp.asarray(e), cp.asarray(c)
    assert device.use_hopper(ge, gc, ld=d)
    loss, de, dc = cce.linear_cross_entropy_with_grad(ge, gc, cp.asarray(t), options=o)
    # Filtered: the sparse backward's element rule (this data's flat background, 5% of the mass
    # just under eps, is dropped: 1.8e-2 off the exact dE).
    eps = o.resolved_filter_eps(dtype_eps(e.dtype))
    truth = dense_reference(e, c, t, None, o, filter_eps=eps, filter_mode="element")
    assert_rel_close(loss, truth["loss"], TOL["bfloat16"], "loss")
    assert_rel_close(de, truth["de"], TOL["bfloat16"], "dE")
    assert_rel_close(dc, truth["dc"], TOL["bfloat16"], "dC")


def test_dispatch_cupy_uses_launchers(monkeypatch):
    cp = _cp()
    calls = []
    real_fwd, real_bwd = cuda_forward.launch_forward, cuda_backward.launch_backward

    def spy_fwd(*a, **k):
        calls.append("fwd")
        return real_fwd(*a, **k)

    def spy_bwd(*a, **k):
        calls.append("bwd")
        return real_bwd(*a, **k)

    def no_reference(*a, **k):
        raise AssertionError("the NumPy reference ran for CuPy inputs")

    monkeypatch.setattr(cuda_forward, "launch_forward", spy_fwd)
    monkeypatch.setattr(cuda_backward, "launch_backward", spy_bwd)
    monkeypatch.setattr(cce.numpy_backend, "forward", no_reference)
    monkeypatch.setattr(cce.numpy_backend, "backward", no_reference)
    e, c, t, _ = make_problem(10, 8, 20)
    cce.linear_cross_entropy_with_grad(cp.asarray(e), cp.asarray(c), cp.asarray(t))
    assert calls == ["fwd", "bwd"]


def test_torch_through_dlpack():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    e, c, t, b = make_problem(64, 32, 300, bias=True, peaked=True, seed=10)
    te, tc, tt, tb = (torch.from_numpy(x).cuda() for x in (e, c, t, b))
    loss, de, dc, db = cce.linear_cross_entropy_with_grad(te, tc, tt, tb)
    assert isinstance(loss, torch.Tensor) and isinstance(de, torch.Tensor) and de.is_cuda
    truth = dense_reference(e, c, t, b, CCEOptions())
    assert_rel_close(loss.cpu().numpy(), truth["loss"], 1e-5, "loss")
    assert_rel_close(de.cpu().numpy(), truth["de"], 1e-5, "de")
    assert_rel_close(dc.cpu().numpy(), truth["dc"], 1e-5, "dc")
    # bf16 torch tensors and in-place logits gradient through the DLPack view
    tl = torch.from_numpy((e @ c.T).astype(np.float32)).cuda().to(torch.bfloat16)
    logits = tl.float().cpu().numpy()  # before the call overwrites tl with the gradient
    loss = cce.cross_entropy(tl, tt, inplace_backward=True)
    ref = dense_reference(logits, np.eye(300), t, None, CCEOptions())
    assert_rel_close(loss.cpu().numpy(), ref["loss"], 1e-2, "loss(bf16 torch)")
    assert_rel_close(tl.float().cpu().numpy(), ref["g"], 1e-2, "dlogits(bf16 torch, in place)")
    with pytest.raises(TypeError, match="one kind"):
        cce.linear_cross_entropy(te, torch.from_numpy(c), tt)


@pytest.mark.parametrize("kernels", ["auto", "sm80"])
def test_tiled_filter_keeps_z_loss_and_grad_lse(kernels, monkeypatch):
    """Issue 18.2: the tiled filtered backward must not drop a confident row's z-loss / grad_lse
    term (g = cq (p - onehot) + (cp - cq) p is ~2 z_loss lse at the target, where p ~ 1)."""
    cp = _cp()
    monkeypatch.setattr(plan, "SPARSE_LIST_BYTES", 0)  # no slots: the tiled filtered backward
    monkeypatch.setattr(device, "KERNELS", kernels)
    e = np.zeros((4, 16), np.float32)
    e[:, 3] = 20.0
    bf = DTYPES["bfloat16"]
    e, c, t = e.astype(bf), np.eye(16, dtype=np.float32).astype(bf), np.full(4, 3)
    o = CCEOptions(z_loss=1e-4, reduction="sum", grad_dtype="float32")
    ge, gc, gt = cp.asarray(e), cp.asarray(c), cp.asarray(t)
    exact = cce.linear_cross_entropy_with_grad(ge, gc, gt, options=o)[1]
    filtered = cce.linear_cross_entropy_with_grad(ge, gc, gt, options=o.replace(filter_eps="auto"))[1]
    assert float(cp.abs(exact).max()) > 3e-3
    assert_rel_close(filtered, exact, 1e-2, "de(filtered, z_loss)")
    lse, _ = cce.forward(ge, gc, gt)
    de = cce.backward(ge, gc, gt, lse, 0.0, grad_lse=cp.ones(4, cp.float32),
                      options=CCEOptions(reduction="sum", grad_dtype="float32", filter_eps="auto"))[0]
    assert_rel_close(de, np.eye(16)[[3] * 4], 1e-2, "de(grad_lse, filtered)")
    # A larger peaked problem with z_loss against the float64 tile rule (and the NumPy backend).
    o = CCEOptions(z_loss=1e-2, filter_eps=1e-3)
    e, c, t, _ = make_problem(300, 136, 1000, "bfloat16", peaked=True, seed=11)
    out = _run_launchers(e, c, t, None, o, 1.0)
    ref = dense_reference(e, c, t, None, o, filter_eps=1e-3)
    for name in ("de", "dc"):
        assert_rel_close(out[name], ref[name], TOL["bfloat16"], name)
