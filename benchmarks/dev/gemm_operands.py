"""Why the budgeted path's two GEMMs run slower than the floor's (issue 17): the same cuBLAS GEMM
shapes timed on the floor's operand (the logits G) and on the budget's (the kept exps s), with a
bf16 or an fp32 output, in shuffled rounds.

    python -m benchmarks.dev.gemm_operands [--rounds 7] [--shapes gemma2,llama3] [--out FILE]

Providers, per shape (N, D, V), all through cce_cupy.cuda.device._gemm_rowmajor (the budget's call)
unless named "matmul" (the floor's cupy.matmul):
    de_{g,s}_{bf16,f32}: X (N, V) @ C -> (N, D);  dc_{g,s}: X^T @ E -> (V, D), bf16;
    de_g_matmul, dc_g_matmul: the floor's own calls.
s = exp(y - c_i) in bf16 (c_i: the row's target logit), as lce_hopper.cu's ROW store writes it.
"""

from __future__ import annotations

import argparse
import json
import statistics

import cupy as cp

from benchmarks.dev.budget_timing import make_inputs, shuffled_rounds
from cce_cupy.cuda.device import _gemm_rowmajor


def providers_for(shape: str) -> dict:
    e, c, t = make_inputs(shape)
    n, d = e.shape
    v = c.shape[0]
    g = cp.matmul(e, c.T)  # the floor's G: the logits, bf16
    y = g.astype(cp.float32)
    s = cp.exp(y - y[cp.arange(n), t][:, None]).astype(e.dtype)
    del y
    de16, de32 = cp.empty((n, d), e.dtype), cp.empty((n, d), cp.float32)
    dc16 = cp.empty((v, d), e.dtype)
    out = {}
    for name, x in (("g", g), ("s", s)):
        out[f"de_{name}_bf16"] = lambda x=x: _gemm_rowmajor(x, c, de16, trans_a=False, accumulate=False)
        out[f"de_{name}_f32"] = lambda x=x: _gemm_rowmajor(x, c, de32, trans_a=False, accumulate=False)
        out[f"dc_{name}"] = lambda x=x: _gemm_rowmajor(x, e, dc16, trans_a=True, accumulate=False)
    out["de_g_matmul"] = lambda: cp.matmul(g, c, out=de16)
    out["dc_g_matmul"] = lambda: cp.matmul(g.T, e, out=dc16)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="gemma2,llama3")
    ap.add_argument("--out")
    args = ap.parse_args()
    records = []
    for shape in args.shapes.split(","):
        providers = providers_for(shape)
        times = shuffled_rounds(providers, args.rounds)
        for k, ts in times.items():
            rec = {"shape": shape, "provider": k, "ms": statistics.median(ts), "spread_ms": max(ts) - min(ts)}
            records.append(rec)
            print(f"{shape:8s} {k:14s} {rec['ms']:8.3f} ms (spread {rec['spread_ms']:.3f})", flush=True)
        del providers
        cp.get_default_memory_pool().free_all_blocks()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
