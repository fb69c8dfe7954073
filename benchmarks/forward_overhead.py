"""Where the forward's time goes beyond the kernel: the same gemma2-shaped forward timed three
ways on one stream, with CUDA events (median of 10, after 2 warm-ups):

  kernels   launch.launch_forward alone (partials + finish kernels, preallocated outputs)
  api       cce_cupy.linear_cross_entropy (validation, allocation, the loss reduction too)
  api_sync  the same, with a device synchronize before the start event (an idle, drained queue)

plus the host time of each call. Usage: python benchmarks/forward_overhead.py [--shape N,D,V]
"""

from __future__ import annotations

import argparse
import time

import cupy as cp
import ml_dtypes
import numpy as np

import cce_cupy as cce
from cce_cupy import launch
from cce_cupy.options import CCEOptions


def timed(fn, sync_first=False, reps=10):
    ms, host = [], []
    for i in range(reps + 2):
        if sync_first:
            cp.cuda.Device().synchronize()
        s, t = cp.cuda.Event(), cp.cuda.Event()
        s.record()
        h0 = time.perf_counter()
        fn()
        h1 = time.perf_counter()
        t.record()
        t.synchronize()
        if i >= 2:
            ms.append(cp.cuda.get_elapsed_time(s, t))
            host.append((h1 - h0) * 1e3)
    return float(np.median(ms)), float(np.median(host))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192,2304,256000")
    n, d, v = (int(x) for x in ap.parse_args().shape.split(","))
    bf = ml_dtypes.bfloat16
    e = cp.random.standard_normal((n, d), dtype=cp.float32).astype(bf)
    c = (cp.random.standard_normal((v, d), dtype=cp.float32) / np.sqrt(d)).astype(bf)
    t = cp.random.randint(0, v, n).astype(cp.int64)
    lse, tgt = cp.empty(n, cp.float32), cp.empty(n, cp.float32)
    o = CCEOptions()
    scratch = cp.empty(launch.forward_scratch_nbytes(n, v, d, e.dtype), cp.uint8)
    runs = {
        "kernels": (lambda: launch.launch_forward(e, c, t, None, o, lse, tgt, scratch), False),
        "api": (lambda: cce.linear_cross_entropy(e, c, t), False),
        "api_sync": (lambda: cce.linear_cross_entropy(e, c, t), True),
    }
    for name, (fn, sync_first) in runs.items():
        ms, host = timed(fn, sync_first)
        print(f"{name:9s} GPU (event to event) {ms:8.3f} ms   host in the call {host:7.3f} ms")


if __name__ == "__main__":
    main()
