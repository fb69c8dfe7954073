"""A CuPy training step by hand: the loss and both gradients in one call, SGD, and proof that nothing
N x V was allocated.

    python examples/cupy_pipeline.py [--n N --d D --v V --steps S --lr LR]

The "model" is one projection W (D_in x D) under a classifier C (V x D): e = x @ W, then
`cce_cupy.linear_cross_entropy_with_grad(e, C, targets)` gives the loss, dE and dC; dW = x.T @ dE
(the chain rule, by hand), and W and C take an SGD step. The weights are kept in fp32 and given to
the loss in bf16 (as in mixed-precision training).

A `cupy.cuda.MemoryHook` counts every allocation from CuPy's memory pool: the peak of bytes in use
inside the loss call and inside the whole step, and the largest single allocation. They are printed
next to N * V * 4 bytes (the fp32 logits a plain implementation would hold); the script exits with
status 1 if any of them reaches N * V * 2 (even a bf16 N x V buffer).

Without a CUDA device it says so and runs the same step on the NumPy backend at a tiny shape, with
`tracemalloc` (which sees NumPy's allocations) in place of the pool hook.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import cce_cupy as cce  # noqa: E402

GIB = 2**30


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def fmt(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / GIB:.3f} GiB" if abs(b) >= GIB else f"{b / 2**20:.2f} MiB"


# ------------------------------------------------------------------------ peak trackers
def pool_tracker():
    """A MemoryHook on CuPy's default pool: bytes in use (counted from the hook's own malloc/free
    events, starting from `used_bytes()` at `reset`), their peak, and the largest single allocation."""
    import cupy

    class PoolPeak(cupy.cuda.MemoryHook):
        name = "PoolPeak"

        def __init__(self):
            super().__init__()
            self.pool = cupy.get_default_memory_pool()
            self.reset()

        def reset(self):
            self.base = self.cur = self.peak = self.pool.used_bytes()
            self.largest = 0

        def malloc_postprocess(self, **kw):
            self.cur += kw["mem_size"]
            self.peak = max(self.peak, self.cur)
            self.largest = max(self.largest, kw["mem_size"])

        def free_postprocess(self, **kw):
            self.cur -= kw["mem_size"]

        def report(self):  # (peak above the bytes in use at reset, largest single allocation)
            return self.peak - self.base, self.largest

    return PoolPeak()


class TraceMallocPeak:
    """The CPU stand-in: tracemalloc's peak (NumPy reports its buffers to tracemalloc)."""

    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        tracemalloc.stop()

    def reset(self):
        self.base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()

    def report(self):
        return tracemalloc.get_traced_memory()[1] - self.base, None


# --------------------------------------------------------------------------- 16-bit casts
def bf16_from_f32(xp, x):
    """fp32 -> bfloat16 by round-to-nearest-even on the bits (needs no bf16 arithmetic in CuPy)."""
    import ml_dtypes

    u = x.view(xp.uint32)
    r = (u + xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1))) >> 16
    return r.astype(xp.uint16).view(ml_dtypes.bfloat16)


def f32_from_bf16(xp, x):
    return (x.view(xp.uint16).astype(xp.uint32) << 16).view(xp.float32)


