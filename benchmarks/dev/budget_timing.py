"""Development timing of the memory-budgeted path against the lean path and the cuBLAS floors, at
the model shapes, in shuffled rounds (one call of every provider per round, median over rounds).

    python benchmarks/dev/budget_timing.py [--rounds 7] [--budgets 4096,1024] [--out FILE]

Floors: gemm3 = E @ C^T, G @ C, G^T @ E (what a loss keeping its logits runs); gemm4 adds the
recompute. Budgets in MiB. Prints ms, ratio to gemm3, the scratch bytes the budgeted path
allocates (plan.nbytes) and the extra memory a call holds (extra_mib: the pool's peak during it less
what it returns; with several chunks, the fp32 dC accumulator too). Also the budgeted result's
difference from the lean one.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import cupy as cp
import numpy as np

import cce_cupy as cce
from benchmarks.providers.measure import CupyPeak
from cce_cupy.cuda import budget as cuda_budget
from cce_cupy.cuda.autotune import time_on_stream
from cce_cupy.options import CCEOptions

SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256), "quack": (4096, 4096, 128256)}


def make_inputs(shape: str, seed: int = 0):
    """bf16 e (N, D), c (V, D) with logits of a few units (c scaled by 4 / sqrt(D)), int32 targets."""
    import ml_dtypes

    n, d, v = SHAPES[shape]
    rng = cp.random.default_rng(seed)
    e = rng.standard_normal((n, d), dtype=cp.float32).astype(ml_dtypes.bfloat16)
    c = (rng.standard_normal((v, d), dtype=cp.float32) / np.sqrt(d) * 4).astype(ml_dtypes.bfloat16)
    return e, c, rng.integers(0, v, n).astype(cp.int32)


def shuffled_rounds(providers: dict, rounds: int) -> dict:
    """{name: [ms, ...]}: each provider called once untimed, then once a round in a shuffled order
    (a fixed order biases these GPUs' clocks)."""
    for fn in providers.values():
        fn()
    cp.cuda.Device().synchronize()
    times = {k: [] for k in providers}
    for _ in range(rounds):
        order = list(providers)
        random.shuffle(order)
        for k in order:
            times[k].append(time_on_stream(providers[k]))
    return times


def gemm_floors(e, c):
    """(gemm3, gemm4): the three GEMMs of a logit-keeping loss (E @ C^T, G @ C, G^T @ E, with the
    logits as G) and those plus the recompute, into buffers allocated here."""
    logits = cp.empty((e.shape[0], c.shape[0]), e.dtype)
    de, dc = cp.empty_like(e), cp.empty_like(c)

    def gemm3():
        cp.matmul(e, c.T, out=logits)
        cp.matmul(logits, c, out=de)
        cp.matmul(logits.T, e, out=dc)

    def gemm4():
        gemm3()
        cp.matmul(e, c.T, out=logits)

    return gemm3, gemm4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budgets", default="4096")
    ap.add_argument("--shapes", default="gemma2,llama3")
    ap.add_argument("--out", default=None)
    ap.add_argument("--breakdown", action="store_true", help="time each stage of the budgeted path")
    args = ap.parse_args()
    records = []
    for shape in args.shapes.split(","):
        n, d, v = SHAPES[shape]
        e, c, t = make_inputs(shape)
        gemm3, gemm4 = gemm_floors(e, c)
        providers = {"gemm3": gemm3, "gemm4": gemm4, "lean": lambda: cce.linear_cross_entropy_with_grad(e, c, t)}
        budgets = [int(b) << 20 for b in args.budgets.split(",")]
        for b in budgets:
            providers[f"budget_{b >> 20}MiB"] = lambda b=b: cce.linear_cross_entropy_with_grad(e, c, t, memory_budget=b)
        times = shuffled_rounds(providers, args.rounds)
        loss_l, de_l, dc_l = cce.linear_cross_entropy_with_grad(e, c, t)
        g3 = statistics.median(times["gemm3"])
        for k, ts in times.items():
            rec = {
                "shape": shape,
                "n": n,
                "d": d,
                "v": v,
                "provider": k,
                "ms": statistics.median(ts),
                "ratio_gemm3": statistics.median(ts) / g3,
            }
            if k.startswith("budget"):
                mb = int(k.split("_")[1][:-3]) << 20
                o = CCEOptions(memory_budget=mb)
                plan = cuda_budget.budget_plan(n, v, d, e.dtype, o, dc_later=True)  # as the API plans
                rec["memory_budget"] = mb
                rec["scratch_mib"] = None if plan is None else plan.nbytes / 2**20
                rec["rows_per_chunk"] = None if plan is None else plan.rows
                loss_b = de_b = dc_b = None  # an earlier call's outputs, freed inside, would offset the count
                with CupyPeak() as pool:  # what the call holds beyond its inputs and what it returns
                    loss_b, de_b, dc_b = cce.linear_cross_entropy_with_grad(e, c, t, memory_budget=mb)
                    cp.cuda.Device().synchronize()
                rec["extra_mib"] = (pool.peak - pool.hook.cur) / 2**20

                def rdiff(a, b):
                    a, b = a.astype(cp.float32), b.astype(cp.float32)
                    return float(cp.linalg.norm(a - b) / cp.linalg.norm(b))

                rec.update(
                    loss_diff=float(abs(loss_b - loss_l)),
                    de_rel_vs_lean=rdiff(de_b, de_l),
                    dc_rel_vs_lean=rdiff(dc_b, dc_l),
                )
            records.append(rec)
            print(json.dumps(rec), flush=True)
        e = c = gemm3 = gemm4 = de_l = dc_l = None  # free before the next shape
        cp.get_default_memory_pool().free_all_blocks()
    if args.breakdown:
        records += breakdown(args.shapes.split(","), int(args.budgets.split(",")[0]) << 20)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "records": records}, f, indent=1)


