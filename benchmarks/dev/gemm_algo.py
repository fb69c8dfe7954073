"""Dev: our cuBLAS calls with CUBLAS_GEMM_DEFAULT (-1) against CUBLAS_GEMM_DEFAULT_TENSOR_OP (99,
what cupy.matmul passes on sm_80+), on the lean and budgeted paths, shuffled rounds."""

import json
import random
import statistics

import cupy as cp
import ml_dtypes
import numpy as np

import cce_cupy as cce
from cce_cupy.cuda import device

bf16 = ml_dtypes.bfloat16


def timed(fn):
    a, b = cp.cuda.Event(), cp.cuda.Event()
    a.record()
    fn()
    b.record()
    b.synchronize()
    return cp.cuda.get_elapsed_time(a, b)


for name, (n, d, v) in {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}.items():
    rng = cp.random.default_rng(0)
    e = rng.standard_normal((n, d), dtype=cp.float32).astype(bf16)
    c = (rng.standard_normal((v, d), dtype=cp.float32) / np.sqrt(d) * 4).astype(bf16)
    t = rng.integers(0, v, n).astype(cp.int32)
    logits = cp.empty((n, v), bf16)
    de = cp.empty((n, d), bf16)
    dc = cp.empty((v, d), bf16)

    def gemm3():
        cp.matmul(e, c.T, out=logits)
        cp.matmul(logits, c, out=de)
        cp.matmul(logits.T, e, out=dc)

    def with_algo(algo, fn):
        def run():
            device._CUBLAS_GEMM_DEFAULT = algo
            fn()

        return run

    prov = {"gemm3": gemm3}
    for algo in (-1, 99):
        prov[f"lean_{algo}"] = with_algo(algo, lambda: cce.linear_cross_entropy_with_grad(e, c, t))
        prov[f"budget_{algo}"] = with_algo(
            algo, lambda: cce.linear_cross_entropy_with_grad(e, c, t, memory_budget=4 << 30)
        )
    for f in prov.values():
        f()
    cp.cuda.Device().synchronize()
    times = {k: [] for k in prov}
    for _ in range(7):
        order = list(prov)
        random.shuffle(order)
        for k in order:
            times[k].append(timed(prov[k]))
    g3 = statistics.median(times["gemm3"])
    print(
        json.dumps(
            {
                "shape": name,
                **{k: round(statistics.median(x), 3) for k, x in times.items()},
                **{f"{k}/gemm3": round(statistics.median(x) / g3, 4) for k, x in times.items()},
            }
        ),
        flush=True,
    )
    e = c = logits = de = dc = None
    cp.get_default_memory_pool().free_all_blocks()
    device._CUBLAS_GEMM_DEFAULT = -1
