"""How the backward's blocking moves its time: the exact backward timed under several (gradient
chunk, dE accumulator) byte budgets, with a per-step breakdown (recompute, dC GEMM, dE GEMM, cast),
next to the three full-size cuBLAS GEMMs of the same shape. For kernel development on the device.

Each plan ('default', or chunk:acc[:rows[:both]]) sets cuda_plan.GRAD_CHUNK_BYTES and DE_ACC_BYTES
(MiB), BACKWARD_PART_ROWS and BACKWARD_BUFFERS_BYTES (their sum unless given), and runs launch_backward with
preallocated outputs and scratch; plans are timed in alternating rounds (median), so clock drift
hits them alike. --names prints the cuBLAS kernel each GEMM shape picks (torch.profiler, CUPTI).
Usage: python -m benchmarks.dev.backward_blocking [--shapes gemma2,llama3,NxDxV] [--plans default,32:24] [--names]
"""

from __future__ import annotations

import argparse
import collections

import cupy as cp
import ml_dtypes
import numpy as np

from benchmarks.dev.kernel_profile import launch_times
from benchmarks.providers import SHAPES
from cce_cupy.cuda import backward as cuda_backward
from cce_cupy.cuda import device
from cce_cupy.cuda import forward as cuda_forward
from cce_cupy.cuda import plan as cuda_plan
from cce_cupy.cuda.autotune import time_on_stream
from cce_cupy.options import CCEOptions, row_coefficients

DEFAULTS = {
    k: getattr(cuda_plan, k)
    for k in ("GRAD_CHUNK_BYTES", "DE_ACC_BYTES", "BACKWARD_BUFFERS_BYTES", "BACKWARD_PART_ROWS")
}


def set_plan(chunk_mib: int = 0, acc_mib: int = 0, part_rows: int = 1 << 30, buffers_mib: int = 0) -> None:
    """A plan's budgets; no arguments: the package's defaults."""
    if not chunk_mib:
        for k, val in DEFAULTS.items():
            setattr(cuda_plan, k, val)
        return
    cuda_plan.GRAD_CHUNK_BYTES = chunk_mib << 20
    cuda_plan.DE_ACC_BYTES = acc_mib << 20
    cuda_plan.BACKWARD_BUFFERS_BYTES = (buffers_mib or chunk_mib + acc_mib) << 20
    cuda_plan.BACKWARD_PART_ROWS = part_rows


def step_name(trans_a: bool, accumulate: bool) -> str:
    """The backward step a cuBLAS call of _BackwardPlan is."""
    return "dC GEMM (+=)" if trans_a and accumulate else "dC GEMM" if trans_a else "dE GEMM"


def breakdown(run) -> dict[str, float]:
    """GPU ms per step of one backward: each launch bracketed by events (adds small gaps)."""
    return {name: ms for name, (_, ms, _) in launch_times(run, step_name).items()}


def gemm_case(m: int, n: int, k: int, trans_a: bool, acc: bool, out_dtype):
    """A GEMM as _gemm_rowmajor runs it: out (M, N) (+)= op(a) @ b, b (K, N) row-major, a (M, K)
    or (K, M); returns (flops, fn)."""
    bf = ml_dtypes.bfloat16
    a = cp.random.standard_normal((k, m) if trans_a else (m, k), dtype=cp.float32).astype(bf)
    b = cp.random.standard_normal((k, n), dtype=cp.float32).astype(bf)
    out = cp.random.standard_normal((m, n), dtype=cp.float32).astype(out_dtype)
    return 2 * m * n * k, lambda: device._gemm_rowmajor(a, b, out, trans_a=trans_a, accumulate=acc)