def breakdown(shapes, budget: int) -> list[dict]:
    """Per-stage times of one budgeted call (events around the forward and the GEMMs; the gradient
    pass and the bias reduction are the rest), median of 5 calls."""
    import ml_dtypes

    from cce_cupy.cuda import budget as mod

    out = []
    for shape in shapes:
        n, d, v = SHAPES[shape]
        e, c, t = make_inputs(shape)
        marks = []
        real_fwd, real_gemm = mod.launch_forward, mod._gemm_rowmajor

        def mark(tag):
            ev = cp.cuda.Event()
            ev.record()
            marks.append((tag, ev))

        def fwd(*a, **k):
            mark("start")
            real_fwd(*a, **k)
            mark("forward")

        def gemm(a, b, o, **k):
            mark("grad_pass" if not marks or marks[-1][0] == "forward" else "between")
            real_gemm(a, b, o, **k)
            mark("gemm_de" if not k["trans_a"] else "gemm_dc")

        mod.launch_forward, mod._gemm_rowmajor = fwd, gemm
        try:
            stages = {}
            for _ in range(6):
                marks.clear()
                cce.linear_cross_entropy_with_grad(e, c, t, memory_budget=budget)
                marks[-1][1].synchronize()
                for (_, a), (tag, b) in zip(marks, marks[1:]):
                    stages.setdefault(tag, []).append(cp.cuda.get_elapsed_time(a, b))
        finally:
            mod.launch_forward, mod._gemm_rowmajor = real_fwd, real_gemm
        rec = {"shape": shape, "breakdown_ms": {k: statistics.median(x[1:]) for k, x in stages.items()}}
        rec["lean_forward_ms"] = statistics.median(
            time_on_stream(lambda: cce.linear_cross_entropy(e, c, t)) for _ in range(5)
        )
        logits = cp.empty((n, v), ml_dtypes.bfloat16)
        rec["cublas_logits_ms"] = statistics.median(
            time_on_stream(lambda: cp.matmul(e, c.T, out=logits)) for _ in range(5)
        )
        logits = None
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


if __name__ == "__main__":
    main()
