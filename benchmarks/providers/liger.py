"""Liger's fused linear cross-entropy (`LigerFusedLinearCrossEntropyLoss`)."""

from __future__ import annotations

from ._torch import TorchProvider


class Liger(TorchProvider):
    name = "liger"
    note = "LigerFusedLinearCrossEntropyLoss: gradients are computed inside its forward; bwd only scales"

    def make_loss(self):
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        mod = LigerFusedLinearCrossEntropyLoss()
        self.loss_fn = lambda e, c, t: mod(c, e, t)
