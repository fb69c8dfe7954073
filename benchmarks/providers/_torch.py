"""The PyTorch family's shared parts: inputs shared zero-copy by DLPack, the autograd provider."""

from __future__ import annotations

import gc
from typing import Callable

from .base import Provider, grad_nbytes
from .problem import Problem


def torch_views(p: Problem):
    """(e, c, t) as torch tensors sharing p's memory; e and c require grad."""
    if "torch" not in p._views:
        import torch

        tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[p.dtype]

        def share(x):
            if p.dtype in ("bfloat16", "float16"):  # 16-bit floats travel as int16 bits
                return torch.from_dlpack(x.view(p.xp.int16)).view(tdt)
            return torch.from_dlpack(x)

        e = share(p.e).detach().requires_grad_(True)
        c = share(p.c).detach().requires_grad_(True)
        t = torch.from_dlpack(p.t)
        p._views["torch"] = (e, c, t)
    return p._views["torch"]


class TorchProvider(Provider):
    """Autograd providers. fwd: the loss with grad enabled (as in training, so saved tensors count);
    bwd: torch.autograd.grad alone, after an untimed forward; fwd_bwd: both."""

    timer = "torch"
    loss_fn: Callable = None

    def setup(self):
        import torch

        self.torch = torch
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        self.e, self.c, self.t = torch_views(self.p)
        self.make_loss()

    def make_loss(self):
        raise NotImplementedError

    def fwd(self):
        return self.loss_fn(self.e, self.c, self.t)

    def fwd_bwd(self):
        loss = self.loss_fn(self.e, self.c, self.t)
        de, dc = self.torch.autograd.grad(loss, (self.e, self.c))
        return loss.detach(), de, dc

    def bwd_prepare(self):
        return self.loss_fn(self.e, self.c, self.t)

    def bwd(self, loss):
        return self.torch.autograd.grad(loss, (self.e, self.c))

    def teardown(self):
        self.e = self.c = self.t = None
        self.loss_fn = None

    def measure_memory(self, mode):
        torch = self.torch
        state = self.bwd_prepare() if mode == "bwd" else None
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = self.bwd(state) if mode == "bwd" else self.call(mode)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return max(0, peak - grad_nbytes(mode, self.p)), out
