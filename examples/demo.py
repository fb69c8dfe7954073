"""Demo: the fused linear cross-entropy loss and gradients, on the GPU when CuPy sees one.

Usage: python examples/demo.py [--n N --d D --v V]
Without a GPU it runs the NumPy backend at a small shape and says so.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import cce_cupy as cce


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def main() -> None:
    gpu = gpu_available()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8192 if gpu else 512)
    ap.add_argument("--d", type=int, default=2304 if gpu else 256)
    ap.add_argument("--v", type=int, default=256000 if gpu else 8000)
    args = ap.parse_args()
    n, d, v = args.n, args.d, args.v

    rng = np.random.default_rng(0)
    e = rng.standard_normal((n, d), dtype=np.float32)
    c = (rng.standard_normal((v, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    t = rng.integers(0, v, n)
    if gpu:
        import cupy as xp
        import ml_dtypes

        e, c, t = (xp.asarray(a) for a in (e.astype(ml_dtypes.bfloat16), c.astype(ml_dtypes.bfloat16), t))
        sync = xp.cuda.Device().synchronize
        where = f"GPU ({xp.cuda.runtime.getDeviceProperties(0)['name'].decode()}), bfloat16, CUDA kernels"
    else:
        sync = lambda: None  # noqa: E731
        where = "CPU (no CUDA device found), float32, NumPy backend"
    print(f"running on {where}: N={n} D={d} V={v} (the N x V logits would take {n * v * 4 / 2**20:.0f} MiB in fp32)")

    cce.linear_cross_entropy_with_grad(e, c, t)  # warm-up (compiles the kernels on first GPU use)
    sync()
    t0 = time.perf_counter()
    loss = cce.linear_cross_entropy(e, c, t)
    sync()
    t1 = time.perf_counter()
    loss, de, dc = cce.linear_cross_entropy_with_grad(e, c, t)
    sync()
    t2 = time.perf_counter()
    print(f"loss = {float(loss):.6f}  (log V = {np.log(v):.6f} for uniform logits)")
    print(f"forward: {1e3 * (t1 - t0):.1f} ms   forward+backward: {1e3 * (t2 - t1):.1f} ms")
    print(f"de {tuple(de.shape)} {de.dtype}, dc {tuple(dc.shape)} {dc.dtype}")
    cce.check_targets()
    if gpu:
        print(
            "next: the loss in a JAX training loop, against optax on materialized logits:\n"
            "  python examples/train_lm.py --loss cce   (and --loss optax; results: examples/results/)"
        )


if __name__ == "__main__":
    main()
