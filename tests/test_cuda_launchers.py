"""CUDA launchers (cce_cupy.cuda forward/backward) against the float64 reference, deterministic
bitwise runs, the Hopper cluster sizes, the tiled filter's z-loss. Run on a GPU: pytest -m gpu -q -rs."""

from __future__ import annotations

import numpy as np
import pytest
from _gpu_helpers import TOL, _assert_no_nan, _cp, _run_launchers
from conftest import DTYPES, assert_rel_close, dense_reference, make_problem, to_f64

import cce_cupy as cce
from cce_cupy.cuda import device
from cce_cupy.options import CCEOptions

pytestmark = pytest.mark.gpu


OPTION_CASES = {
    "default": {},
    "softcap": {"softcap": 2.5},
    "smooth_zloss_none": {"label_smoothing": 0.1, "z_loss": 1e-2, "reduction": "none"},
    "grad_fp32_sum": {"grad_dtype": "float32", "reduction": "sum"},
    "ignore_index": {"ignore_index": 3},
    # each option alone (softcap and ignore_index above; bias: the with_bias parameter)
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
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
def test_deterministic_bitwise(dtype):
    cp = _cp()
    e, c, t, b = make_problem(300, 72, 2000, dtype, bias=True, peaked=True, seed=7)
    o = CCEOptions(deterministic=True)
    args = (cp.asarray(e), cp.asarray(c), cp.asarray(t), cp.asarray(b))
    r1 = cce.linear_cross_entropy_with_grad(*args, options=o)
    r2 = cce.linear_cross_entropy_with_grad(*args, options=o)
    for name, a, bb in zip(("loss", "de", "dc", "db"), r1, r2):
        assert cp.asnumpy(a).tobytes() == cp.asnumpy(bb).tobytes(), f"{name} differs between two runs"


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
    # Filtered: this data's flat background (5% of the mass just under eps) leaves no row
    # certifiable, so every row takes the exact path (gathered: another cluster-size launch).
    truth = dense_reference(e, c, t, None, CCEOptions())
    assert_rel_close(loss, truth["loss"], TOL["bfloat16"], "loss")
    assert_rel_close(de, truth["de"], TOL["bfloat16"], "dE")
    assert_rel_close(dc, truth["dc"], TOL["bfloat16"], "dC")
