"""The NumPy backend (cce_cupy.numpy_backend through the public API) against a dense float64 reference."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from conftest import assert_rel_close, dense_reference, logits_reference, make_problem

import cce_cupy as cce
from cce_cupy import numpy_backend
from cce_cupy.options import CCEOptions

OPTION_CASES = {
    "default": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "softcap": {"softcap": 2.5},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "ignore_index": {"ignore_index": 3},
    "all": {
        "reduction": "none",
        "softcap": 2.5,
        "label_smoothing": 0.1,
        "z_loss": 1e-2,
        "shift": True,
        "return_lse": True,
        "return_z_loss": True,
    },
}
FP32_TOL = 2e-5


def _check_all(e, c, t, b, opts: CCEOptions, tol, grad_loss=1.0):
    out = cce.linear_cross_entropy_with_grad(e, c, t, b, grad_loss=grad_loss, options=opts)
    ref = dense_reference(e, c, t, b, opts, grad_loss=grad_loss)
    loss, de, dc = out[:3]
    k = 3
    if b is not None:
        assert_rel_close(out[3], ref["db"], tol, "dbias")
        k = 4
    assert_rel_close(loss, ref["loss"], tol, "loss")
    assert_rel_close(de, ref["de"], tol, "de")
    assert_rel_close(dc, ref["dc"], tol, "dc")
    if opts.return_lse:
        assert_rel_close(out[k], ref["lse"], tol, "lse")
        k += 1
    if opts.return_z_loss:
        assert_rel_close(out[k], ref["z_loss"], tol, "z_loss")
        k += 1
    assert len(out) == k
    gdt = np.float32 if opts.grad_dtype == "float32" else e.dtype
    assert de.dtype == gdt and dc.dtype == gdt and de.shape == e.shape and dc.shape == c.shape
    return out, ref


@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("shape", [(7, 13, 129), (252, 123, 507)])
def test_options_fp32(case, shape):
    n, d, v = shape
    opts = CCEOptions(**OPTION_CASES[case])
    bias = case in ("all", "default")
    e, c, t, b = make_problem(n, d, v, peaked=(n % 2 == 0), bias=bias, seed=n + v)
    if opts.ignore_index != -100:
        t = np.where(t == -100, opts.ignore_index, t)
    grad_loss = np.random.default_rng(1).random(n).astype(np.float32) if opts.reduction == "none" else 0.7
    _check_all(e, c, t, b, opts, FP32_TOL, grad_loss)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_against_float64(dtype):
    e, c, t, b = make_problem(130, 40, 300, dtype, peaked=True, bias=True, seed=3)
    # the NumPy backend upcasts 16-bit blocks to fp32: close to the float64 truth of the same inputs
    _check_all(e, c, t, b, CCEOptions(softcap=5.0, z_loss=1e-3, grad_dtype="float32"), FP32_TOL)
    # gradients in the input dtype: only their final rounding differs
    _check_all(e, c, t, b, CCEOptions(softcap=5.0, z_loss=1e-3), 1e-2)


def test_float64_reference_functions():
    e, c, t, b = make_problem(50, 9, 260, "float64", bias=True, peaked=True, seed=4)
    o = CCEOptions(softcap=3.0, label_smoothing=0.05, z_loss=1e-2)
    lse, tgt = numpy_backend.forward(e, c, t, b, o)
    ref = dense_reference(e, c, t, b, o)
    assert lse.dtype == np.float64
    assert_rel_close(lse, ref["lse"], 1e-13, "lse")
    assert_rel_close(tgt, ref["tgt"], 1e-13, "tgt")
    valid = t != o.ignore_index
    cnt = valid.sum()
    g = valid / cnt
    de, dc, db = numpy_backend.backward(e, c, t, b, o, lse, g * (1 + 2 * o.z_loss * lse), g)
    assert_rel_close(de, ref["de"], 1e-12, "de")
    assert_rel_close(dc, ref["dc"], 1e-12, "dc")
    assert_rel_close(db, ref["db"], 1e-12, "db")


def test_finite_differences_float64():
    """The analytic backward matches central differences of the forward (float64, every option)."""
    e, c, t, b = make_problem(5, 4, 7, "float64", bias=True, seed=5, ignore_frac=0.3)
    t[0] = 2
    o = CCEOptions(softcap=2.0, label_smoothing=0.1, z_loss=0.05)
    valid = t != o.ignore_index

    def loss(e_, c_, b_):
        lse, tgt = numpy_backend.forward(e_, c_, t, b_, o)
        return float(np.sum(np.where(valid, lse - tgt + o.z_loss * lse**2, 0.0)) / valid.sum())

    lse, _ = numpy_backend.forward(e, c, t, b, o)
    g = valid / valid.sum()
    de, dc, db = numpy_backend.backward(e, c, t, b, o, lse, g * (1 + 2 * o.z_loss * lse), g)
    h = 1e-6
    for arr, grad, name in ((e, de, "de"), (c, dc, "dc"), (b, db, "dbias")):
        fd = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + h
            up = loss(e, c, b)
            arr[idx] = old - h
            dn = loss(e, c, b)
            arr[idx] = old
            fd[idx] = (up - dn) / (2 * h)
        assert_rel_close(grad, fd, 1e-7, name)


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_odd_sizes_and_index_dtypes(idx_dtype):
    for n, d, v in [(1, 5, 1), (1, 3, 2), (3, 7, 1), (129, 5, 130)]:
        e, c, t, b = make_problem(n, d, v, idx_dtype=idx_dtype, bias=True, ignore_frac=0.0, seed=n)
        out, _ = _check_all(e, c, t, b, CCEOptions(), FP32_TOL)
        if v == 1:  # one class: the loss is 0 and so are the gradients (up to fp32 rounding)
            assert abs(float(out[0])) < 1e-6 and np.abs(out[1]).max() < 1e-5 and np.abs(out[2]).max() < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_n_zero(reduction):
    e, c, t, b = make_problem(0, 8, 10, bias=True)
    out = cce.linear_cross_entropy_with_grad(e, c, t, b, reduction=reduction)
    loss, de, dc, db = out
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert float(loss) == 0.0
    assert de.shape == (0, 8) and not np.any(dc) and not np.any(db) and dc.shape == (10, 8)
    lse, tgt = cce.forward(e, c, t)
    assert lse.shape == (0,) and tgt.shape == (0,)


def test_all_ignored_mean_is_zero():
    e, c, t, _ = make_problem(6, 8, 10, ignore_frac=1.0)
    loss, de, dc = cce.linear_cross_entropy_with_grad(e, c, t)
    assert float(loss) == 0.0 and not np.any(de) and not np.any(dc)


def test_batch_dims_and_shift():
    e, c, t, b = make_problem(24, 16, 70, batch_shape=(2, 3, 4), peaked=True, bias=True, seed=8)
    for shift in (False, True):
        opts = CCEOptions(shift=shift, reduction="none", return_lse=True)
        out, ref = _check_all(e, c, t, b, opts, FP32_TOL, grad_loss=np.ones((2, 3, 4), np.float32))
        assert out[0].shape == (2, 3, 4) and out[1].shape == e.shape and out[-1].shape == (2, 3, 4)
        if shift:  # the last position of each sequence predicts nothing
            assert not np.any(out[0][..., -1]) and not np.any(out[1][..., -1, :])
    # shift == scoring against targets moved by one, by hand
    ts = np.concatenate([t[..., 1:], np.full((2, 3, 1), -100)], axis=-1)
    a = cce.linear_cross_entropy(e, c, t, shift=True)
    bb = cce.linear_cross_entropy(e, c, ts)
    assert a == bb


def test_forward_backward_primitives_match_with_grad():
    e, c, t, b = make_problem(40, 12, 90, bias=True, seed=9)
    o = CCEOptions(z_loss=1e-2, reduction="sum")
    lse, tgt = cce.forward(e, c, t, b, options=o)
    ref = dense_reference(e, c, t, b, o)
    assert_rel_close(lse, ref["lse"], FP32_TOL, "lse")
    assert_rel_close(tgt, ref["tgt"], FP32_TOL, "tgt")
    de, dc, db = cce.backward(e, c, t, lse, 2.0, b, options=o)
    ref2 = dense_reference(e, c, t, b, o, grad_loss=2.0)
    assert_rel_close(de, ref2["de"], FP32_TOL, "de")
    assert_rel_close(dc, ref2["dc"], FP32_TOL, "dc")
    # grad_lse adds softmax * dlse
    gl = np.random.default_rng(0).standard_normal(40).astype(np.float32)
    de, dc, _ = cce.backward(e, c, t, lse, 2.0, b, grad_lse=gl, options=o)
    ref3 = dense_reference(e, c, t, b, o, grad_loss=2.0, grad_lse=gl)
    assert_rel_close(de, ref3["de"], FP32_TOL, "de(grad_lse)")
    assert_rel_close(dc, ref3["dc"], FP32_TOL, "dc(grad_lse)")


def test_cross_entropy_logits_and_inplace():
    e, c, t, _ = make_problem(60, 10, 77, peaked=True, seed=10)
    logits = (e @ c.T).astype(np.float32)
    for kw in ({}, {"softcap": 3.0, "label_smoothing": 0.1, "z_loss": 1e-2, "reduction": "sum"}):
        o = CCEOptions(**kw)
        # the dense reference of logits: e = logits, c = identity
        ref = dense_reference(logits, np.eye(77), t, None, o)
        loss = cce.cross_entropy(logits, t, options=o)
        assert_rel_close(loss, ref["loss"], FP32_TOL, "loss")
        buf = logits.copy()
        loss2 = cce.cross_entropy(buf, t, inplace_backward=True, options=o)
        assert_rel_close(loss2, ref["loss"], FP32_TOL, "loss(inplace)")
        assert_rel_close(buf, ref["g"], FP32_TOL, "dlogits(inplace)")


def test_never_allocates_n_by_v(monkeypatch):
    n, d, v = 512, 8, 4096  # N x V fp32 = 8 MiB
    for nn, vv in [(8192, 256000), (1, 10**6), (10**6, 1), (300, 50)]:
        rows, cols = numpy_backend.block_shape(nn, vv)
        assert rows * cols * 4 <= numpy_backend.BLOCK_BYTES, (nn, vv, rows, cols)
        assert rows % 128 == 0 or rows == nn
        assert cols % 128 == 0 or cols == vv
    monkeypatch.setattr(numpy_backend, "BLOCK_BYTES", 256 << 10)
    e, c, t, b = make_problem(n, d, v, bias=True)
    o = CCEOptions(label_smoothing=0.1)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        loss, de, dc, db = cce.linear_cross_entropy_with_grad(e, c, t, b, options=o)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    nv = n * v * 4
    assert peak < nv / 2, f"peak {peak} bytes >= half of N x V ({nv} bytes)"
    ref = dense_reference(e, c, t, b, o)
    assert_rel_close(de, ref["de"], FP32_TOL, "de")
    assert_rel_close(dc, ref["dc"], FP32_TOL, "dc")


def test_filtering_blocked_matches_certificate_model(monkeypatch):
    """The certified filter over many 128 x 128 blocks (a row's certificate spans all its column
    blocks: two passes) equals the float64 model's filtered gradient (conftest.certificate_model)."""
    from conftest import certificate_model, make_sharp_problem

    monkeypatch.setattr(numpy_backend, "BLOCK_BYTES", 2 * 128 * 128 * 4)
    n, d, v = 300, 256, 700
    e, c, t = make_sharp_problem(n, d, v, seed=11)
    t[::7] = -100
    e[:60] = np.random.default_rng(2).standard_normal((60, d)).astype(np.float32)  # flat rows: uncertified
    o = CCEOptions(filter_eps="auto")
    lse, _ = numpy_backend.forward(e, c, t, None, o)
    valid = t != o.ignore_index
    g = (valid / valid.sum()).astype(np.float32)
    stats = {}
    de, dc, _ = numpy_backend.backward(e, c, t, None, o, lse, g, g, stats=stats)
    ref = dense_reference(e, c, t, None, CCEOptions())
    model = certificate_model(ref, o, v)
    assert stats["rows"] == valid.sum() and stats["certified_rows"] == model["certified"][valid].sum()
    assert 0 < stats["certified_rows"] < stats["rows"]  # both paths run
    gf = model["g_filtered"]
    assert_rel_close(de, gf @ c.astype(np.float64), FP32_TOL, "de(filtered)")
    assert_rel_close(dc, gf.T @ e.astype(np.float64), FP32_TOL, "dc(filtered)")


