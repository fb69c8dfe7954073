"""The examples run: the LM training smoke (both losses, CPU), its vocabulary sweep and plots, and the
CuPy pipeline (its NumPy fallback without a GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

pytest.importorskip("jax")
pytest.importorskip("optax")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=120):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr, time.perf_counter() - t0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`train_lm.py --smoke` once for the module: both losses, a few steps on CPU, saving the
    held-out batch's states."""
    tmp = tmp_path_factory.mktemp("train_lm")
    out, wall = _run(
        EXAMPLES / "train_lm.py",
        "--smoke",
        "--out",
        tmp / "train.json",
        "--cache-dir",
        tmp / "cache",
        "--save-states",
        tmp / "states.npz",
        timeout=300,
    )
    return tmp, out, wall


def test_train_smoke_both_losses_agree(smoke):
    tmp, out, _ = smoke  # no wall-clock assert: a loaded CI machine is slow, _run's timeout guards hangs
    assert "largest per-step |loss_cce - loss_optax|" in out
    recs = {k: json.loads((tmp / f"train_{k}.json").read_text()) for k in ("cce", "optax")}
    for k, r in recs.items():
        assert r["loss_impl"] == k and r["config"]["smoke"] is True
        assert len(r["losses"]) == len(r["step_ms"]) == r["config"]["steps"]
        assert np.all(np.isfinite(r["losses"]))
        assert np.mean(r["losses"][-5:]) < r["losses"][0] - 0.3, r["losses"]  # it learns
    # Same init and batches, float32: the two losses agree step by step (looser on a GPU, where
    # XLA's float32 matmuls may run in TF32).
    gap = np.max(np.abs(np.subtract(recs["cce"]["losses"], recs["optax"]["losses"])))
    assert gap < (1e-3 if recs["cce"]["env"]["backend"] == "cpu" else 3e-2), gap


def test_train_with_filter_and_its_plot(smoke, tmp_path):
    """--filter-eps auto trains the cce loss with the certified filter (on CPU its backward is the
    pure-JAX one, so the losses are the exact run's), records it, and plot_filter_train.py draws
    both runs."""
    tmp, _, _ = smoke
    for name, extra in (("exact", ()), ("filter", ("--filter-eps", "auto"))):
        _run(EXAMPLES / "train_lm.py", "--smoke", "--loss", "cce", *extra, "--out", tmp_path / f"{name}.json",
             "--cache-dir", tmp / "cache", timeout=300)  # fmt: skip
    exact, filt = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("exact", "filter"))
    assert filt["filter_eps"] == "auto" and exact["filter_eps"] is None
    np.testing.assert_allclose(filt["losses"], exact["losses"], rtol=1e-5)
    out, _ = _run(
        EXAMPLES / "plot_filter_train.py", tmp_path / "exact.json", tmp_path / "filter.json", "--out", tmp_path
    )
    assert (tmp_path / "filter_loss_curves.png").stat().st_size > 0 and "largest |filter - exact|" in out


def test_saved_states_are_the_held_batch(smoke):
    """--save-states: per loss, the held batch's final hidden states, the head and the next tokens
    (the corpus's last windows, which training never drew), readable by the benchmark's loader;
    their float64 cross-entropy is the held-out loss the run computed."""
    pytest.importorskip("ml_dtypes")
    sys.path.insert(0, str(ROOT))
    from benchmarks.providers.problem import load_trained_lm, trained_lm_dims

    tmp, out, _ = smoke
    lm = _module("train_lm")
    tokens, _ = lm.load_corpus(lm.SMOKE["vocab"], lm.SMOKE["corpus_mb"], str(tmp / "cache"))
    _, held = lm.hold_out(tokens, lm.SMOKE["seq"])
    k, seq = held.shape
    assert k * seq >= lm.HELD_TOKENS // 2 and held.size < tokens.size
    for name in ("cce", "optax"):
        path = tmp / f"states_{name}.npz"
        rec = json.loads((tmp / f"train_{name}.json").read_text())
        e, c, t = load_trained_lm(str(path))
        n = k * (seq - 1)
        assert e.shape == (n, lm.SMOKE["d_model"]) and c.shape == (lm.SMOKE["vocab"], lm.SMOKE["d_model"])
        assert trained_lm_dims(str(path)) == (n, e.shape[1], c.shape[0])
        np.testing.assert_array_equal(t, held[:, 1:].reshape(-1))
        z = e.astype(np.float64) @ c.astype(np.float64).T
        m = z.max(1)
        loss = np.mean(m + np.log(np.exp(z - m[:, None]).sum(1)) - z[np.arange(n), t])
        assert rec["states"]["loss_impl"] == name and rec["states"]["steps"] == lm.SMOKE["steps"]
        assert abs(loss - rec["states"]["loss"]) < 1e-4 * loss, (loss, rec["states"]["loss"])
        assert f"states: {path}" in out


