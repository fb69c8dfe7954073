"""Dev (experiment): the Hopper kernels' warpgroup lag (h_wg_lag in lce_hopper.cu): consumer
warpgroup 1 starts that many k-blocks after warpgroup 0, so that one's epilogue can overlap the
other's MMAs. Times the lean forward, the lean fwd+bwd and the budgeted fwd+bwd per lag against the
cuBLAS floors, in shuffled rounds (median ms).

    PYTHONPATH=. python benchmarks/dev/wg_lag.py [--lags 0,1,2,3,4] [--rounds 7]
"""

import argparse
import json
import random
import statistics

import cupy as cp
import numpy as np

import cce_cupy as cce
from benchmarks.dev.budget_timing import gemm_floors, make_inputs, timed
from cce_cupy.cuda import loader


def set_lag(lag: int) -> None:
    """h_wg_lag in every loaded module of lce_hopper.cu."""
    for (_dev, filename, _group), (module, _lowered) in loader._MODULES.items():
        if filename == "lce_hopper.cu" and module is not None:
            ptr = module.get_global_var("h_wg_lag")
            ptr = ptr[0] if isinstance(ptr, tuple) else ptr
            value = np.array([lag], np.int32)
            cp.cuda.runtime.memcpy(ptr, value.ctypes.data, 4, cp.cuda.runtime.memcpyHostToDevice)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lags", default="0,1,2,3,4")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="gemma2,llama3")
    args = ap.parse_args()
    lags = [int(x) for x in args.lags.split(",")]
    for shape in args.shapes.split(","):
        e, c, t = make_inputs(shape)
        gemm3, gemm4 = gemm_floors(e, c)
        logits = cp.empty((e.shape[0], c.shape[0]), e.dtype)
        calls = {
            "cublas_fwd": lambda: cp.matmul(e, c.T, out=logits),
            "gemm3": gemm3,
            "gemm4": gemm4,
        }
        for lag in lags:
            calls[f"fwd_lag{lag}"] = (lag, lambda: cce.linear_cross_entropy(e, c, t))
            calls[f"lean_lag{lag}"] = (lag, lambda: cce.linear_cross_entropy_with_grad(e, c, t))
            calls[f"budget_lag{lag}"] = (
                lag,
                lambda: cce.linear_cross_entropy_with_grad(e, c, t, memory_budget=4 << 30),
            )
        for fn in calls.values():  # load every module, tune, warm up
            (fn[1] if isinstance(fn, tuple) else fn)()
        ref = None
        for lag in lags:  # the lag changes timing only: every result bitwise equal
            set_lag(lag)
            got = cce.linear_cross_entropy_with_grad(e, c, t, memory_budget=4 << 30)
            lean = cce.linear_cross_entropy_with_grad(e, c, t)
            got = [cp.asarray(x).astype(cp.float32) for x in (*got, *lean)]
            ref = ref or got
            diff = max(float(cp.abs(a - b).max()) for a, b in zip(got, ref))
            print(f"{shape} lag {lag}: max |result - lag {lags[0]}'s| = {diff}", flush=True)
        times = {k: [] for k in calls}
        for _ in range(args.rounds):
            order = list(calls)
            random.shuffle(order)
            for k in order:
                fn = calls[k]
                if isinstance(fn, tuple):
                    set_lag(fn[0])
                    fn = fn[1]
                times[k].append(timed(fn))
        set_lag(0)
        med = {k: round(statistics.median(v), 3) for k, v in times.items()}
        out = {"shape": shape, "ms": med}
        out["fwd/cublas"] = {k: round(med[k] / med["cublas_fwd"], 4) for k in med if k.startswith("fwd_")}
        out["lean/gemm4"] = {k: round(med[k] / med["gemm4"], 4) for k in med if k.startswith("lean_")}
        out["budget/gemm3"] = {k: round(med[k] / med["gemm3"], 4) for k in med if k.startswith("budget_")}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
