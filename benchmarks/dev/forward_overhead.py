"""Where the forward's time goes beyond cuBLAS: for each shape, in alternating rounds (median, so
clock drift hits every row alike), each timed with CUDA events after a device synchronize (as
bench.py does, so host time before the first launch counts):

  cublas         cupy.matmul(e, c.T) into a preallocated (N, V) buffer: the floor
  kernels        cuda_forward.launch_forward alone (partials + finish kernels, preallocated outputs)
  api            cce_cupy.linear_cross_entropy (validation, allocation, the loss reduction too)
  tiles=T        launch_forward with blocks of exactly T tiles (--tiles)

plus the host time of each call and, for `kernels`, the GPU time of each kernel.
Usage: python -m benchmarks.dev.forward_overhead [--shapes gemma2,llama3] [--tiles 8,16,32]
"""

from __future__ import annotations

import argparse
import collections
import time

import cupy as cp
import ml_dtypes
import numpy as np

import cce_cupy as cce
from benchmarks.dev.kernel_profile import launch_times
from benchmarks.providers import SHAPES
from cce_cupy.cuda import forward as cuda_forward
from cce_cupy.cuda import plan
from cce_cupy.options import CCEOptions


def timed(fn):
    """(GPU ms from a drained queue, host ms in the call)."""
    cp.cuda.Device().synchronize()
    s, t = cp.cuda.Event(), cp.cuda.Event()
    s.record()
    h0 = time.perf_counter()
    fn()
    h1 = time.perf_counter()
    t.record()
    t.synchronize()
    return cp.cuda.get_elapsed_time(s, t), (h1 - h0) * 1e3


def host_stages(call, calls: int = 20) -> None:
    """Mean host microseconds per call of each stage of the API's forward (each wrapped with a
    clock, so nested stages are included in their callers)."""
    from cce_cupy import api
    from cce_cupy.cuda import autotune

    stages = {
        (api, "_prepare"),
        (api, "_forward"),
        (api, "_loss_outputs"),
        (api, "_flat_targets"),
        (api, "_take"),
        (api, "check_linear_ce_args"),
        (api, "make_options"),
        (cuda_forward, "launch_forward"),
        (cuda_forward, "use_hopper"),
        (cuda_forward, "forward_splits"),
        (cuda_forward, "hopper_operands"),
        (cuda_forward, "target_error_flag"),
        (cuda_forward, "template_name"),
        (cuda_forward, "gpu_name"),
        (autotune, "hopper_cluster"),
        (cuda_forward, "get_kernel"),
    }
    spent: dict[str, float] = collections.defaultdict(float)
    real = {(mod, name): getattr(mod, name) for mod, name in stages}

    def clocked(label, fn):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[label] += time.perf_counter() - t0

        return run

    for (mod, name), fn in real.items():
        setattr(mod, name, clocked(f"{mod.__name__.split('.')[-1]}.{name}", fn))
    real_get = real[(cuda_forward, "get_kernel")]

    def get_kernel(f, name):  # the launch itself, as "kernel launch"
        return clocked("kernel launch", real_get(f, name))

    cuda_forward.get_kernel = get_kernel
    try:
        call()
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        total = time.perf_counter() - t0
        cp.cuda.Device().synchronize()
    finally:
        for (mod, name), fn in real.items():
            setattr(mod, name, fn)
    print(f"host per API call {total / calls * 1e6:.0f} us; by stage (mean us a call, nested stages included):")
    for label, sec in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {label:32s} {sec / (calls + 1) * 1e6:8.1f}")


def with_tiles(tiles: int, fn):
    """fn with the Hopper forward split into blocks of exactly `tiles` tiles."""

    def splits(n, v, tile_n=plan.TILE_N):
        if tile_n != plan.HOPPER_TILE_N:
            return real(n, v, tile_n)
        per_split = tiles * tile_n
        return -(-v // per_split), per_split

    def run():
        cuda_forward.forward_splits = plan.forward_splits = splits
        try:
            return fn()
        finally:
            cuda_forward.forward_splits = plan.forward_splits = real

    real = plan.forward_splits
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="gemma2,llama3")
    ap.add_argument("--tiles", default="", help="tiles a block to time, e.g. 8,16,32")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--host-profile", action="store_true", help="cProfile 20 API calls: where the host time goes")
    args = ap.parse_args()
    bf = ml_dtypes.bfloat16
    for shape in args.shapes.split(","):
        n, d, v = SHAPES[shape]
        e = cp.random.standard_normal((n, d), dtype=cp.float32).astype(bf)
        c = (cp.random.standard_normal((v, d), dtype=cp.float32) / np.sqrt(d)).astype(bf)
        t = cp.random.randint(0, v, n).astype(cp.int64)
        lse, tgt = cp.empty(n, cp.float32), cp.empty(n, cp.float32)
        logits = cp.empty((n, v), bf)
        o = CCEOptions()
        scratch = cp.empty(plan.FORWARD_PARTIALS_BYTES * 2, cp.uint8)
        kernels = lambda: cuda_forward.launch_forward(e, c, t, None, o, lse, tgt, scratch)  # noqa: E731
        runs = {
            "cublas": lambda: cp.matmul(e, c.T, out=logits),
            "kernels": kernels,
            "api": lambda: cce.linear_cross_entropy(e, c, t),
        }
        for tiles in filter(None, args.tiles.split(",")):
            runs[f"tiles={tiles}"] = with_tiles(int(tiles), kernels)
        for fn in runs.values():
            fn()  # compile, autotune, warm
        gpu, host = collections.defaultdict(list), collections.defaultdict(list)
        for _ in range(args.rounds):
            for name, fn in runs.items():
                g, h = timed(fn)
                gpu[name].append(g)
                host[name].append(h)
        floor = float(np.median(gpu["cublas"]))
        print(f"=== {shape} N={n} D={d} V={v}")
        for name in runs:
            ms = float(np.median(gpu[name]))
            extra = ""
            if name == "kernels":
                extra = f"  (splits, columns per split) {plan.forward_splits(n, v, plan.HOPPER_TILE_N)}"
            if name.startswith("tiles="):
                split = with_tiles(int(name[6:]), lambda: plan.forward_splits(n, v, plan.HOPPER_TILE_N))()
                extra = f"  (splits, columns per split) {split}"
            print(
                f"{name:10s} GPU {ms:8.3f} ms ({ms / floor:.3f}x cuBLAS) [{min(gpu[name]):.3f}-"
                f"{max(gpu[name]):.3f}]  host in the call {float(np.median(host[name])):7.3f} ms{extra}"
            )
        per = launch_times(kernels)
        print("kernels:", ", ".join(f"{k} {ms:.3f} ms" for k, (_, ms, _) in per.items()))
        if args.host_profile:
            host_stages(lambda: cce.linear_cross_entropy(e, c, t))
        logits = None
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
