"""Dev: our cuBLAS calls with CUBLAS_GEMM_DEFAULT (-1) against CUBLAS_GEMM_DEFAULT_TENSOR_OP (99,
what cupy.matmul passes on sm_80+), on the lean and budgeted paths, shuffled rounds.

    PYTHONPATH=. python benchmarks/dev/gemm_algo.py
"""

import json
import statistics

import cupy as cp

import cce_cupy as cce
from benchmarks.dev.budget_timing import gemm_floors, make_inputs, shuffled_rounds
from cce_cupy.cuda import device

for name in ("gemma2", "llama3"):
    e, c, t = make_inputs(name)
    gemm3, _ = gemm_floors(e, c)

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
    times = shuffled_rounds(prov, 7)
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
    e = c = gemm3 = None
    cp.get_default_memory_pool().free_all_blocks()
    device._CUBLAS_GEMM_DEFAULT = -1
