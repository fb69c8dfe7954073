"""Certified filtering on the CPU: the options, the certificate's bound row by row against float64
on peaked, uniform and long-tailed (Zipf) rows, and the NumPy backend following the same rule as
the CUDA sparse backward (docs/design.md, "Certified filtering")."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    assert_rel_close,
    certificate_model,
    dense_reference,
    make_problem,
    make_sharp_problem,
    make_zipf_problem,
    to_f64,
)

import cce_cupy as cce
from cce_cupy import numpy_backend
from cce_cupy.options import DEFAULT_FILTER_TOL, CCEOptions, certificate_margin, row_coefficients

# fp32 arithmetic (logits, exp, the gradient) against float64: relative to a row's L1 norm, plus
# the fp32 lse's rounding (~|lse| 2**-24 a few times), which moves every p_ij by that relative
# amount: at most |coef_p| (1 + |lse|) 2**-21 in L1 (cancellation makes g_t = p_t - 1 feel it).
FP32_SLACK = 1e-5


def _fp32_slack(ref, norm1):
    lse = np.abs(np.asarray(ref["lse"]).reshape(-1))
    return FP32_SLACK * norm1 + np.abs(ref["coef_p"]) * (1.0 + np.where(np.isfinite(lse), lse, 0.0)) * 2.0**-21


def _data(kind, dtype="float32", n=256, d=64, v=4096, seed=0):
    if kind == "sharp":
        e, c, t = make_sharp_problem(n, max(d, 256), v, dtype, seed=seed)
        return e, c, t, None
    if kind == "zipf":
        e, c, t = make_zipf_problem(n, d, v, dtype, seed=seed)
        return e, c, t, None
    return make_problem(n, d, v, dtype, peaked=(kind == "peaked"), seed=seed, ignore_frac=0.1)


# ------------------------------------------------------------------------------ options
def test_filter_tol_option_rules():
    o = CCEOptions(filter_eps="auto")
    assert o.resolved_filter_tol() == DEFAULT_FILTER_TOL == 2.0**-8
    assert o.resolved_filter_eps() == 2.0**-12
    o = CCEOptions(filter_eps="auto", filter_tol=2.0**-6)
    assert o.resolved_filter_tol() == 2.0**-6 and o.resolved_filter_eps() == 2.0**-10
    o = CCEOptions(filter_eps=1e-3, filter_tol=np.float32(0.125))
    assert o.resolved_filter_eps() == 1e-3 and o.filter_tol == 0.125 and type(o.filter_tol) is float
    assert CCEOptions().resolved_filter_tol() is None and CCEOptions().resolved_filter_eps() is None
    # smoothing no longer excludes filtering: its constant is kept exactly or counted in the bound
    assert CCEOptions(filter_eps="auto", label_smoothing=0.1).label_smoothing == 0.1


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 2.0, float("nan"), float("inf"), "auto", True])
def test_filter_tol_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="filter_tol must be None or a float in \\(0, 1\\)"):
        CCEOptions(filter_eps="auto", filter_tol=bad)


def test_filter_tol_needs_filter_eps():
    with pytest.raises(ValueError, match="filter_tol applies only to a filtered backward: pass filter_eps"):
        CCEOptions(filter_tol=0.01)
    with pytest.raises(ValueError, match="filter_tol"):
        cce.linear_cross_entropy_with_grad(*make_problem(4, 8, 16)[:3], filter_tol=0.01)


# ----------------------------------------------------- the bound, row by row (NumPy model)
CASES = {
    "plain": {},
    "z_loss_none": {"z_loss": 1e-3, "reduction": "none"},
    "smoothing": {"label_smoothing": 0.1},
    "softcap": {"softcap": 30.0},
    "softcap_smoothing": {"softcap": 30.0, "label_smoothing": 0.1},
    "tol_2^-6": {"filter_tol": 2.0**-6},
}


def _numpy_filtered_logit_grad(e, c, t, b, o, grad_loss):
    """The NumPy backend's filtered logit gradient (fp32), all V columns as one block, and its
    certified rows."""
    lse, _ = numpy_backend.forward(e, c, t, b, o)
    cp, cq = row_coefficients(np, o, t != o.ignore_index, lse, np.asarray(grad_loss, np.float32))
    cp, cq = np.broadcast_to(cp, t.shape), np.broadcast_to(cq, t.shape)
    v = c.shape[0]
    z = numpy_backend._raw_logits(e.astype(np.float32), c, b, 0, v, np.dtype(np.float32))
    g, p, onehot = numpy_backend._grad_block(z, t, lse, cp, cq, o, 0, v)
    cert = numpy_backend.RowCertificate(len(t), o.resolved_filter_eps(), np.float32)
    cert.add(g, p, onehot)
    certified = cert.certified(cp, cq, o, v, o.resolved_filter_tol())
    return numpy_backend.filtered_grad_block(g, p, onehot, cq, o, v, cert, certified), certified


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("data", ["sharp", "peaked", "uniform", "zipf"])
def test_certified_rows_within_tol_of_float64(data, case):
    """Every row of the NumPy model's filtered logit gradient: ||g~_i - g_i||_1 <= tol ||g_i||_1
    against float64 (certified rows), and exact (fp32) for the others."""
    kw = dict(CASES[case])
    o = CCEOptions(filter_eps="auto", **kw)
    e, c, t, b = _data(data)
    grad_loss = np.random.default_rng(1).uniform(0.5, 2.0, len(t)) if o.reduction == "none" else 1.0
    gf, certified = _numpy_filtered_logit_grad(e, c, t, b, o, grad_loss)
    ref = dense_reference(e, c, t, b, o.replace(filter_eps=None, filter_tol=None), grad_loss)
    g64 = ref["g"]
    err = np.abs(gf.astype(np.float64) - g64).sum(1)
    norm1 = np.abs(g64).sum(1)
    tol = o.resolved_filter_tol()
    limit = np.where(certified, tol * (1 + certificate_margin(c.shape[0])), 0.0) * norm1 + _fp32_slack(ref, norm1)
    bad = np.flatnonzero(err > limit)
    assert bad.size == 0, (
        f"{bad.size} rows over the certificate; row {bad[0]}: err {err[bad[0]]:.3e} > {limit[bad[0]]:.3e} "
        f"(certified {certified[bad[0]]}, ||g||_1 {norm1[bad[0]]:.3e})"
    )
    # The float64 model (conftest) decides the same rows, borderline ones aside.
    model = certificate_model(ref, o, c.shape[0])
    assert (model["certified"] != certified).mean() <= 0.01
    if data == "zipf":  # ~37% of each row's mass is below eps: no row can be certified
        assert not certified.any()
    if data == "sharp" and case != "softcap_smoothing":
        assert certified.mean() > 0.9, f"only {certified.mean():.2f} of sharp rows certified"
    if case == "softcap_smoothing":  # |coef_q| ls (V - |K|) / V alone exceeds tol ||g||_1
        assert not certified[t != o.ignore_index].any()


@pytest.mark.parametrize("data", ["sharp", "zipf", "peaked"])
def test_numpy_backward_meets_certificate_and_counts_rows(data):
    """The NumPy backend (bf16 inputs, blocked, two passes) against float64: per-row dE error
    <= tol ||g_i||_1 max_j ||C_j|| plus bf16 rounding of the output, dC within the sum of the rows'
    bounds; its certified fraction is the float64 model's."""
    o = CCEOptions(filter_eps="auto")
    e, c, t, b = _data(data, "bfloat16", n=300, v=3000)
    lse, _ = numpy_backend.forward(e, c, t, b, o)
    cp, cq = row_coefficients(np, o, t != o.ignore_index, lse, np.float32(1.0))
    stats = {}
    de, dc, _ = numpy_backend.backward(e, c, t, b, o.replace(grad_dtype="float32"), lse, cp, cq, stats=stats)
    ref = dense_reference(e, c, t, b, CCEOptions())
    model = certificate_model(ref, o, c.shape[0])
    tol = o.resolved_filter_tol() * (1 + certificate_margin(c.shape[0]))
    c64, e64 = to_f64(c), to_f64(e)
    cmax = np.linalg.norm(c64, axis=1).max()
    row_err = np.linalg.norm(de - ref["de"], axis=1)
    limit = tol * model["norm1"] * cmax + _fp32_slack(ref, model["norm1"]) * cmax
    assert np.all(row_err <= limit), f"worst row excess {np.max(row_err - limit):.3e}"
    dc_limit = tol * np.sum(model["norm1"] * np.linalg.norm(e64, axis=1)) + FP32_SLACK * np.linalg.norm(ref["dc"])
    assert np.linalg.norm(dc - ref["dc"]) <= dc_limit
    frac = stats["certified_rows"] / stats["rows"]
    active = (ref["coef_p"] != 0) | (ref["coef_q"] != 0)
    assert stats["rows"] == active.sum()
    assert abs(frac - model["certified"][active].mean()) <= 0.02
    if data == "zipf":
        assert frac == 0.0
    if data == "sharp":
        assert frac > 0.9