def cublas_names(cases: dict) -> None:
    """Time each {label: (flops, fn)} GEMM and print the kernel cuBLAS runs (torch.profiler, CUPTI)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for label, (flops, fn) in cases.items():
        fn()
        cp.cuda.Device().synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ms = float(np.median([time_on_stream(fn) for _ in range(5)]))
            torch.cuda.synchronize()
        kernels = sorted({ev.name for ev in prof.events() if ev.device_type.name == "CUDA"})
        print(f"  cuBLAS {label}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s): {'; '.join(kernels)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="gemma2,llama3")
    ap.add_argument(
        "--plans",
        default="default,32:24,24:32,40:16",
        help="'default' or chunk MiB : dE accumulator MiB [: most rows a part [: both MiB]], ...",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--names", action="store_true")
    args = ap.parse_args()
    plans = [() if p == "default" else tuple(int(x) for x in p.split(":")) for p in args.plans.split(",")]
    bf = ml_dtypes.bfloat16
    o = CCEOptions()
    for shape in args.shapes.split(","):
        n, d, v = SHAPES[shape] if shape in SHAPES else (int(x) for x in shape.split("x"))
        e = cp.random.standard_normal((n, d), dtype=cp.float32).astype(bf)
        c = (cp.random.standard_normal((v, d), dtype=cp.float32) / np.sqrt(d)).astype(bf)
        t = cp.random.randint(0, v, n).astype(cp.int64)
        lse, tgt = cp.empty(n, cp.float32), cp.empty(n, cp.float32)
        cuda_forward.launch_forward(e, c, t, None, o, lse, tgt)
        cpp, cq = row_coefficients(cp, o, t != o.ignore_index, lse, 1.0)
        de, dc = cp.empty((n, d), bf), cp.empty((v, d), bf)
        g = (cp.random.standard_normal((n, v), dtype=cp.float32) / n).astype(bf)  # not zeros: they run faster
        floor = {
            "E@C^T": lambda: cp.matmul(e, c.T, out=g),
            "G@C": lambda: cp.matmul(g, c, out=de),
            "G^T@E": lambda: cp.matmul(g.T, e, out=dc),
        }
        runs = {}
        for plan in plans:
            set_plan(*plan)
            scratch = cp.empty(cuda_plan.backward_scratch_nbytes(n, v, d, e.dtype, o), cp.uint8)
            blocking = cuda_plan.backward_blocking(n, v, d, e.dtype, o)

            def run(plan=plan, scratch=scratch):
                set_plan(*plan)
                cuda_backward.launch_backward(e, c, t, None, o, lse, cpp, cq, de, dc, None, scratch)

            run()  # compile, warm
            runs[plan] = (run, blocking, scratch.nbytes)
        times = collections.defaultdict(list)
        for _ in range(args.rounds):
            for key, fn in floor.items():
                times[key].append(time_on_stream(fn))
            for plan, (run, _, _) in runs.items():
                times[plan].append(time_on_stream(run))
        med = {k: float(np.median(x)) for k, x in times.items()}
        gemm3 = med["E@C^T"] + med["G@C"] + med["G^T@E"]
        print(
            f"=== {shape} N={n} D={d} V={v}: cuBLAS E@C^T {med['E@C^T']:.2f}, G@C {med['G@C']:.2f}, "
            f"G^T@E {med['G^T@E']:.2f}; three GEMMs {gemm3:.2f} ms"
        )
        for plan, (run, blocking, nbytes) in runs.items():
            steps = breakdown(run)
            detail = ", ".join(f"{k} {ms:.2f}" for k, ms in sorted(steps.items(), key=lambda kv: -kv[1]))
            label = (
                "default"
                if not plan
                else f"chunk {plan[0]} MiB, dE acc {plan[1]} MiB" + (f", <= {plan[2]} rows" if len(plan) > 2 else "")
            )
            print(
                f"  plan {label} -> (rows, cols, acc) {blocking}, "
                f"scratch {nbytes / 2**20:.1f} MiB: backward {med[plan]:.2f} ms = {med[plan] / gemm3:.3f}x "
                f"[{', '.join(f'{x:.2f}' for x in times[plan])}]; steps: {detail}"
            )
        if args.names:
            set_plan(*plans[0])
            rows, cols, _ = cuda_plan.backward_blocking(n, v, d, e.dtype, o)
            cublas_names(
                {
                    "E@C^T (cupy.matmul)": (2 * n * d * v, floor["E@C^T"]),
                    f"dE chunk M={rows} N={d} K={cols} (+=, fp32)": gemm_case(rows, d, cols, False, True, cp.float32),
                    f"dC chunk M={cols} N={d} K={rows} (+=, bf16)": gemm_case(cols, d, rows, True, True, bf),
                }
            )
        g = floor = None
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
