"""Where the backward's time goes: every kernel launch of one backward call timed with CUDA events.

For kernel development on the device: wraps the launchers' kernels (and the cuBLAS GEMM helper)
so that each launch is bracketed by a pair of events, then prints per kernel the launch count and
the summed GPU time (event to event, so it includes the GPU waiting for a slow host) and the host
time spent in each launch call, next to the wall time of the whole call.
Usage: python benchmarks/kernel_profile.py [--shape N,D,V]
"""

from __future__ import annotations

import argparse
import collections
import time

import cupy as cp
import ml_dtypes
import numpy as np

from cce_cupy import launch
from cce_cupy.options import CCEOptions, row_coefficients

EVENTS: list[tuple[str, object, object, float]] = []  # (kernel, start, end, host seconds in the call)


def timed(name, fn):
    def call(*args, **kwargs):
        s, t = cp.cuda.Event(), cp.cuda.Event()
        s.record()
        h0 = time.perf_counter()
        out = fn(*args, **kwargs)
        host = time.perf_counter() - h0
        t.record()
        EVENTS.append((name, s, t, host))
        return out

    return call


def instrument():
    real_get = launch.get_kernel

    def get_kernel(filename, name):
        return timed(name.split("<")[0], real_get(filename, name))

    launch.get_kernel = get_kernel
    launch._gemm_rowmajor = timed("cublas_gemm", launch._gemm_rowmajor)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192,2304,256000")
    args = ap.parse_args()
    n, d, v = (int(x) for x in args.shape.split(","))
    bf = ml_dtypes.bfloat16
    e = cp.random.standard_normal((n, d), dtype=cp.float32).astype(bf)
    c = (cp.random.standard_normal((v, d), dtype=cp.float32) / np.sqrt(d)).astype(bf)
    t = cp.random.randint(0, v, n).astype(cp.int64)
    lse, tgt = cp.empty(n, cp.float32), cp.empty(n, cp.float32)
    launch.launch_forward(e, c, t, None, CCEOptions(), lse, tgt)
    de, dc = cp.empty((n, d), bf), cp.empty((v, d), bf)
    instrument()
    flt = CCEOptions(filter_eps="auto")
    runs = (("exact", CCEOptions(), {}), ("filter_eps=auto, uniform logits", flt, {}),
            ("filter_eps=auto, host_sync=False (as in JAX: gated tiled kernels launched)", flt, {"host_sync": False}))
    for label, o, kw in runs:
        cpp, cq = row_coefficients(cp, o, t != o.ignore_index, lse, 1.0)
        scratch = cp.empty(launch.backward_scratch_nbytes(n, v, d, e.dtype, o), cp.uint8)
        for rep in range(2):  # the first call compiles and warms up
            EVENTS.clear()
            cp.cuda.Device().synchronize()
            t0 = time.perf_counter()
            launch.launch_backward(e, c, t, None, o, lse, cpp, cq, de, dc, None, scratch, **kw)
            cp.cuda.Device().synchronize()
            wall = (time.perf_counter() - t0) * 1e3
        per = collections.defaultdict(lambda: [0, 0.0, 0.0])
        for name, s, t_ev, host in EVENTS:
            per[name][0] += 1
            per[name][1] += cp.cuda.get_elapsed_time(s, t_ev)
            per[name][2] += host * 1e3
        print(f"--- backward {label}: N={n} D={d} V={v}, wall {wall:.2f} ms, "
              f"rows/chunk plan {launch.backward_blocking(n, v, d, e.dtype, o)}")
        for name, (count, ms, host_ms) in sorted(per.items(), key=lambda kv: -kv[1][1]):
            print(f"  {name:32s} {count:5d} launches {ms:9.2f} ms GPU ({ms / count * 1e3:7.1f} us each), "
                  f"host {host_ms / count * 1e3:6.1f} us per launch call")


if __name__ == "__main__":
    main()