def test_analytic_smoothing_matches_float64_model():
    """Smoothing without softcap: certified rows keep -coef_q ls / V on their dropped columns, so the
    NumPy backend equals the float64 model's filtered gradient (fp32 accuracy), with bias."""
    o = CCEOptions(filter_eps="auto", label_smoothing=0.1)
    e, c, t = make_sharp_problem(200, 256, 2000, seed=3)
    b = (0.1 * np.random.default_rng(4).standard_normal(2000)).astype(np.float32)
    _, de, dc, db = cce.linear_cross_entropy_with_grad(e, c, t, b, options=o)
    ref = dense_reference(e, c, t, b, CCEOptions(label_smoothing=0.1))
    model = certificate_model(ref, o, 2000)
    assert model["certified"].mean() > 0.9
    gf = model["g_filtered"]
    assert_rel_close(de, gf @ to_f64(c), 1e-5, "de")
    assert_rel_close(dc, gf.T @ to_f64(e), 1e-5, "dc")
    assert_rel_close(db, gf.sum(0), 1e-5, "db")
    # and the filtered gradient differs from the exact one by the dropped p only, not by ls / V
    assert np.abs(gf - ref["g"]).sum() <= o.resolved_filter_tol() * np.abs(ref["g"]).sum()


def test_confident_rows_keep_z_loss_gradient():
    """bf16, N=4, V=16, target logit 20, z_loss=1e-4 (the issue's case): the target (always kept)
    carries 2 z_loss lse ~ 4e-3 a row; filtered equals exact."""
    e = np.zeros((4, 16), np.float32)
    e[:, 3] = 20.0
    import ml_dtypes

    bf = ml_dtypes.bfloat16
    e, c, t = e.astype(bf), np.eye(16, dtype=np.float32).astype(bf), np.full(4, 3)
    o = CCEOptions(z_loss=1e-4, reduction="sum", grad_dtype="float32")
    exact = cce.linear_cross_entropy_with_grad(e, c, t, options=o)[1]
    filtered = cce.linear_cross_entropy_with_grad(e, c, t, options=o.replace(filter_eps="auto"))[1]
    assert np.abs(exact).max() > 3e-3
    assert_rel_close(filtered, exact, 1e-5, "de(filtered, z_loss)")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_api_stats_count_certified_rows(reduction):
    """linear_cross_entropy_with_grad(stats=...) reports the NumPy backend's own counts: sharp rows
    certified, a third of the rows made flat (uncertified), a fifth ignored (not counted); an exact
    call certifies none."""
    e, c, t = make_sharp_problem(300, 256, 3000, "bfloat16")
    rng = np.random.default_rng(1)
    e[::3] = (0.3 * rng.standard_normal((100, 256))).astype(e.dtype)  # flat rows: ~all mass below eps
    t[rng.random(300) < 0.2] = -100
    o = CCEOptions(filter_eps="auto", reduction=reduction)
    lse, _ = numpy_backend.forward(e, c, t, None, o)
    cp, cq = row_coefficients(np, o, t != -100, lse, np.float32(1.0))
    direct = {}
    want = numpy_backend.backward(e, c, t, None, o, lse, cp, cq, stats=direct)
    stats = {"rows": -1}
    loss, de, dc = cce.linear_cross_entropy_with_grad(e, c, t, stats=stats, options=o)
    assert stats == {"rows": int((t != -100).sum()), "certified_rows": direct["certified_rows"]}
    assert 0 < stats["certified_rows"] < stats["rows"]  # both kinds of rows are there
    assert stats["certified_rows"] <= ((t != -100) & (np.arange(300) % 3 != 0)).sum()  # flat rows never
    np.testing.assert_array_equal(to_f64(de), to_f64(want[0]))
    np.testing.assert_array_equal(to_f64(dc), to_f64(want[1]))
    exact = {}
    cce.linear_cross_entropy_with_grad(e, c, t, stats=exact, reduction=reduction)
    assert exact == {"rows": stats["rows"], "certified_rows": 0}
