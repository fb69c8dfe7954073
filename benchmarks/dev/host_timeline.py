"""Where a memory-budgeted call spends its host time before the forward kernel's launch: the
timeline (enter/exit, microseconds from the call's start) of the functions it goes through, median
of 15 calls on an idle GPU. Development only: it wraps module attributes while it runs.

    python -m benchmarks.dev.host_timeline [--shape llama3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import cupy as cp

import cce_cupy as cce
from benchmarks.dev.budget_timing import make_inputs
from cce_cupy import api
from cce_cupy.cuda import budget, device, forward, loader

# (module, attribute) pairs to time; a module's own reference is the one its callers use.
TRACED = [
    (api, "_prepare"),
    (api, "_take"),
    (api, "check_linear_ce_args"),
    (api, "_flat_targets"),
    (type(api._WATCH), "poll"),
    (api, "_grad_loss_array"),
    (api, "row_loss_grads"),
    (api, "_fused_outputs"),
    (budget, "budget_plan"),
    (api.cuda_budget, "budget_applies"),
    (budget, "launch_fused_budgeted"),
    (budget, "launch_target_logits"),
    (budget, "launch_forward"),
    (forward, "tma_desc"),
    (forward, "get_kernel"),
    (loader.Kernel, "__call__"),
    (device, "_gemm_rowmajor"),
    (api, "make_options"),
    (api, "_loss_outputs"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3")
    ap.add_argument("--calls", type=int, default=15)
    args = ap.parse_args()
    e, c, t = make_inputs(args.shape)
    call = lambda: cce.linear_cross_entropy_with_grad(e, c, t, memory_budget=4096 << 20)  # noqa: E731
    for _ in range(3):
        call()
    events: list = []
    originals = []
    for mod, name in TRACED:
        if not hasattr(mod, name):
            continue
        fn = getattr(mod, name)
        originals.append((mod, name, fn))

        def wrapped(*a, _fn=fn, _tag=f"{getattr(mod, '__name__', mod)}.{name}", **k):
            events.append((_tag, "enter", time.perf_counter()))
            try:
                return _fn(*a, **k)
            finally:
                events.append((_tag, "exit", time.perf_counter()))

        setattr(mod, name, wrapped)
    table = defaultdict(list)
    try:
        for _ in range(args.calls):
            cp.cuda.Device().synchronize()
            events.clear()
            t0 = time.perf_counter()
            call()
            total = time.perf_counter() - t0
            cp.cuda.Device().synchronize()
            seen = defaultdict(int)
            for tag, kind, ts in events:
                seen[(tag, kind)] += 1
                table[(tag, kind, seen[(tag, kind)])].append((ts - t0) * 1e6)
            table[("call", "exit", 1)].append(total * 1e6)
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)
    rows = sorted(((statistics.median(v), k) for k, v in table.items()))
    for us, (tag, kind, i) in rows:
        print(f"{us:9.1f} us  {kind:5s} {tag} #{i}")


if __name__ == "__main__":
    main()
