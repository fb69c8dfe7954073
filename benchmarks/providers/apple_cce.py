"""Apple's cut-cross-entropy (`cut_cross_entropy.linear_cross_entropy`), filtered and exact."""

from __future__ import annotations

from ._torch import TorchProvider


class AppleCCE(TorchProvider):
    name = "apple_cce"

    def __init__(self, p, filter: bool):
        super().__init__(p)
        self.filter = filter
        self.note = (
            "cut_cross_entropy.linear_cross_entropy, default filter_eps ('high' = bf16 eps/32)"
            if filter
            else "cut_cross_entropy.linear_cross_entropy(filter_eps=None), exact"
        )

    def make_loss(self):
        from cut_cross_entropy import linear_cross_entropy

        if self.filter:
            self.loss_fn = linear_cross_entropy
        else:
            self.loss_fn = lambda e, c, t: linear_cross_entropy(e, c, t, filter_eps=None)
