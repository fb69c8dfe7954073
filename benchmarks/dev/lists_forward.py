"""What the certified filter's LISTS forward costs over the plain forward, by cause (dev, issue 14).

    python -m benchmarks.dev.lists_forward [--rounds 5] [--shapes gemma2] [--data uniform,long_tailed,sharp]

Providers per (shape, data), in shuffled rounds: plain (STORE NONE); lists (the filter's thresholds:
target logit + log eps - margin); collect (threshold 1e30: no candidate ever, so no list fills and
every tile runs the collecting exps); flood (threshold -1e30: every column a candidate, every list
full after its first slots).
"""

from __future__ import annotations

import argparse
import math
import statistics

import cupy as cp
import numpy as np

from benchmarks.dev.budget_timing import shuffled_rounds
from benchmarks.dev.filter_timing import make_data
from cce_cupy.cuda import filtered
from cce_cupy.cuda.budget import launch_target_logits
from cce_cupy.cuda.forward import KeptSoftmax, launch_forward
from cce_cupy.cuda.plan import forward_splits, sparse_slots
from cce_cupy.cuda.sources import HOPPER_TILE_N, SoftmaxStore
from cce_cupy.options import CCEOptions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default="gemma2")
    ap.add_argument("--data", default="uniform,long_tailed,sharp")
    args = ap.parse_args()
    plain_o, o = CCEOptions(), CCEOptions(filter_eps="auto")
    for shape in args.shapes.split(","):
        for data in args.data.split(","):
            e, c, t = make_data(shape, data)
            n, d = e.shape
            v = c.shape[0]
            slots = sparse_slots(n, d, e.dtype, o)
            lse, tgt = cp.empty(n, cp.float32), cp.empty(n, cp.float32)
            entries = cp.empty((n, slots), cp.int64)
            count = cp.zeros(n, cp.int32)
            other = cp.empty((forward_splits(n, v, HOPPER_TILE_N)[0], n), cp.float32)
            thr = cp.empty(n, cp.float32)
            launch_target_logits(e, c, t, None, o, cp.ones(n, cp.float32), thr, cp.empty(n, cp.float32))
            thr += np.float32(math.log(o.resolved_filter_eps()) - filtered.THRESHOLD_MARGIN)
            thresholds = {"lists": thr, "collect": cp.full(n, 1e30, cp.float32), "flood": cp.full(n, -1e30, cp.float32)}

            def lists_call(th):
                def run():
                    count.fill(0)
                    store = KeptSoftmax(SoftmaxStore.LISTS, entries, scales=other, row_shift=th, unsafe=count)
                    launch_forward(e, c, t, None, o, lse, tgt, None, None, True, store)

                return run

            providers = {"plain": lambda: launch_forward(e, c, t, None, plain_o, lse, tgt)}
            providers.update({k: lists_call(th) for k, th in thresholds.items()})
            times = shuffled_rounds(providers, args.rounds)
            ms = {k: statistics.median(ts) for k, ts in times.items()}
            full = int((count > slots).sum())  # after the last call (flood)
            print(
                shape, data, {k: round(m, 3) for k, m in ms.items()}, f"lists full after flood: {full}/{n}", flush=True
            )
            lists_call(thr)()
            counts = cp.asnumpy(count)
            print(
                f"  real thresholds: candidates/row pct 0/50/100 = {np.percentile(counts, [0, 50, 100])}, "
                f"overflowed {(counts > slots).mean():.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
