"""The benchmark's default settings run on the NumPy backend (CPU, tiny shape) and write
records in the format later issues read. No torch, no GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

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
}

pytest.importorskip("ml_dtypes")


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_under_test", ROOT / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_smoke_writes_every_key(tmp_path):
    bench = _bench()
    path = bench.main(["--cpu-smoke", "--out", str(tmp_path)])
    assert path.name.endswith("-cpu-smoke.json")
    assert path.with_suffix(".md").exists()
    records = json.loads(path.read_text())
    assert records
    for r in records:
        assert set(r) == KEYS, sorted(set(r) ^ KEYS)
        assert r["mode"] in ("fwd", "bwd", "fwd_bwd", "gemm_fwd", "gemm_bwd_sum")
        assert r["data"] in ("uniform", "peaked")
        assert isinstance(r["filter"], bool) and isinstance(r["versions"], dict)
        assert r["ms"] is None or r["ms"] >= 0
    seen = {(r["data"], r["provider"], r["mode"], r["filter"]) for r in records if r["ms"] is not None}
    for data in ("uniform", "peaked"):
        assert (data, "cublas", "gemm_fwd", False) in seen
        assert (data, "cublas", "gemm_bwd_sum", False) in seen
        for prov, flt in (("ours", False), ("ours_deterministic", False), ("ours", True)):
            for mode in ("fwd", "bwd", "fwd_bwd"):
                assert (data, prov, mode, flt) in seen, (data, prov, mode, flt)
    # ours on the NumPy backend is exact up to bf16 output rounding
    for r in records:
        if r["provider"].startswith("ours") and r["mode"] == "fwd_bwd":
            assert r["rel_err_loss"] < 1e-4 and r["rel_err_de"] < 1e-2 and r["rel_err_dc"] < 1e-2, r