def test_softcap_gradient_where_tanh_saturates():
    """Logits far into the softcap's flat part (target z/s ~ 7): 1 - (y/s)^2 in fp32 loses most of
    the target's gradient there (dC off by 1.2e-5, the in-place gradient by 1.3e-5); the backend
    uses 4u/(1+u)^2, u = exp(-2|z/s|), like the kernels."""
    n, d, v = 64, 32, 4096
    e, c, t, _ = make_problem(n, d, v, peaked=True, seed=3)
    e, c = (e * 2).astype(np.float32), c.astype(np.float32)
    o = CCEOptions(softcap=3.0)
    truth = dense_reference(e, c, t, None, o)
    assert np.median(np.abs(e.astype(np.float64) @ c.astype(np.float64).T)[np.arange(n), t]) / 3 > 6
    loss, de, dc = cce.linear_cross_entropy_with_grad(e, c, t, options=o)
    for name, ours in (("loss", loss), ("dE", de), ("dC", dc)):
        assert_rel_close(ours, truth[name.lower()], 1e-5, name)
    logits = (e.astype(np.float64) @ c.astype(np.float64).T).astype(np.float32)
    buf = logits.copy()
    cce.cross_entropy(buf, t, inplace_backward=True, options=o)
    assert_rel_close(buf, logits_reference(logits, t, o)["g"], 1e-5, "dlogits")
