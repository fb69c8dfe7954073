"""The certificate study (benchmarks/dev/certificate_study.py) on tiny problems: only what the
certificate guarantees mathematically (docs/design.md, "Certified filtering")."""

from __future__ import annotations

import pytest
from conftest import make_lm_like_problem, make_problem, make_sharp_problem, make_zipf_problem

from benchmarks.dev.certificate_study import STATEMENTS, study

# float64 sums of a few thousand terms, against a bound that holds exactly in real arithmetic.
ROUNDING = 1e-12
TOLS = (2.0**-8, 2.0**-4, 0.5)  # 0.5 so that every data set certifies something


def _data(kind):
    n, d, v = 300, 256, 2048  # 300 rows: two full 128-row blocks and a partial one
    if kind == "sharp":
        return make_sharp_problem(n, d, v, "float64", seed=1)
    if kind == "zipf":
        return make_zipf_problem(n, d, v, "float64", target_s=1.6, seed=1)
    if kind == "lm_like":
        return make_lm_like_problem(n, d, v, "float64", seed=1)
    e, c, t, _ = make_problem(n, d, v, "float64", peaked=(kind == "peaked"), ignore_frac=0.0, seed=1)
    return e, c, t


@pytest.fixture(scope="module", params=["sharp", "peaked", "uniform", "zipf", "lm_like"])
def result(request):
    return study(*_data(request.param), eps_list=(2.0**-8, 2.0**-12), tols=TOLS, block_rows=128)


def test_every_certified_unit_meets_its_bound(result):
    for r in result["results"]:
        for u in r["units"]:
            # dropped L1 (measured) <= bound (|coef_p| dropped mass) <= tol kept L1 <= tol ||g||_1
            assert u["dropped_l1"] <= u["bound"] * (1 + ROUNDING) + 1e-300
            assert u["bound"] <= r["tol"] * u["lower"] * (1 + ROUNDING)
            assert u["lower"] <= u["norm1"] * (1 + ROUNDING)


def test_errors_respect_the_gradient_bounds(result):
    for r in result["results"]:
        assert r["g_l1_err"] <= r["tol"] * (1 + ROUNDING)  # each certified unit keeps its L1 bound
        assert r["de_err_abs"] <= r["de_bound_abs"] * (1 + ROUNDING) + 1e-300
        assert r["dc_err_abs"] <= r["dc_bound_abs"] * (1 + ROUNDING) + 1e-300
        if r["certified_rows"] == 0:
            assert r["de_err"] == r["dc_err"] == r["g_l1_err"] == 0.0 and r["work"] == 1.0


def test_aggregates_certify_what_their_rows_certify(result):
    """Sums of per-row inequalities hold: a block whose rows are all certified is certified, and
    the whole gradient is certified when every row (or every block) is."""
    by = {(r["eps"], r["tol"], r["statement"]): r for r in result["results"]}
    for eps, tol, _ in by:
        row, block, whole = (by[eps, tol, s] for s in STATEMENTS)
        if row["certified_units"] == 1.0:
            assert block["certified_units"] == 1.0
        if block["certified_units"] == 1.0:
            assert whole["certified_units"] == 1.0
        # A larger tol certifies a superset of rows and blocks.
        for larger in TOLS:
            if larger > tol:
                for s in STATEMENTS:
                    assert by[eps, larger, s]["certified_rows"] >= by[eps, tol, s]["certified_rows"]


def test_work_fraction_counts_kept_entries():
    e, c, t = make_sharp_problem(128, 256, 1024, "float64", seed=2)
    res = study(e, c, t, eps_list=(2.0**-8,), tols=(0.5,), block_rows=128)
    for r in res["results"]:
        assert r["certified_rows"] == 1.0  # the sharp rows drop almost nothing
        assert r["work"] == pytest.approx(res["kept"][2.0**-8]["mean"] / 1024)
