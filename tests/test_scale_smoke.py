"""benchmarks/scale.py's whole flow on 8 CPU host devices (--cpu-smoke): every GPU count and
parallel kind, the one-GPU and the tp=2 reference, the float64 row-subset check, the JSON, the plot.

The run is a subprocess: the host device count is fixed when JAX starts, and other test modules
start it first in the pytest process. Two shapes (gemma2's stand-in, V = 500: padded at tp=8, one-GPU
reference; vocab1m's, V = 4000: tp=2 reference, float64 check in 4 chunks) keep it under a minute
on 2 cores. On CPU the loss is the pure-JAX reference run through the same sharded composition, in
float32: agreement with the reference mesh and with float64 is ~1e-7, held to the fp32 bar 1e-5.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5
COUNTS = (2, 4, 8)
EXPECTED = {(k, "tp") for k in COUNTS} | {(k, "dp") for k in COUNTS} | {(4, "dp2xtp2"), (8, "dp2xtp4")}


def _run(tmp_path: Path, *args: str, inject: str = "") -> tuple[list[dict], str]:
    """(records, stdout) of scale.py --cpu-smoke on 8 host devices; `inject`: code run on the
    imported module `scale` before its main()."""
    env = dict(os.environ)
    # As tests/test_jax_sharded.py: single-threaded Eigen keeps the 8 device threads from
    # oversubscribing 2 cores; a collective stuck in its rendezvous (XLA's CPU runtime may start
    # independent all-reduces in a different order per device) aborts after 60 s and is retried once.
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false"
        " --xla_cpu_collective_call_warn_stuck_timeout_seconds=30"
        " --xla_cpu_collective_call_terminate_timeout_seconds=60"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # compiling is most of the run; every side compiles alike
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_ENABLE_X64", None)
    out = tmp_path / "scale.json"
    argv = ["--cpu-smoke", "--out", str(out), *args]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), *argv]
    if inject:
        head = f"import sys; sys.argv[1:] = {argv!r}; sys.path.insert(0, 'benchmarks'); import scale"
        cmd = [sys.executable, "-c", f"{head}\n{inject}\nscale.main()"]
    for _ in range(2):
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 or "rendezvous" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _finite_pos(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_cpu_smoke_all_counts_and_meshes(tmp_path):
    records, stdout = _run(tmp_path, "--gpu-counts", "2,4,8", "--rounds", "1", "--shapes", "gemma2,vocab1m")
    print(stdout)
    refs = {"gemma2": "1gpu", "vocab1m": "tp2"}
    for shape, ref in refs.items():
        recs = [r for r in records if r["shape"] == shape]
        seen = {(r["gpus"], r["parallel"]) for r in recs}
        expected = EXPECTED | ({(1, "none")} if ref == "1gpu" else set())
        assert seen == expected, (shape, seen ^ expected)
        (r_ref,) = [r for r in recs if r["reference"]]
        assert r_ref["efficiency"] == 1.0 and r_ref["gpus"] == (1 if ref == "1gpu" else 2), r_ref
        for r in recs:
            assert r["note"] is None, r
            assert r["efficiency_vs"] == ref and r["rounds"] == 1 and r["cpu_smoke"], r
            assert _finite_pos(r["ms"]) and _finite_pos(r["efficiency"]), r
            # the stated definition: reference GPU-time per token over the setup's
            want = r_ref["gpus"] * r_ref["ms"] * r["dp"] / (r["gpus"] * r["ms"])
            assert r["efficiency"] == pytest.approx(want, rel=1e-12), r
            assert r["n"] == r["dp"] * r_ref["n"] and r["dtype"] == "float32", r
            for key in ("loss_rel_err_vs_ref", "de_rel_err_vs_ref", "dc_rel_err_vs_ref", "loss_rel_err_vs_f64_subset"):
                assert r[key] is not None and 0 <= r[key] <= TOL, (key, r)
            assert r["subset_rows"] == 64 < r_ref["n"], r
    mixed = [r for r in records if r["parallel"].startswith("dp2xtp")]
    assert {(r["dp"], r["tp"]) for r in mixed} == {(2, 2), (2, 4)}

    pytest.importorskip("matplotlib")
    png = tmp_path / "scale.png"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plot_scale.py"), str(tmp_path / "scale.json"), "-o", str(png)],
        check=True,
        timeout=120,
    )
    assert png.stat().st_size > 10_000


def test_cpu_smoke_budget_spent_still_writes(tmp_path):
    """A budget spent before the first shape: every requested record written, each saying why."""
    records, _ = _run(tmp_path, "--gpu-counts", "2,4", "--shapes", "llama3", "--budget-s", "1e-6")
    assert {(r["gpus"], r["parallel"]) for r in records} == {(2, "tp"), (4, "tp"), (2, "dp"), (4, "dp"), (4, "dp2xtp2")}
    assert all(r["ms"] is None and r["note"].startswith("skipped: --budget-s") for r in records), records


INJECT_OOM = """
build = scale.build
def failing_build(s, *args):
    if (s.dp, s.tp) == (1, 2):
        raise MemoryError("injected: out of memory")
    return build(s, *args)
scale.build = failing_build
"""


def test_cpu_smoke_failed_setup_is_recorded_and_reference_falls_back(tmp_path):
    """tp=2 fails (an injected out-of-memory): its records carry the error, the others still run, and
    vocab1m's reference falls back from tp=2 to tp=4."""
    records, _ = _run(tmp_path, "--gpu-counts", "2,4", "--rounds", "1", "--shapes", "vocab1m", inject=INJECT_OOM)
    assert {(r["gpus"], r["parallel"]) for r in records} == {(2, "tp"), (4, "tp"), (2, "dp"), (4, "dp"), (4, "dp2xtp2")}
    for r in records:
        if (r["dp"], r["tp"]) == (1, 2):
            assert r["ms"] is None and r["efficiency"] is None and "injected: out of memory" in r["note"], r
            continue
        assert r["note"] is None and r["efficiency_vs"] == "tp4" and _finite_pos(r["efficiency"]), r
        assert r["reference"] == ((r["dp"], r["tp"]) == (1, 4)), r
        assert 0 <= r["dc_rel_err_vs_ref"] <= TOL and 0 <= r["loss_rel_err_vs_f64_subset"] <= TOL, r


def _scale_module():
    spec = importlib.util.spec_from_file_location("scale_under_test", ROOT / "benchmarks" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def test_f64_row_losses_chunked_equals_dense():
    """The chunked float64 reference (C pulled in chunks, the last one clamped) against one dense pass."""
    import jax.numpy as jnp

    scale = _scale_module()
    rng = np.random.default_rng(0)
    e = rng.standard_normal((9, 5)).astype(np.float32)
    c = rng.standard_normal((50, 5)).astype(np.float32)
    y = rng.integers(0, 50, 9)
    y[:2] = (0, 49)
    z = e.astype(np.float64) @ c.astype(np.float64).T
    zmax = z.max(axis=1)
    dense = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1)) - z[np.arange(9), y]
    for chunk in (7, 50, 64):
        got = scale.f64_row_losses(jnp.asarray(e), jnp.asarray(c), jnp.asarray(y), chunk)
        np.testing.assert_allclose(got, dense, rtol=1e-13, atol=0)