# ------------------------------------------------------------------------------- the step
def main(argv=None) -> int:
    gpu = gpu_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384 if gpu else 1024, help="tokens")
    ap.add_argument("--d-in", type=int, default=1024 if gpu else 32, help="input width of W")
    ap.add_argument("--d", type=int, default=1024 if gpu else 32, help="hidden width")
    ap.add_argument("--v", type=int, default=131072 if gpu else 8192, help="vocabulary")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="SGD learning rate (default N / (2 D): a target logit moves by about 0.5 per step)",
    )
    ap.add_argument("--cpu", action="store_true", help="use the NumPy backend even with a GPU")
    args = ap.parse_args(argv)
    gpu = gpu and not args.cpu
    n, d_in, d, v = args.n, args.d_in, args.d, args.v
    lr = n / (2 * d) if args.lr is None else args.lr

    if gpu:
        import cupy as xp

        name = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"].decode()
        try:  # bf16 CuPy arrays need ml_dtypes; float16 otherwise
            float(f32_from_bf16(xp, bf16_from_f32(xp, xp.full(4, 1.5, xp.float32)))[0])
            to16, to32, half = (lambda a: bf16_from_f32(xp, a)), (lambda a: f32_from_bf16(xp, a)), "bfloat16"
        except Exception as exc:
            print(f"no bfloat16 CuPy arrays here ({type(exc).__name__}: {exc}): float16 instead")
            to16, to32, half = (lambda a: a.astype(xp.float16)), (lambda a: a.astype(xp.float32)), "float16"
        print(f"GPU: {name}; CUDA kernels on CuPy arrays, weights fp32, loss inputs {half}")
        sync = xp.cuda.Device().synchronize
        tracker = pool_tracker()
    else:
        from cce_cupy import numpy_backend

        xp = np
        # The NumPy backend visits the logits in blocks of numpy_backend.BLOCK_BYTES (16 MiB); lowered
        # here so that this tiny shape still takes many blocks, as a large one would.
        numpy_backend.BLOCK_BYTES = 1 << 20
        print(
            "no CUDA device found: NumPy backend (blocked, never N x V) at a tiny shape, float32, "
            "tracemalloc instead of CuPy's memory pool"
        )
        to16 = to32 = lambda a: a  # noqa: E731
        sync = lambda: None  # noqa: E731
        tracker = TraceMallocPeak()

    nv4 = n * v * 4
    print(f"N={n} D_in={d_in} D={d} V={v}: the N x V fp32 logits would take {fmt(nv4)}")

    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((n, d_in), dtype=np.float32))
    w = xp.asarray((rng.standard_normal((d_in, d)) / np.sqrt(d_in)).astype(np.float32))
    c = xp.asarray((rng.standard_normal((v, d)) / np.sqrt(d)).astype(np.float32))
    t = xp.asarray(rng.integers(0, v, n).astype(np.int32))

    def step(measure_loss_call):
        e = to16(x @ w)  # (N, D), the hidden states handed to the loss
        c16 = to16(c)
        if measure_loss_call:
            sync()
            tracker.reset()
        loss, de, dc = cce.linear_cross_entropy_with_grad(e, c16, t)
        if measure_loss_call:
            sync()
            inside = tracker.report()
        del e, c16
        dw = x.T @ to32(de)  # the chain rule through e = x @ W, by hand
        del de
        dc = to32(dc)
        dc *= lr
        c[...] -= dc  # SGD, in place
        dw *= lr
        w[...] -= dw
        return float(loss), (inside if measure_loss_call else None)

    if gpu:
        print(f"  warm-up step (compiles and loads the kernels): loss {step(False)[0]:.4f}")
        sync()
    pool = xp.get_default_memory_pool() if gpu else None
    with tracker:
        if pool is not None:
            print(f"memory pool before: used {fmt(pool.used_bytes())}, held {fmt(pool.total_bytes())}")
        before = pool.used_bytes() if pool is not None else tracemalloc.get_traced_memory()[0]
        losses, inside = [], None
        t0 = time.perf_counter()
        for i in range(args.steps):  # the last step measures the loss call alone
            loss, ins = step(measure_loss_call=(i == args.steps - 1))
            losses.append(loss)
            inside = ins or inside
            print(f"  step {i + 1}: loss {loss:.4f}")
        sync()
        elapsed = time.perf_counter() - t0
        tracker.reset()  # one more step, measured whole
        loss, _ = step(False)
        sync()
        whole_peak, whole_largest = tracker.report()
        after = pool.used_bytes() if pool is not None else tracemalloc.get_traced_memory()[0]
        if pool is not None:
            print(f"memory pool after:  used {fmt(pool.used_bytes())}, held {fmt(pool.total_bytes())}")
    print(
        f"{args.steps} SGD steps in {elapsed:.2f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f} "
        f"(log V = {np.log(v):.4f}); one more step: {loss:.4f}"
    )
    in_peak, in_largest = inside
    outputs = n * d * 2 + v * d * 2 if gpu else n * d * 4 + v * d * 4
    print(
        f"inside linear_cross_entropy_with_grad: peak {fmt(in_peak)} above what was in use before the call "
        f"(its outputs dE and dC alone: {fmt(outputs)}); largest single allocation {fmt(in_largest)}"
    )
    print(
        f"whole step (projection, loss, chain rule, SGD): peak {fmt(whole_peak)} above the weights and data; "
        f"largest single allocation {fmt(whole_largest)}"
    )
    print(f"in use before {fmt(before)}, after {fmt(after)} (the step returns what it allocates)")
    print(f"N x V x 4 bytes = {fmt(nv4)}")
    limit = n * v * 2
    worst = max(b for b in (in_peak, in_largest, whole_peak, whole_largest) if b is not None)
    if worst >= limit:
        print(f"FAIL: {fmt(worst)} >= N x V x 2 bytes: something N x V-sized was allocated")
        return 1
    print(f"OK: no allocation, and no peak, reached even N x V x 2 bytes ({fmt(limit)}): nothing N x V was allocated")
    if gpu:
        cce.check_targets()
    return 0


if __name__ == "__main__":
    sys.exit(main())
