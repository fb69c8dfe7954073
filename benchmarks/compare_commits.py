"""Before/after: the same CuPy calls timed from two checkouts of cce_cupy, in alternating processes.

    python benchmarks/compare_commits.py --before /tmp/old --after . --out cmp.json

Each round runs one fresh process per checkout (before, after, then after, before in the next
round: drift in clocks and temperature hits both alike). A process makes bf16 inputs, warms up
(compiling or loading its kernels, untimed), then times cuBLAS's `E @ C.T` and the checkout's
forward and forward + backward, 5 calls each with events, and reports medians. The ratio to the
same process's cuBLAS GEMM is the figure to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}

_CHILD = textwrap.dedent(
    """
    import json, sys
    import cupy as cp, ml_dtypes, numpy as np
    import cce_cupy as cce
    n, d, v = (int(x) for x in sys.argv[1:4])
    rs = cp.random.RandomState(0)
    e = rs.standard_normal((n, d), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    c = (rs.standard_normal((v, d), dtype=cp.float32) / d ** 0.5).astype(ml_dtypes.bfloat16)
    t = rs.randint(0, v, n).astype(cp.int32)

    def med(fn, reps=5):
        fn()
        out = []
        for _ in range(reps):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(); fn(); b.record(); b.synchronize()
            out.append(cp.cuda.get_elapsed_time(a, b))
        return float(np.median(out))

    rec = {"gemm_ms": med(lambda: e @ c.T),
           "fwd_ms": med(lambda: cce.linear_cross_entropy(e, c, t)),
           "fwd_bwd_ms": med(lambda: cce.linear_cross_entropy_with_grad(e, c, t))}
    rec["fwd_over_gemm"] = rec["fwd_ms"] / rec["gemm_ms"]
    rec["fwd_bwd_over_gemm"] = rec["fwd_bwd_ms"] / rec["gemm_ms"]
    rec["cce_cupy"] = cce.__file__
    print(json.dumps(rec))
    """
)


def run(checkout: Path, shape) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, shape)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd="/tmp",
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, type=Path)
    ap.add_argument("--after", required=True, type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    records = []
    for name, shape in SHAPES.items():
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for label in order:
                rec = run(getattr(args, label).resolve(), shape)
                rec.update(shape=name, label=label, round=r)
                records.append(rec)
                print(
                    f"{name} {label:6s} fwd {rec['fwd_ms']:6.2f} ms ({rec['fwd_over_gemm']:.3f}x gemm)  "
                    f"fwd+bwd {rec['fwd_bwd_ms']:6.2f} ms ({rec['fwd_bwd_over_gemm']:.3f}x gemm)",
                    flush=True,
                )
    for name in SHAPES:
        for label in ("before", "after"):
            rs = [x for x in records if x["shape"] == name and x["label"] == label]
            f = sorted(x["fwd_over_gemm"] for x in rs)[len(rs) // 2]
            fb = sorted(x["fwd_bwd_over_gemm"] for x in rs)[len(rs) // 2]
            print(f"median {name} {label:6s}: fwd {f:.3f}x, fwd+bwd {fb:.3f}x the same process's E @ C.T")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
