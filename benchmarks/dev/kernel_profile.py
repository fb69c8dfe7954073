"""Where the backward's time goes: every kernel launch of one backward call timed with CUDA events.

For kernel development on the device: wraps the launchers' kernels (and the cuBLAS GEMM helper)
so that each launch is bracketed by a pair of events, then prints per kernel the launch count and
the summed GPU time (event to event, so it includes the GPU waiting for a slow host) and the host
time spent in each launch call, next to the wall time of the whole call.
Usage: python -m benchmarks.dev.kernel_profile [--shape N,D,V]
"""

from __future__ import annotations

import argparse
import collections
import time

import cupy as cp
import ml_dtypes
import numpy as np

from cce_cupy.cuda import backward as cuda_backward
from cce_cupy.cuda import forward as cuda_forward
from cce_cupy.cuda import plan
from cce_cupy.cuda import sparse as cuda_sparse
from cce_cupy.options import CCEOptions, row_coefficients


def launch_times(run, gemm_name=lambda trans_a, accumulate: "cublas_gemm") -> dict[str, list]:
    """{name: [launches, GPU ms, host ms]} of every kernel and cuBLAS GEMM that run() launches,
    summed by kernel name (the GEMMs by gemm_name(trans_a, accumulate)). Each launch is bracketed
    by a pair of events, so its GPU time includes the GPU waiting for a slow host."""
    marks = []  # (name, start event, end event, host seconds in the call)
    launchers = (cuda_forward, cuda_backward, cuda_sparse)  # each calls its own get_kernel
    real_gets, real_gemm = [m.get_kernel for m in launchers], cuda_backward._gemm_rowmajor

    def bracket(name, fn):
        def call(*args, **kwargs):
            s, t = cp.cuda.Event(), cp.cuda.Event()
            s.record()
            h0 = time.perf_counter()
            out = fn(*args, **kwargs)
            host = time.perf_counter() - h0
            t.record()
            marks.append((name, s, t, host))
            return out

        return call

    def gemm(a, b, out, *, trans_a, accumulate):
        return bracket(gemm_name(trans_a, accumulate), real_gemm)(a, b, out, trans_a=trans_a, accumulate=accumulate)

    for m, real_get in zip(launchers, real_gets):
        m.get_kernel = lambda filename, name, real_get=real_get: bracket(name.split("<")[0], real_get(filename, name))
    cuda_backward._gemm_rowmajor = gemm
    try:
        run()
        cp.cuda.Device().synchronize()
    finally:
        for m, real_get in zip(launchers, real_gets):
            m.get_kernel = real_get
        cuda_backward._gemm_rowmajor = real_gemm
    per: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for name, s, t, host in marks:
        per[name][0] += 1
        per[name][1] += cp.cuda.get_elapsed_time(s, t)
        per[name][2] += host * 1e3
    return dict(per)


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
    cuda_forward.launch_forward(e, c, t, None, CCEOptions(), lse, tgt)
    de, dc = cp.empty((n, d), bf), cp.empty((v, d), bf)
    flt = CCEOptions(filter_eps="auto")
    runs = (
        ("exact", CCEOptions(), {}),
        ("filter_eps=auto, uniform logits", flt, {}),
        ("filter_eps=auto, host_sync=False (as in JAX: gated tiled kernels launched)", flt, {"host_sync": False}),
    )
    for label, o, kw in runs:
        cpp, cq = row_coefficients(cp, o, t != o.ignore_index, lse, 1.0)
        scratch = cp.empty(plan.backward_scratch_nbytes(n, v, d, e.dtype, o), cp.uint8)

        def backward(o=o, kw=kw, cpp=cpp, cq=cq, scratch=scratch):
            cuda_backward.launch_backward(e, c, t, None, o, lse, cpp, cq, de, dc, None, scratch, **kw)

        backward()  # compiles and warms up
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        per = launch_times(backward)
        wall = (time.perf_counter() - t0) * 1e3
        print(
            f"--- backward {label}: N={n} D={d} V={v}, wall {wall:.2f} ms, "
            f"rows/chunk plan {plan.backward_blocking(n, v, d, e.dtype, o)}"
        )
        for name, (count, ms, host_ms) in sorted(per.items(), key=lambda kv: -kv[1][1]):
            print(
                f"  {name:32s} {count:5d} launches {ms:9.2f} ms GPU ({ms / count * 1e3:7.1f} us each), "
                f"host {host_ms / count * 1e3:6.1f} us per launch call"
            )


if __name__ == "__main__":
    main()
