"""Development timing of the budgeted row mode's dC GEMM (s^T @ (a E), cce_cupy.cuda.budget) whole
and split in two at a column of s, as a plan with dc_split runs it: at an odd split (the s operand of
the second GEMM then starts off a 16-byte boundary) and at one rounded down to a multiple of 64.

    python benchmarks/dev/split_gemm.py [--shape gemma2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics

import cupy as cp

from benchmarks.dev.budget_timing import SHAPES, make_inputs, shuffled_rounds
from cce_cupy.cuda.device import _gemm_rowmajor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="gemma2", choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    n, d, v = SHAPES[args.shape]
    e, c, _ = make_inputs(args.shape)
    s = cp.matmul(e, c.T)  # the kept softmax's shape and dtype; its values do not matter here
    dc = cp.empty_like(c)
    odd = v - 2 * n - 1 if (v - 2 * n) % 2 == 0 else v - 2 * n

    def split_at(k):
        def run():
            _gemm_rowmajor(s[:, :k], e, dc[:k], trans_a=True, accumulate=False)
            _gemm_rowmajor(s[:, k:], e, dc[k:], trans_a=True, accumulate=False)

        return run

    runs = {
        "whole": lambda: _gemm_rowmajor(s, e, dc, trans_a=True, accumulate=False),
        f"split_{odd}": split_at(odd),
        f"split_{odd // 64 * 64}": split_at(odd // 64 * 64),
    }
    times = shuffled_rounds(runs, args.rounds)
    for k, t in times.items():
        print(f"{args.shape} {k:>14}: {statistics.median(t):8.3f} ms (min {min(t):.3f}, {len(t)} rounds)")


if __name__ == "__main__":
    main()
