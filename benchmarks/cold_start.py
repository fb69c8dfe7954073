"""Cold start: seconds from a call to its result, in fresh processes with empty caches.

    python benchmarks/cold_start.py --out benchmarks/results/<gpu>-cold.json

Each measurement runs in its own Python process, with a fresh, empty CuPy kernel cache
(CUPY_CACHE_DIR) and autotune cache (CCE_CUPY_AUTOTUNE_CACHE), so nothing an earlier run compiled
or tuned helps, except where stated:

  first_loss_fresh       the first `linear_cross_entropy` of a process (gemma2, bf16)
  first_fwd_bwd_fresh    then the first `linear_cross_entropy_with_grad`
  first_filtered_fresh   then the first one with filter_eps="auto"
  first_loss_new_process a second process on the same caches: the first fwd+bwd at a new N (4096)
  jax_first_grad         a third process: JAX's first `jit(value_and_grad)` call, XLA's compile included

Times are wall clock from the call to its result on the host (the GPU synchronized), inputs made
beforehand. `from_wheel` says whether cce_cupy was imported from an installed wheel (site-packages
or a --target folder) rather than from this checkout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

GEMMA2 = (8192, 2304, 256000)

_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    t_import = time.perf_counter()
    import cupy as cp
    import ml_dtypes
    import cce_cupy as cce
    t_import = time.perf_counter() - t_import
    from pathlib import Path
    repo = Path(sys.argv[1])
    here = Path(cce.__file__).resolve()
    from_wheel = repo not in here.parents
    gpu = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    out = []

    def inputs(n, d, v, seed):
        rs = cp.random.RandomState(seed)
        e = rs.standard_normal((n, d), dtype=cp.float32).astype(ml_dtypes.bfloat16)
        c = (rs.standard_normal((v, d), dtype=cp.float32) / d ** 0.5).astype(ml_dtypes.bfloat16)
        t = rs.randint(0, v, n).astype(cp.int32)
        cp.cuda.Device().synchronize()
        return e, c, t

    def timed(what, fn):
        t0 = time.perf_counter()
        r = fn()
        cp.cuda.Device().synchronize()
        out.append({"gpu": gpu, "cupy": cp.__version__, "what": what, "seconds": time.perf_counter() - t0,
                    "from_wheel": from_wheel, "import_seconds": t_import})
        return r

    mode = sys.argv[2]
    n, d, v = (int(x) for x in sys.argv[3:6])
    if mode != "jax":
        e, c, t = inputs(n, d, v, 0)
    if mode == "fresh":
        timed("first_loss_fresh", lambda: cce.linear_cross_entropy(e, c, t))
        timed("first_fwd_bwd_fresh", lambda: cce.linear_cross_entropy_with_grad(e, c, t))
        timed("first_filtered_fresh", lambda: cce.linear_cross_entropy_with_grad(e, c, t, filter_eps="auto"))
        # A warm call, for scale.
        timed("warm_fwd_bwd", lambda: cce.linear_cross_entropy_with_grad(e, c, t))
    elif mode == "new_process":
        timed("first_loss_new_process", lambda: cce.linear_cross_entropy_with_grad(e, c, t))
    elif mode == "jax":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import jax, jax.numpy as jnp
        from jax_bindings import linear_cross_entropy
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        ej = jax.random.normal(k1, (n, d), jnp.bfloat16)
        cj = (jax.random.normal(k2, (v, d), jnp.float32) / d ** 0.5).astype(jnp.bfloat16)
        tj = jax.random.randint(k3, (n,), 0, v)
        jax.block_until_ready((ej, cj, tj))
        f = jax.jit(jax.value_and_grad(lambda a, b: linear_cross_entropy(a, b, tj), argnums=(0, 1)))
        timed("jax_first_grad", lambda: jax.block_until_ready(f(ej, cj)))
        timed("jax_warm_grad", lambda: jax.block_until_ready(f(ej, cj)))
    print(json.dumps(out))
    """
)


def run_child(mode: str, shape, env: dict, repo: Path) -> list[dict]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(repo), mode, *map(str, shape)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tempfile.gettempdir(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stdout}\n{proc.stderr}")
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in records:
        r["process_seconds"] = time.perf_counter() - t0
        r["log"] = proc.stderr.strip()[-2000:]
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="JSON records")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(
            os.environ,
            CUPY_CACHE_DIR=os.path.join(tmp, "cupy"),
            CCE_CUPY_AUTOTUNE_CACHE=os.path.join(tmp, "autotune.json"),
            XLA_PYTHON_CLIENT_PREALLOCATE="false",
        )
        records = run_child("fresh", GEMMA2, env, repo)
        records += run_child("new_process", (4096, GEMMA2[1], GEMMA2[2]), env, repo)
        records += run_child("jax", GEMMA2, env, repo)
    meta = {
        "commit": os.environ.get("CCE_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo
        ).stdout.strip(),
        "date": datetime.date.today().isoformat(),
    }
    for r in records:
        r.update(meta)
    for r in records:
        print(
            f"{r['what']:24s} {r['seconds']:8.3f} s  (from_wheel={r['from_wheel']}, "
            f"process {r['process_seconds']:.1f} s)"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