def test_sweep_and_plots(smoke, tmp_path):
    tmp, _, _ = smoke
    sweep = tmp_path / "sweep.json"
    out, _ = _run(
        EXAMPLES / "train_lm.py",
        "--smoke",
        "--sweep-vocab",
        "1024",
        "--sweep-steps",
        "3",
        "--out",
        sweep,
        "--cache-dir",
        tmp / "cache",
        timeout=300,
    )  # 2 fresh processes
    rec = json.loads(sweep.read_text())
    got = [(p["V"], p["loss_impl"], p["status"]) for p in rec["points"]]
    assert got == [(1024, "cce", "ok"), (1024, "optax", "ok")], rec["points"]
    assert all(p["padded"] for p in rec["points"])  # the smoke tokenizer has 512 tokens
    for name in ("cce", "optax"):
        (tmp_path / f"train_{name}.json").write_text((tmp / f"train_{name}.json").read_text())
    _run(EXAMPLES / "plot_train.py", "--dir", tmp_path)
    for f in ("loss_curves.png", "vocab_sweep.png", "summary.md"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert "Largest per-step gap" in (tmp_path / "summary.md").read_text()


def test_plot_marks_oom(tmp_path):
    pytest.importorskip("matplotlib")
    plot = _module("plot_train")
    env = {"device": "test GPU"}
    points = []
    for v in (32768, 65536, 131072):
        for name in ("cce", "optax"):
            p = {"V": v, "loss_impl": name, "env": env, "bytes_limit": 80 * 2**30}
            if name == "optax" and v >= 65536:
                p.update(status="OOM", inferred=v > 65536, xla_estimate_bytes=90 * 2**30 if v == 65536 else None)
            else:
                p.update(status="ok", peak_bytes=v * 2**16, step_ms=10.0 + v / 4096, xla_estimate_bytes=None)
            points.append(p)
    cfg = dict(batch=16, seq=1024, d_model=1024, layers=8, heads=16, dtype="bfloat16", vocab=65536, sweep_steps=6)
    (tmp_path / "sweep.json").write_text(json.dumps({"kind": "sweep", "config": cfg, "note": "test", "points": points}))
    assert plot.main(["--dir", str(tmp_path)]) == 0
    assert (tmp_path / "vocab_sweep.png").stat().st_size > 0
    md = (tmp_path / "summary.md").read_text()
    assert "| 65,536 | optax | OOM |" in md and "not run" in md


def test_tokenizer_round_trip(tmp_path):
    lm = _module("train_lm")
    root, files = lm.stdlib_files()
    assert files and files == lm.stdlib_files()[1]  # same order every time
    sample = files[:3]
    words = lm.build_vocab(sample, 600, 0)
    ids, seen, missed = lm.encode(sample, words, 0)
    assert ids.max() < lm.FIRST_WORD + len(words) and 0 < missed < seen
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in sample]
    assert lm.decode(ids, words) == "".join(t + "\f" for t in texts)


def test_is_oom():
    lm = _module("train_lm")
    assert lm.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes"))
    assert not lm.is_oom(ValueError("bad shape"))


def test_cupy_pipeline_runs():
    out, _ = _run(EXAMPLES / "cupy_pipeline.py", timeout=300)
    assert "OK: no allocation" in out
    if "no CUDA device found" not in out:  # on a GPU machine it ran the kernels
        assert "memory pool before" in out and "memory pool after" in out
