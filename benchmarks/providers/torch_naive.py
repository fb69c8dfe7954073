"""What training code does in PyTorch: bf16 logits, F.cross_entropy on the fp32 upcast; eager
and under torch.compile."""

from __future__ import annotations

from ._torch import TorchProvider


def naive_torch_loss(e, c, t):
    """What training code does: bf16 logits, upcast to fp32, F.cross_entropy (mean)."""
    import torch.nn.functional as F

    return F.cross_entropy((e @ c.T).float(), t)


class TorchEager(TorchProvider):
    name = "torch"
    note = "bf16 logits = e @ c.T, F.cross_entropy on the fp32 upcast"

    def make_loss(self):
        self.loss_fn = naive_torch_loss


class TorchCompile(TorchProvider):
    name = "torch_compile"
    note = "torch.compile(dynamic=False) of: bf16 logits, F.cross_entropy on the fp32 upcast"
    _compiled: dict = {}

    def make_loss(self):
        key = (self.p.n, self.p.d, self.p.v, self.p.dtype)
        if key not in TorchCompile._compiled:
            TorchCompile._compiled[key] = self.torch.compile(naive_torch_loss, dynamic=False)
        self.loss_fn = TorchCompile._compiled[key]
