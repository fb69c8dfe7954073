"""QuACK (Dao-AILab's `quack-kernels`): chunked fused linear cross-entropy in CuTe-DSL kernels.

Called as `quack.linear_cross_entropy.chunked_linear_cross_entropy(e, c, targets)` with its
defaults (chunk_size 4096, reduction "mean"). On SM90 with bf16 inputs, V % 128 == 0 and a gemm
tile that divides V (both benchmark shapes), that routes to its scaled-exp pipeline: one GEMM per
row chunk stores bf16 exp(z - k) with a per-tile power-of-two k, then dE and dC by plain GEMMs.
Like Liger, the gradients are formed inside the forward; the backward only scales them.

Not on the device image: benchmarks/dev/stage_quack.sh downloads the pinned wheels here, and the
device step `quack_install` installs them and puts them on PYTHONPATH (benchmarks/README.md).
"""

from __future__ import annotations

import importlib.util
import os

from ._torch import TorchProvider

# What benchmarks/dev/stage_quack.sh stages (why these: its comment).
PINS = "quack-kernels 0.6.5, nvidia-cutlass-dsl 4.7.1"


def quack_missing() -> str | None:
    """Why QuACK cannot be imported here, or None. Looks the modules up without importing them."""
    if importlib.util.find_spec("quack") is None:
        return (
            f"quack-kernels is not importable ({PINS} are not on the device image): stage them with "
            "benchmarks/dev/stage_quack.sh and run the device step quack_install first"
        )
    if importlib.util.find_spec("cutlass") is None:
        return (
            "quack is importable but nvidia-cutlass-dsl's `cutlass` is not: a --target install skips "
            "its .pth file, so nvidia_cutlass_dsl/dsl_packages must be on PYTHONPATH (quack_install does it)"
        )
    # QuACK keys its compiled epilogues by the code they reach and counts only code under a
    # site-packages or dist-packages folder as installed; elsewhere its import fails on cutlass's
    # globals ("epilogue fn depends on <Logger CUTE_DSL> ... no fail-closed semantic key").
    origin = importlib.util.find_spec("cutlass").origin or ""
    if not any(f"{os.sep}{folder}{os.sep}" in origin for folder in ("site-packages", "dist-packages")):
        return (
            f"nvidia-cutlass-dsl is installed outside a site-packages folder ({origin}), where QuACK's "
            "import fails: install it with --target into a folder named site-packages (as quack_install does)"
        )
    return None


class Quack(TorchProvider):
    name = "quack"

    def make_loss(self):
        from quack.linear_cross_entropy import chunked_linear_cross_entropy, scaled_exp_lce_supported

        # QuACK's default chunk, named so the eligibility check below asks about the same call; but
        # where it equals D, its dE GEMM (chunk x D) is square and QuACK 0.6.5 refuses its epilogue
        # ("operand 'v': m == n makes row/col inference ambiguous", llama3 on the H200): then twice
        # that, the larger of the two neighbours, so QuACK is not slowed by smaller GEMMs.
        d = self.e.shape[1]
        chunk = 4096 if d != 4096 else 8192
        scaled = scaled_exp_lce_supported(self.e, self.c, chunk, "mean")
        self.note = (
            f"quack chunked_linear_cross_entropy(chunk_size={chunk}), "
            + ("scaled-exp path" if scaled else "base path (scaled-exp not eligible here)")
            + "; gradients are computed inside its forward; bwd only scales"
        )
        self.loss_fn = lambda e, c, t: chunked_linear_cross_entropy(e, c, t, chunk_size=chunk)
