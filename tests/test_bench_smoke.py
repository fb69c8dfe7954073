"""The benchmark's default settings run on the NumPy backend (CPU, tiny shape) and write
records in the format later issues read. No torch, no GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# The results format of issue 2, written out here on purpose (not imported from bench.py): later
# tools read it, so a change to bench.RECORD_KEYS must fail this test.
KEYS = {
    "gpu",
    "date",
    "versions",
    "shape",
    "N",
    "D",
    "V",
    "dtype",
    "data",
    "provider",
    "mode",
    "filter",
    "ms",
    "extra_mib",
    "rel_err_loss",
    "rel_err_de",
    "rel_err_dc",
    "note",
    "memory_budget",
    "certified_fraction",
}

pytest.importorskip("ml_dtypes")


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_under_test", ROOT / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_smoke_writes_every_key(tmp_path, monkeypatch):
    monkeypatch.delenv("CCE_TRAINED_LM", raising=False)  # the default data sets, without a states file
    bench = _bench()
    path = bench.main(["--cpu-smoke", "--out", str(tmp_path)])
    assert path.name.endswith("-cpu-smoke.json")
    assert path.with_suffix(".md").exists()
    records = json.loads(path.read_text())
    assert records
    for r in records:
        assert set(r) == KEYS, sorted(set(r) ^ KEYS)
        assert r["mode"] in ("fwd", "bwd", "fwd_bwd", "gemm_fwd", "gemm_bwd_sum")
        assert r["data"] in ("uniform", "peaked", "long_tailed")
        assert isinstance(r["filter"], bool) and isinstance(r["versions"], dict)
        assert r["ms"] is None or r["ms"] >= 0
    seen = {(r["data"], r["provider"], r["mode"], r["filter"]) for r in records if r["ms"] is not None}
    for data in ("uniform", "peaked", "long_tailed"):
        assert (data, "cublas", "gemm_fwd", False) in seen
        assert (data, "cublas", "gemm_bwd_sum", False) in seen
        for prov, flt in (("ours", False), ("ours_deterministic", False), ("ours", True)):
            for mode in ("fwd", "bwd", "fwd_bwd"):
                assert (data, prov, mode, flt) in seen, (data, prov, mode, flt)
    # ours on the NumPy backend is exact up to bf16 output rounding
    for r in records:
        if r["provider"].startswith("ours") and r["mode"] == "fwd_bwd":
            assert r["rel_err_loss"] < 1e-4 and r["rel_err_de"] < 1e-2 and r["rel_err_dc"] < 1e-2, r
        # the certified fraction on ours' filtered gradient records only
        has_fraction = r["provider"] == "ours" and r["filter"] and r["mode"] in ("bwd", "fwd_bwd")
        assert (r["certified_fraction"] is not None) == has_fraction, r
        if has_fraction:
            assert 0.0 <= r["certified_fraction"] <= 1.0
    md = path.with_suffix(".md").read_text()
    assert "| certified |" in md


def _states(path, n=40, d=16, v=300, seed=0):
    """A small states file in the format of examples/train_lm.py --save-states (bf16 as uint16)."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    e = (2.0 * rng.standard_normal((n, d))).astype(ml_dtypes.bfloat16)
    c = rng.standard_normal((v, d)).astype(ml_dtypes.bfloat16)
    t = rng.integers(0, v, n).astype(np.int32)
    meta = {"n": n, "d": d, "v": v, "steps": 3}
    np.savez(path, e=e.view(np.uint16), c=c.view(np.uint16), targets=t, dtype="bfloat16", meta=json.dumps(meta))
    return e, c, t


def test_trained_lm_runs_at_the_files_shape(tmp_path, monkeypatch):
    """--data trained_lm: one case, shape "trained_lm" at the file's N, D, V, the states bit for bit;
    the ground truth is the cross-entropy of those states."""
    monkeypatch.delenv("CCE_TRAINED_LM", raising=False)
    states = tmp_path / "states.npz"
    e, c, t = _states(states)
    bench = _bench()
    args = ["--cpu-smoke", "--out", str(tmp_path), "--providers", "ours,ours_filter", "--modes", "fwd_bwd"]
    path = bench.main(args + ["--data", "trained_lm", "--trained-lm", str(states)])
    records = json.loads(path.read_text())
    assert {(r["shape"], r["N"], r["D"], r["V"], r["data"]) for r in records} == {
        ("trained_lm", 40, 16, 300, "trained_lm")
    }
    assert len(records) == 2 and all(r["rel_err_loss"] < 1e-4 for r in records), records
    p = bench.P.Problem("trained_lm", 40, 16, 300, "bfloat16", "trained_lm", "numpy", str(states))
    bench.P.make_inputs(p)
    assert p.e.tobytes() == e.tobytes() and p.c.tobytes() == c.tobytes() and np.array_equal(p.t, t)
    # the default data sets take the file from the environment
    monkeypatch.setenv("CCE_TRAINED_LM", str(states))
    assert bench.parse_args(["--cpu-smoke", "--out", str(tmp_path)]).data_list[-1] == "trained_lm"


def test_trained_lm_needs_its_file(tmp_path, monkeypatch):
    monkeypatch.delenv("CCE_TRAINED_LM", raising=False)
    bench = _bench()
    with pytest.raises(SystemExit, match="--trained-lm PATH or set \\$CCE_TRAINED_LM"):
        bench.parse_args(["--out", str(tmp_path), "--data", "trained_lm"])
    with pytest.raises(SystemExit, match="--trained-lm .*no such file"):
        bench.parse_args(["--out", str(tmp_path), "--data", "trained_lm", "--trained-lm", str(tmp_path / "x.npz")])
    with pytest.raises(ValueError, match="--trained-lm PATH or \\$CCE_TRAINED_LM"):
        bench.P.make_inputs(bench.P.Problem("trained_lm", 1, 1, 1, "bfloat16", "trained_lm", "numpy"))


def test_budget_keys(tmp_path):
    """ours_budget@MIB: ours with that memory_budget (a peer's extra memory), recorded as "ours";
    ours_budget_logits: the bf16 logits' bytes. Anything else after @ is refused by name."""
    bench = _bench()
    P = bench.P
    args = bench.parse_args(["--out", str(tmp_path), "--providers", "ours_budget@3207,ours_budget_logits"])
    assert args.provider_list == ["ours_budget@3207", "ours_budget_logits"]
    p = P.Problem("x", 64, 16, 1000, "bfloat16", "peaked", "numpy")
    assert P.make_provider("ours_budget@3207", p).opts == {"memory_budget": 3207 << 20}
    assert P.make_provider("ours_budget_logits", p).opts == {"memory_budget": 64 * 1000 * 2}
    assert P.provider_identity("ours_budget@3207") == ("ours", False)
    for bad in ("ours_budget@", "ours_budget@3.5", "ours_budget@0", "ours@3207"):
        with pytest.raises(SystemExit, match="unknown provider"):
            bench.parse_args(["--out", str(tmp_path), "--providers", bad])
