"""Efficiency against GPU count from benchmarks/scale.py's JSON (PNG, matplotlib).

    python benchmarks/plot_scale.py benchmarks/results/X-scale.json [more.json ...] -o scale.png

One panel per shape; one line per parallel kind ("tp", "dp", the mixed "dp2 x tp" meshes, one line
for all k) and grad_reduce_dtype; the reference (efficiency 1 by definition) as its own marker.
Dotted: issue 19's bars (tp=8 >= 0.75 at llama3, dp=8 >= 0.90). Records without an efficiency
(errors, skipped) are left out.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

BARS = {"tp (bar at 8 GPUs)": 0.75, "dp (bar at 8 GPUs)": 0.90}


def lines(records: list[dict]) -> dict:
    """shape -> {line label: sorted [(gpus, efficiency)]}; the reference under "reference (...)"."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("efficiency") is None:
            continue
        if r.get("reference"):
            out[r["shape"]][f"reference ({r['efficiency_vs']})"].append((r["gpus"], r["efficiency"]))
            if r["parallel"] == "none":
                continue
        kind = r["parallel"] if r["parallel"] in ("tp", "dp") else f"dp{r['dp']} x tp"
        label = kind + (f", reduce {r['grad_reduce_dtype']}" if r.get("grad_reduce_dtype") else "")
        out[r["shape"]][label].append((r["gpus"], r["efficiency"]))
    return {shape: {k: sorted(set(v)) for k, v in by.items()} for shape, by in out.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for f in args.files for r in json.loads(Path(f).read_text())]
    by_shape = lines(records)
    if not by_shape:
        raise SystemExit(f"no record with an efficiency in {args.files}")
    shapes = list(by_shape)
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        counts = sorted({g for pts in by_shape[shape].values() for g, _ in pts})
        for label, pts in sorted(by_shape[shape].items()):
            style = "k*" if label.startswith("reference") else "o-"
            ax.plot([g for g, _ in pts], [e for _, e in pts], style, label=label, ms=9 if style == "k*" else 5)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        for label, y in BARS.items():
            ax.axhline(y, color="gray", lw=0.6, ls=":")
            ax.annotate(label, (counts[0], y), fontsize=6, color="gray", va="bottom")
        rec = next(r for r in records if r["shape"] == shape)
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(g) for g in counts])
        ax.set_xlabel("GPUs")
        ax.set_ylabel("efficiency (reference GPU-time per token / setup's)")
        ax.set_title(f"{shape}: N={rec['n'] // rec['dp']}, D={rec['d']}, V={rec['v']}, {rec.get('dtype', '')}")
        ax.legend(fontsize=7)
    fig.suptitle(f"{records[0].get('gpu', '')}, commit {records[0].get('commit', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
