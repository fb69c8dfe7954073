"""Time and memory vs V for each provider, from bench.py results (best with --sweep-v).

    python benchmarks/plot.py results.json [more.json ...] -o out.png [--mode fwd_bwd] [--data uniform]

Left: median ms vs V; right: extra MiB vs V (log scales). One line per provider (and filter
setting); the cuBLAS floor is drawn as gemm_fwd for mode fwd, gemm_bwd_sum for bwd, and their sum
for fwd_bwd. Records of other D or N than the most common one are left out, so the x axis is V
alone.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path


def load(paths: list[str]) -> list[dict]:
    recs: list[dict] = []
    for p in paths:
        recs += json.loads(Path(p).read_text())
    return recs


def series(recs: list[dict], mode: str, data: str) -> tuple[dict, tuple[int, int] | None]:
    """label -> sorted [(V, ms, extra_mib)] for one mode and data kind, at the most common (N, D)."""
    recs = [r for r in recs if r["data"] == data and r["ms"] is not None]
    nd = Counter((r["N"], r["D"]) for r in recs).most_common(1)
    if not nd:
        return {}, None
    n, d = nd[0][0]
    recs = [r for r in recs if (r["N"], r["D"]) == (n, d)]
    out: dict[str, dict[int, tuple]] = defaultdict(dict)
    floor: dict[int, dict[str, tuple]] = defaultdict(dict)
    for r in recs:
        if r["provider"] == "cublas":
            floor[r["V"]][r["mode"]] = (r["ms"], r["extra_mib"])
        elif r["mode"] == mode:
            label = r["provider"] + (" (filter)" if r["filter"] else "")
            out[label][r["V"]] = (r["ms"], r["extra_mib"])
    want = {"fwd": ("gemm_fwd",), "bwd": ("gemm_bwd_sum",), "fwd_bwd": ("gemm_fwd", "gemm_bwd_sum")}[mode]
    for v, f in floor.items():
        if all(k in f for k in want):
            out["cuBLAS floor"][v] = (sum(f[k][0] for k in want), max(f[k][1] or 0 for k in want))
    return {k: sorted((v, *x) for v, x in pts.items()) for k, pts in out.items()}, (n, d)


def plot(recs: list[dict], out: str, mode: str, data: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ser, nd = series(recs, mode, data)
    if not ser:
        raise SystemExit(f"no records with ms for mode={mode} data={data}")
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    for label, pts in sorted(ser.items()):
        vs = [p[0] for p in pts]
        style = dict(color="black", linestyle="--") if label == "cuBLAS floor" else {}
        ax_t.plot(vs, [p[1] for p in pts], marker="o", label=label, **style)
        mem = [(v, m) for v, _, m in pts if m is not None]
        if mem and label != "cuBLAS floor":
            ax_m.plot([v for v, _ in mem], [max(m, 0.01) for _, m in mem], marker="o", label=label)
    r0 = recs[0]
    title = f"{r0['gpu']}, {r0['dtype']}, N={nd[0]}, D={nd[1]}, {data} data, {mode}"
    ax_t.set(xscale="log", yscale="log", xlabel="V (vocabulary)", ylabel="median time (ms)", title=title)
    ax_m.set(
        xscale="log",
        yscale="log",
        xlabel="V (vocabulary)",
        ylabel="peak extra memory (MiB)",
        title="beyond inputs and gradients",
    )
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="time and memory vs V per provider")
    ap.add_argument("results", nargs="+", help="bench.py JSON files")
    ap.add_argument("-o", "--out", default="bench_vs_v.png")
    ap.add_argument("--mode", default="fwd_bwd", choices=("fwd", "bwd", "fwd_bwd"))
    ap.add_argument("--data", default="uniform", choices=("uniform", "peaked"))
    args = ap.parse_args(argv)
    plot(load(args.results), args.out, args.mode, args.data)


if __name__ == "__main__":
    main()
