"""Development timing of the certified filter against the exact call and the cuBLAS floor, at the
model shapes, in shuffled rounds (median ms), with each data set's certified fraction.

    python benchmarks/dev/filter_timing.py [--rounds 7] [--shapes gemma2,llama3] [--out FILE]

Providers: gemm3 (E @ C^T, G @ C, G^T @ E), exact (linear_cross_entropy_with_grad), filtered (the
same with filter_eps="auto": candidates from the forward, cce_cupy.cuda.filtered; repeated calls, so
on data that does not certify 15 of 16 run exact: cce_cupy.cuda.filter_history), filtered_probe
(the same with that history cleared before each call: every call runs the filter) and
filtered_recompute (forward, then backward with filter_eps: the recompute pass builds the lists, as
under JAX). Data: "uniform" (logits of a few units: nothing certifies), "sharp" (the target ~22
and two distractors ~20 above a N(0, ~1) background, conftest.make_sharp_problem at scale: most
rows certify) and "long_tailed" (bench.py's: a Zipf prior, thousands of candidates a row).
"""

from __future__ import annotations

import argparse
import json
import statistics

import cupy as cp
import numpy as np

import cce_cupy as cce
from benchmarks.dev.budget_timing import SHAPES, gemm_floors, make_inputs, shuffled_rounds
from cce_cupy.cuda import filtered
from cce_cupy.cuda.autotune import time_on_stream
from cce_cupy.cuda.filter_history import HISTORY
from cce_cupy.options import CCEOptions


def make_sharp(shape: str, seed: int = 0):
    import ml_dtypes

    n, d, v = SHAPES[shape]
    rng = cp.random.default_rng(seed)
    c = rng.standard_normal((v, d), dtype=cp.float32) / np.float32(np.sqrt(d))
    t = rng.integers(0, v, n).astype(cp.int32)
    hot = rng.integers(0, v, (n, 2))

    def unit_logit(j):  # e . c_j = 1 along c_j
        return c[j] / (c[j] ** 2).sum(1, keepdims=True)

    e = 0.3 * rng.standard_normal((n, d), dtype=cp.float32) + 22 * unit_logit(t)
    e += 20 * (unit_logit(hot[:, 0]) + unit_logit(hot[:, 1]))
    return e.astype(ml_dtypes.bfloat16), c.astype(ml_dtypes.bfloat16), t


def make_long_tailed(shape: str, seed: int = 0):
    """bench.py's long_tailed data (a Zipf prior, loss ~4 nats) at this shape, bf16."""
    import ml_dtypes

    from benchmarks.providers.problem import _long_tailed, _Rng

    n, d, v = SHAPES[shape]
    e, c, t = _long_tailed(cp, _Rng(cp, seed), n, d, v)
    return e.astype(ml_dtypes.bfloat16), c.astype(ml_dtypes.bfloat16), t.astype(cp.int32)


def make_data(shape: str, data: str):
    makers = {"uniform": make_inputs, "sharp": make_sharp, "long_tailed": make_long_tailed}
    if data not in makers:
        raise ValueError(f"--data: {data!r} is not one of {', '.join(makers)}")
    return makers[data](shape)


def stage_times(e, c, t, o, g, lse, tgt, de, dc, calls: int = 5) -> dict:
    """Median ms of each stage of the fused filtered call (its events), and of the forward alone
    with and without its lists (launch_forward, STORE NONE against LISTS, alternating)."""
    from cce_cupy.cuda import forward as cuda_forward

    per_stage: dict[str, list[float]] = {}
    for _ in range(calls):
        events: list = []
        filtered.launch_fused_filtered(
            e, c, t, None, o, t != o.ignore_index, g, lse, tgt, de, dc, None, None, None, events
        )
        events[-1][1].synchronize()
        for (_, a), (name, b) in zip(events, events[1:]):
            per_stage.setdefault(name, []).append(cp.cuda.get_elapsed_time(a, b))
    out = {k: statistics.median(v) for k, v in per_stage.items()}
    plain = lambda: cuda_forward.launch_forward(e, c, t, None, CCEOptions(), lse, tgt)  # noqa: E731
    fwd = {"forward_plain": [], "forward_with_lists": []}
    for _ in range(calls):
        fwd["forward_plain"].append(time_on_stream(plain))
        ev: list = []
        filtered.launch_fused_filtered(e, c, t, None, o, t != o.ignore_index, g, lse, tgt, de, dc, None, None, None, ev)
        ev[-1][1].synchronize()
        fwd["forward_with_lists"].append(cp.cuda.get_elapsed_time(ev[1][1], ev[2][1]))
    out.update({k: statistics.median(v) for k, v in fwd.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="gemma2,llama3")
    ap.add_argument("--data", default="uniform,sharp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    records = []
    for shape in args.shapes.split(","):
        for data in args.data.split(","):
            e, c, t = make_data(shape, data)
            gemm3, _ = gemm_floors(e, c)

            def recompute():
                lse, _ = cce.forward(e, c, t)
                return cce.backward(e, c, t, lse, 1.0, filter_eps="auto")

            providers = {
                "gemm3": gemm3,
                "exact": lambda: cce.linear_cross_entropy_with_grad(e, c, t),
                "filtered": lambda: cce.linear_cross_entropy_with_grad(e, c, t, filter_eps="auto"),
                "filtered_probe": lambda: (
                    HISTORY.clear(),
                    cce.linear_cross_entropy_with_grad(e, c, t, filter_eps="auto"),
                ),
                "filtered_recompute": recompute,
            }
            times = shuffled_rounds(providers, args.rounds)
            stats = {}
            n, d = e.shape
            v = c.shape[0]
            lse, tgt = cp.empty(n, cp.float32), cp.empty(n, cp.float32)
            de, dc = cp.empty_like(e), cp.empty_like(c)
            o = CCEOptions(filter_eps="auto")
            g = cp.asarray(1.0, cp.float32)  # grad_loss, as the calls above
            filtered.launch_fused_filtered(e, c, t, None, o, t != o.ignore_index, g, lse, tgt, de, dc, None, stats)
            stages = stage_times(e, c, t, o, g, lse, tgt, de, dc)
            _, de_x, dc_x = cce.linear_cross_entropy_with_grad(e, c, t)

            def rdiff(a, b):
                a, b = a.astype(cp.float32), b.astype(cp.float32)
                return float(cp.linalg.norm(a - b) / cp.linalg.norm(b))

            ms = {k: statistics.median(ts) for k, ts in times.items()}
            rec = {
                "shape": shape,
                "data": data,
                "n": n,
                "d": d,
                "v": v,
                "ms": ms,
                "ratio_gemm3": {k: m / ms["gemm3"] for k, m in ms.items()},
                "ratio_exact": {k: m / ms["exact"] for k, m in ms.items()},
                "certified_fraction": 1.0 - stats["fallback_rows"] / max(stats["rows"], 1),
                "stages_ms": stages,
                "de_rel_vs_exact": rdiff(de, de_x),
                "dc_rel_vs_exact": rdiff(dc, dc_x),
            }
            records.append(rec)
            print(json.dumps(rec), flush=True)
            e = c = t = gemm3 = de = dc = de_x = dc_x = None
            cp.get_default_memory_pool().free_all_blocks()
    if args.out:
        with open(args.out, "w") as f:
            gpu = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
            json.dump({"gpu": gpu, "tool": "benchmarks/dev/filter_timing.py", "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
