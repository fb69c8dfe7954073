"""Plots and a summary table from the JSON logs of examples/train_lm.py (matplotlib, Agg).

    python examples/plot_train.py --dir examples/results

reads  <dir>/train_cce.json, <dir>/train_optax.json (the two training runs), <dir>/sweep.json
writes <out>/loss_curves.png  both losses over the steps, and their difference, with the largest gap
       <out>/vocab_sweep.png  peak memory and step time against the vocabulary size, OOM marked
       <out>/summary.md       the numbers behind both
Any missing input is skipped (with a message); --out defaults to --dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

COLORS = {"cce": "tab:blue", "optax": "tab:orange"}
LABELS = {"cce": "jax_bindings.linear_cross_entropy", "optax": "optax on materialized logits"}
GIB = 2**30


def load(path: Path):
    if not path.exists():
        print(f"skipping {path}: not found", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def moving_average(x: np.ndarray, w: int) -> np.ndarray:
    if x.size < w or w <= 1:
        return x
    return np.convolve(x, np.ones(w) / w, mode="valid")


def loss_gap(runs: dict) -> dict:
    """Largest per-step gap between the two losses, and of their moving averages."""
    a, b = (np.asarray(runs[k]["losses"], dtype=np.float64) for k in ("cce", "optax"))
    n = min(a.size, b.size)
    d = a[:n] - b[:n]
    i = int(np.argmax(np.abs(d)))
    w = max(1, min(20, n // 10))
    dm = moving_average(a[:n], w) - moving_average(b[:n], w)
    return {
        "max_abs": float(abs(d[i])),
        "step": i + 1,
        "rel": float(abs(d[i]) / max(abs(b[i]), 1e-12)),
        "mean_abs": float(np.mean(np.abs(d))),
        "smooth_w": w,
        "smooth_max_abs": float(np.max(np.abs(dm))),
        "diff": d,
    }


def plot_losses(runs: dict, path: Path) -> dict:
    import matplotlib.pyplot as plt

    gap = loss_gap(runs)
    cfg = runs["cce"]["config"]
    fig, (ax, axd) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    for name in ("optax", "cce"):
        y = np.asarray(runs[name]["losses"])
        ax.plot(
            np.arange(1, y.size + 1),
            y,
            color=COLORS[name],
            lw=1.0 if name == "cce" else 2.2,
            alpha=0.95 if name == "cce" else 0.6,
            label=f"{name}: {LABELS[name]} (final {y[-1]:.3f})",
        )
    ax.set_ylabel("training loss (nats / token)")
    ax.set_title(
        f"Same model, init and batches: D={cfg['d_model']}, {cfg['layers']} layers, {cfg['dtype']}, "
        f"V={cfg['vocab']:,}, {cfg['batch']}x{cfg['seq']} tokens/step\n"
        f"largest per-step gap |cce - optax| = {gap['max_abs']:.3g} at step {gap['step']} "
        f"({100 * gap['rel']:.2f}% of the loss)\n{gap['smooth_w']}-step moving averages within "
        f"{gap['smooth_max_abs']:.3g}; mean per-step gap {gap['mean_abs']:.3g}",
        fontsize=10,
    )
    ax.legend(loc="upper right", fontsize=9)
    ax.grid(alpha=0.3)
    axd.plot(np.arange(1, gap["diff"].size + 1), gap["diff"], color="tab:gray", lw=0.8)
    axd.axhline(0, color="black", lw=0.6)
    axd.set_xlabel("step")
    axd.set_ylabel("cce - optax")
    axd.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return gap


def sweep_table(sweep: dict) -> dict:
    """{loss: {V: point}}."""
    out: dict = {}
    for p in sweep["points"]:
        out.setdefault(p["loss_impl"], {})[p["V"]] = p
    return out


def plot_sweep(sweep: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    table = sweep_table(sweep)
    sizes = sorted({p["V"] for p in sweep["points"]})
    limits = [p.get("bytes_limit") for p in sweep["points"] if p.get("bytes_limit")]
    limit = max(limits) / GIB if limits else None
    ok_mem = [
        (p.get("peak_bytes") or p.get("xla_estimate_bytes") or 0) / GIB for p in sweep["points"] if p["status"] == "ok"
    ]
    top_mem = max([limit or 0, *ok_mem, 1e-3]) * 1.2
    ok_ms = [p["step_ms"] for p in sweep["points"] if p["status"] == "ok"]
    top_ms = max([*ok_ms, 1e-3]) * 1.25
    fig, (axm, axt) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, pts in table.items():
        xs = sorted(pts)
        good = [v for v in xs if pts[v]["status"] == "ok"]
        bad = [v for v in xs if pts[v]["status"] != "ok"]
        mem = [pts[v].get("peak_bytes") for v in good]
        est_ok = [pts[v].get("xla_estimate_bytes") for v in good]
        if good and all(m is not None for m in mem):
            axm.plot(good, [m / GIB for m in mem], "o-", color=COLORS[name], label=LABELS[name])
        elif good and all(m is not None for m in est_ok):  # no memory_stats (CPU): XLA's own accounting
            axm.plot(
                good,
                [m / GIB for m in est_ok],
                "o--",
                color=COLORS[name],
                label=f"{LABELS[name]} (XLA's estimate: no memory_stats here)",
            )
        axt.plot(good, [pts[v]["step_ms"] for v in good], "o-", color=COLORS[name], label=LABELS[name])
        for ax, top in ((axm, top_mem), (axt, top_ms)):
            for v in bad:
                p = pts[v]
                text = p["status"] + (" (not run)" if p.get("inferred") else "")
                if ax is axm and p.get("xla_estimate_bytes"):
                    text += f"\nXLA: needs {p['xla_estimate_bytes'] / GIB:.0f} GiB"
                ax.plot([v], [top * 0.88], "X", color=COLORS[name], ms=12, mec="black")
                below = name == "cce"
                ax.annotate(
                    text,
                    (v, top * 0.88),
                    textcoords="offset points",
                    xytext=(0, -12 if below else 9),
                    ha="center",
                    va="top" if below else "bottom",
                    fontsize=7,
                    color=COLORS[name],
                )
    if limit:
        axm.axhline(limit, color="red", ls="--", lw=1, label=f"device memory limit ({limit:.0f} GiB)")
    c = sweep["config"]
    for ax, ylabel, top in ((axm, "peak GPU memory (GiB)", top_mem), (axt, "training step (ms)", top_ms)):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{v // 1024}k" if v >= 1024 else str(v) for v in sizes])
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left")
    device = next((p["env"]["device"] for p in sweep["points"] if p.get("env")), "?")
    fig.suptitle(
        f"One training step of the D={c['d_model']}, {c['layers']}-layer LM, {c['batch']}x{c['seq']} tokens, "
        f"{c['dtype']}, on {device} (X: did not fit)\ntokenizer vocabulary {c['vocab']:,}: larger V "
        "padded with unused ids, smaller V maps rare words to <unk>",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fmt_gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def summary_md(runs: dict, gap: dict | None, sweep: dict | None) -> str:
    lines = ["# train_lm.py results", ""]
    if runs:
        any_run = next(iter(runs.values()))
        c, env = any_run["config"], any_run["env"]
        lines += [
            f"Training: {c['steps']} steps, {c['batch']}x{c['seq']} tokens/step, V={c['vocab']:,}, "
            f"D={c['d_model']}, {c['layers']} layers, {c['heads']} heads, {c['dtype']}, "
            f"{any_run['params'] / 1e6:.1f}M parameters, on {env['device']} (jax {env['jax']}).",
            "",
            "| loss | final loss | last-10 mean | median step (ms) | tokens/s | peak memory (GiB) | compile (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in runs.items():
            lines.append(
                f"| {name} | {r['final_loss']:.4f} | {r['final_loss_avg10']:.4f} | "
                f"{r['median_step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {fmt_gib(r['peak_bytes'])} | "
                f"{r['compile_s']:.1f} |"
            )
        if gap:
            lines += [
                "",
                f"Largest per-step gap |cce - optax|: {gap['max_abs']:.3g} at step {gap['step']} "
                f"({100 * gap['rel']:.2f}% of the loss); mean gap {gap['mean_abs']:.3g}; "
                f"{gap['smooth_w']}-step moving averages within {gap['smooth_max_abs']:.3g}.",
            ]
        lines.append("")
    if sweep:
        c = sweep["config"]
        lines += [
            f"Vocabulary sweep: {c['batch']}x{c['seq']} tokens/step, D={c['d_model']}, {c['layers']} layers, "
            f"{c['dtype']}, {c['sweep_steps']} steps per point (the first untimed), one process per point. "
            + sweep["note"]
            + ".",
            "",
            "| V | loss | status | peak memory (GiB) | XLA estimate (GiB) | median step (ms) |",
            "|---|---|---|---|---|---|",
        ]
        for p in sorted(sweep["points"], key=lambda p: (p["V"], p["loss_impl"])):
            status = p["status"] + (" (not run: smaller V already OOM)" if p.get("inferred") else "")
            peak = fmt_gib(p.get("peak_bytes")) if p["status"] == "ok" else "-"
            ms = f"{p['step_ms']:.1f}" if p["status"] == "ok" else "-"
            lines.append(
                f"| {p['V']:,} | {p['loss_impl']} | {status} | {peak} | {fmt_gib(p.get('xla_estimate_bytes'))} | {ms} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--out", help="output folder (default: --dir)")
    ap.add_argument("--train", nargs=2, metavar=("CCE_JSON", "OPTAX_JSON"), help="default <dir>/train_{cce,optax}.json")
    ap.add_argument("--sweep", help="default <dir>/sweep.json")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    src = Path(args.dir)
    out = Path(args.out or args.dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = args.train or [src / "train_cce.json", src / "train_optax.json"]
    runs = {}
    for name, p in zip(("cce", "optax"), paths):
        r = load(Path(p))
        if r is not None:
            runs[name] = r
    gap = None
    if len(runs) == 2:
        gap = plot_losses(runs, out / "loss_curves.png")
        print(f"wrote {out / 'loss_curves.png'}: largest per-step gap {gap['max_abs']:.3g} at step {gap['step']}")
    sweep = load(Path(args.sweep) if args.sweep else src / "sweep.json")
    if sweep and sweep.get("points"):
        plot_sweep(sweep, out / "vocab_sweep.png")
        print(f"wrote {out / 'vocab_sweep.png'}")
    if runs or sweep:
        (out / "summary.md").write_text(summary_md(runs, gap, sweep))
        print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
