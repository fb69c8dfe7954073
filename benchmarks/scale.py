"""Multi-GPU scaling of the JAX loss: fwd+bwd under `jit`, one GPU against vocab- and data-parallel.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/scale.py --out benchmarks/results/<gpu>-scale.json

Per shape (gemma2, llama3; bf16), on G = all local GPUs (at least 2):
  * 1 GPU: `jax_bindings.linear_cross_entropy` over N tokens, t1;
  * tp=G: the same global problem with the classifier sharded along V
    (`make_vocab_parallel_loss`), tG; efficiency t1 / (G * tG);
  * dp=G: G times the tokens, split over the GPUs, the classifier replicated; efficiency t1 / tG.
Rounds time every setup once, in a shuffled order (a fixed order biases these GPUs by 15-20%);
the figure is the median over rounds. Agreement with one GPU: relative error of the loss, and of
dE and dC (tp; the same problem), as ||x - x1|| / ||x1||.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_bindings import (  # noqa: E402
    linear_cross_entropy,
    make_vocab_parallel_loss,
    make_vocab_parallel_mesh,
    shard_classifier,
)

SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(n: int, d: int, v: int, seed: int):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    e = jax.random.normal(k1, (n, d), jnp.bfloat16)
    c = (jax.random.normal(k2, (v, d), jnp.float32) / d**0.5).astype(jnp.bfloat16)
    y = jax.random.randint(k3, (n,), 0, v)
    return e, c, y


def _time(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3


def run_shape(name: str, shape, gpus: int, rounds: int, reduce_dtypes) -> list[dict]:
    n, d, v = shape
    devs = jax.devices()[:gpus]
    e, c, y = _inputs(n, d, v, 0)
    e2, _, y2 = _inputs(gpus * n, d, v, 1)  # dp: G times the tokens, the same classifier
    one = jax.device_put((e, c, y), devs[0])
    grad1 = jax.jit(jax.value_and_grad(lambda a, b, t: linear_cross_entropy(a, b, t), argnums=(0, 1)))

    setups = {"1gpu": (grad1, one)}
    tp_mesh = make_vocab_parallel_mesh(tp=gpus, devices=devs)
    sh = shard_classifier(c, tp_mesh, axis="tp")
    e_rep = jax.device_put(e, NamedSharding(tp_mesh, P()))
    y_rep = jax.device_put(y, NamedSharding(tp_mesh, P()))
    for rd in reduce_dtypes:
        loss_tp = make_vocab_parallel_loss(tp_mesh, vocab_size=sh.vocab_size, tp_axis="tp", grad_reduce_dtype=rd)
        f = jax.jit(jax.value_and_grad(lambda a, b, t, f=loss_tp: f(a, b, t), argnums=(0, 1)))
        setups[f"tp:{rd}"] = (f, (e_rep, sh.c, y_rep))
    dp_mesh = make_vocab_parallel_mesh(tp=1, dp=gpus, devices=devs)
    loss_dp = make_vocab_parallel_loss(dp_mesh, vocab_size=v, tp_axis="tp", dp_axis="dp")
    fdp = jax.jit(jax.value_and_grad(lambda a, b, t: loss_dp(a, b, t), argnums=(0, 1)))
    dp_args = (
        jax.device_put(e2, NamedSharding(dp_mesh, P("dp"))),
        jax.device_put(c, NamedSharding(dp_mesh, P())),
        jax.device_put(y2, NamedSharding(dp_mesh, P("dp"))),
    )
    setups["dp"] = (fdp, dp_args)

    results = {}
    compile_s = {}
    for key, (fn, args) in setups.items():  # compile and check, untimed
        t0 = time.perf_counter()
        results[key] = jax.block_until_ready(fn(*args))
        compile_s[key] = time.perf_counter() - t0
    ref_dp = jax.block_until_ready(grad1(*jax.device_put((e2, c, y2), devs[0])))

    times: dict[str, list[float]] = {k: [] for k in setups}
    order = list(setups)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            fn, args = setups[key]
            times[key].append(_time(fn, *args))
    med = {k: float(np.median(t)) for k, t in times.items()}

    loss1, (de1, dc1) = results["1gpu"]
    records = []
    base = {"shape": name, "n": n, "d": d, "v": v, "dtype": "bfloat16", "rounds": rounds}
    records.append(
        {
            **base,
            "gpus": 1,
            "parallel": "none",
            "ms": med["1gpu"],
            "efficiency": 1.0,
            "loss_rel_err_vs_1gpu": 0.0,
            "first_call_s": compile_s["1gpu"],
        }
    )
    for rd in reduce_dtypes:
        loss, (de, dc) = results[f"tp:{rd}"]
        records.append(
            {
                **base,
                "gpus": gpus,
                "parallel": "tp",
                "grad_reduce_dtype": rd,
                "ms": med[f"tp:{rd}"],
                "efficiency": med["1gpu"] / (gpus * med[f"tp:{rd}"]),
                "loss_rel_err_vs_1gpu": _rel(loss, loss1),
                "de_rel_err_vs_1gpu": _rel(de, de1),
                "dc_rel_err_vs_1gpu": _rel(np.asarray(dc, np.float32)[:v], dc1),
                "first_call_s": compile_s[f"tp:{rd}"],
            }
        )
    loss, (de, dc) = results["dp"]
    lref, (deref, dcref) = ref_dp
    records.append(
        {
            **base,
            "n": gpus * n,
            "gpus": gpus,
            "parallel": "dp",
            "ms": med["dp"],
            "efficiency": med["1gpu"] / med["dp"],
            "loss_rel_err_vs_1gpu": _rel(loss, lref),
            "de_rel_err_vs_1gpu": _rel(de, deref),
            "dc_rel_err_vs_1gpu": _rel(dc, dcref),
            "first_call_s": compile_s["dp"],
        }
    )
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--shapes", default="gemma2,llama3")
    ap.add_argument("--gpus", type=int, default=None, help="default: all local GPUs")
    args = ap.parse_args()
    gpus = args.gpus or len(jax.devices())
    if gpus < 2:
        raise SystemExit(f"scale.py needs at least 2 GPUs, {len(jax.devices())} visible")
    # CCE_COMMIT: the checkout's commit where the device copy's git history is not this checkout's.
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = (
        os.environ.get("CCE_COMMIT")
        or subprocess.run(git, capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    )
    meta = {
        "gpu": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
    }
    records = []
    for name in args.shapes.split(","):
        for r in run_shape(name, SHAPES[name], gpus, args.rounds, ("input", "float32")):
            r.update(meta)
            records.append(r)
            print(
                f"{r['shape']:7s} {r['parallel']:4s} {r.get('grad_reduce_dtype', ''):8s} gpus={r['gpus']} "
                f"{r['ms']:8.2f} ms  eff {r['efficiency']:.3f}  loss err {r['loss_rel_err_vs_1gpu']:.1e}  "
                f"dE err {r.get('de_rel_err_vs_1gpu', 0):.1e}  first call {r['first_call_s']:.1f} s",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
