"""Time against memory for the exact fwd+bwd (issue 17): ours at each memory budget, the peers as points.

    python benchmarks/plot_budget.py --bench results/X-bench.json [--jax results/X-jax.json]
        [--timing results/X-budget-timing.json] -o out.png

One panel per shape (gemma2, llama3). y: fwd+bwd time over the three cuBLAS GEMMs of the same run
(E @ C^T, G @ C, G^T @ E: what a loss keeping its logits runs), so runs compare; x: extra memory
(MiB, log). Ours is a line through the lean path and each budget; the `--timing` run adds budgets
that bench.py did not time (its own three-GEMM floor), `--jax` the JAX providers of another run
(over that run's floor). Peers that the runs did not time (Liger, Apple CCE's exact mode) are drawn
hollow from ANCHORS, the independent H200 benchmark's figures over its own three GEMMs.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from cce_cupy.cuda.budget import MIN_CHUNK_ROWS

# ../shared/README.md (2026-11-30, H200, bf16): ms and extra MiB of fwd+bwd, and that benchmark's
# three GEMMs, per shape.
ANCHORS = {
    "gemma2": {"gemm3": 39.2, "liger": (110.3, 64), "apple_cce (exact)": (170.6, 2)},
    "llama3": {"gemm3": 35.9, "liger": (55.0, 63), "apple_cce (exact)": (159.4, 0.6)},
}


def points(bench: list[dict]) -> dict:
    """shape -> {"gemm3": ms, label: [(mib, ratio)]} from bench.py fwd_bwd records."""
    out: dict = defaultdict(lambda: defaultdict(list))
    gemm3 = {r["shape"]: r["ms"] for r in bench if r["provider"] == "cublas" and r["mode"] == "gemm_bwd_sum"}
    for r in bench:
        if r["mode"] != "fwd_bwd" or r["ms"] is None or r["shape"] not in gemm3:
            continue
        label = r["provider"]
        if label in ("ours", "jax_bindings"):
            label += " (memory budget)" if r.get("memory_budget") else " (lean)"
        if label in ("ours (memory budget)", "ours (lean)"):
            label = "ours"
        if label in ("jax_bindings (memory budget)", "jax_bindings (lean)"):
            label = "ours, JAX"
        elif r.get("filter") and not label.startswith("ours"):
            label += " (filter)"  # a peer's own approximate mode (Apple CCE's default)
        out[r["shape"]][label].append((max(r["extra_mib"] or 0.1, 0.1), r["ms"] / gemm3[r["shape"]]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True)
    ap.add_argument("--jax", default=None)
    ap.add_argument("--timing", default=None)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(json.loads(Path(args.bench).read_text()))
    if args.jax:  # another run: its points are over its own three GEMMs
        for shape, labels in points(json.loads(Path(args.jax).read_text())).items():
            for label, xy in labels.items():
                if label not in pts[shape]:  # the bench run's own records of a provider come first
                    pts[shape][label] = xy
    if args.timing:  # budgets bench.py did not time, over that run's own three GEMMs
        t = json.loads(Path(args.timing).read_text())["records"]
        for r in t:
            # (chunks thinner than MIN_CHUNK_ROWS, timed before that rule, now run the lean path)
            chunk = r.get("rows_per_chunk") or 0
            if r.get("provider", "").startswith("budget_") and r.get("scratch_mib") and chunk >= MIN_CHUNK_ROWS:
                # extra_mib: measured (runs before it have only the scratch, without a chunked plan's
                # fp32 dC accumulator)
                pts[r["shape"]]["ours"].append((r.get("extra_mib") or r["scratch_mib"], r["ratio_gemm3"]))
    shapes = [s for s in ("gemma2", "llama3") if s in pts]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for label, xy in sorted(pts[shape].items()):
            xy = sorted(set(xy))
            style = "o-" if label.startswith("ours") else "s"
            ax.plot([x for x, _ in xy], [y for _, y in xy], style, label=label)
        for label, (ms, mib) in ((k, v) for k, v in ANCHORS[shape].items() if k not in ("gemm3", *pts[shape])):
            ax.plot([mib], [ms / ANCHORS[shape]["gemm3"]], "D", mfc="none", label=f"{label} (shared anchors)")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("extra memory (MiB)")
        ax.set_ylabel("fwd+bwd / the three cuBLAS GEMMs")
        ax.set_title(f"{shape}, bf16, H200")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
