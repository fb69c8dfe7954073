"""How much of a timed call is host time before its GPU work: each provider of budget_timing.py timed
three ways, in shuffled rounds at the model shapes.

    python -m benchmarks.dev.host_overhead [--rounds 7] [--shapes gemma2,llama3]

- `ms`: events around the call on an idle GPU (how bench.py and budget_timing.py time it), so the
  host's work before its first kernel counts;
- `gpu_ms`: the same events with a ~5 ms spin kernel queued ahead, so the host has issued the call
  before the GPU reaches the start event (the GPU's own time, as in a training loop whose host runs
  ahead);
- `host_ms`: the host's wall time to issue the call (behind the spin, no sync);
- `prefix`: for the budgeted call, the host's time from the call to its forward kernel's launch and
  the GPU's time from the start event to that launch (idle but for the small kernels before it).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import cupy as cp

import cce_cupy as cce
from benchmarks.dev.budget_timing import gemm_floors, make_inputs

_SPIN = cp.RawKernel(
    r"""
extern "C" __global__ void spin(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {}
}""",
    "spin",
)
SPIN_CYCLES = 10_000_000  # ~5 ms at the H200's ~2 GHz: longer than any call's host work


def timed(run, spin: bool) -> tuple[float, float]:
    """(GPU ms between events around run(), host ms to issue run())."""
    start, end = cp.cuda.Event(), cp.cuda.Event()
    if spin:
        _SPIN((1,), (1,), (SPIN_CYCLES,))
    start.record()
    t0 = time.perf_counter()
    run()
    host = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end), host


def prefix(e, c, t, budget: int, calls: int = 15) -> dict:
    """Median host and GPU ms from a budgeted call's start to its forward launch (idle GPU)."""
    from cce_cupy.cuda import budget as mod

    real = mod.launch_forward
    marks = {}

    def fwd(*a, **k):
        marks["host"] = time.perf_counter()
        marks["event"] = cp.cuda.Event()
        marks["event"].record()
        real(*a, **k)

    host, gpu = [], []
    mod.launch_forward = fwd
    try:
        for _ in range(calls):
            cp.cuda.Device().synchronize()
            start = cp.cuda.Event()
            start.record()
            t0 = time.perf_counter()
            cce.linear_cross_entropy_with_grad(e, c, t, memory_budget=budget)
            cp.cuda.Device().synchronize()
            host.append((marks["host"] - t0) * 1e3)
            gpu.append(cp.cuda.get_elapsed_time(start, marks["event"]))
    finally:
        mod.launch_forward = real
    return {"host_ms": round(statistics.median(host), 3), "gpu_ms": round(statistics.median(gpu), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="gemma2,llama3")
    ap.add_argument("--budget-mib", type=int, default=4096)
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        e, c, t = make_inputs(shape)
        gemm3, _ = gemm_floors(e, c)
        budget = args.budget_mib << 20
        providers = {
            "gemm3": gemm3,
            "budget": lambda: cce.linear_cross_entropy_with_grad(e, c, t, memory_budget=budget),
        }
        runs = {(k, spin): [] for k in providers for spin in (False, True)}
        for key in runs:  # warm-up
            timed(providers[key[0]], key[1])
        for _ in range(args.rounds):
            order = list(runs)
            random.shuffle(order)
            for key in order:
                runs[key].append(timed(providers[key[0]], key[1]))
        out = {"shape": shape}
        for k in providers:
            idle, spun = runs[(k, False)], runs[(k, True)]
            out[k] = {
                "ms": round(statistics.median(g for g, _ in idle), 3),
                "gpu_ms": round(statistics.median(g for g, _ in spun), 3),
                "host_ms": round(statistics.median(h for _, h in spun), 3),
            }
        out["budget_over_gemm3"] = round(out["budget"]["ms"] / out["gemm3"]["ms"], 4)
        out["budget_over_gemm3_gpu"] = round(out["budget"]["gpu_ms"] / out["gemm3"]["gpu_ms"], 4)
        out["budget_prefix"] = prefix(e, c, t, budget)
        print(json.dumps(out), flush=True)
        e = c = gemm3 = None
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
