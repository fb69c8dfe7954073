"""Loss curves of examples/train_lm.py trained exact and with the certified filter (issue 14).

    python examples/plot_filter_train.py EXACT.json FILTERED.json --out DIR

writes DIR/filter_loss_curves.png (both losses over the steps, and their difference) and prints
each run's final loss (mean of the last 10 steps), median step time and the largest gap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("exact")
    ap.add_argument("filtered")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    runs = {name: json.loads(Path(p).read_text()) for name, p in (("exact", args.exact), ("filter", args.filtered))}
    losses = {k: np.asarray(r["losses"], dtype=np.float64) for k, r in runs.items()}
    steps = min(x.size for x in losses.values())
    gap = losses["filter"][:steps] - losses["exact"][:steps]
    for k, r in runs.items():
        print(
            f"{k}: filter_eps {r.get('filter_eps')!r}, final loss {losses[k][-10:].mean():.4f}, "
            f"median step {r['median_step_ms']:.1f} ms"
        )
    print(
        f"largest |filter - exact| over {steps} steps: {np.abs(gap).max():.3e} (step {int(np.abs(gap).argmax()) + 1})"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for k, x in losses.items():
        ax.plot(np.arange(1, x.size + 1), x, label=f"{k} ({runs[k]['median_step_ms']:.0f} ms/step)", lw=1)
    ax.set_ylabel("training loss")
    ax.legend()
    ax.set_title("examples/train_lm.py: exact loss against filter_eps='auto'")
    ax2.plot(np.arange(1, steps + 1), gap, lw=1, color="k")
    ax2.set_ylabel("filter - exact")
    ax2.set_xlabel("step")
    out = Path(args.out) / "filter_loss_curves.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
