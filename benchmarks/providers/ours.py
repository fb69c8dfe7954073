"""Ours on CuPy arrays: cce_cupy's kernels on the GPU, its NumPy backend on the CPU."""

from __future__ import annotations

from .base import Provider, grad_nbytes
from .measure import CupyPeak, Timer


class OursProvider(Provider):
    name = "ours"

    def __init__(self, p, name="ours", **opts):
        super().__init__(p)
        self.name = name
        self.opts = opts
        self.filter = opts.get("filter_eps") is not None
        self.timer = "cupy" if p.backend == "cupy" else "host"
        self._lse = None

    def setup(self):
        import cce_cupy

        self.cce = cce_cupy
        for fn in ("linear_cross_entropy", "linear_cross_entropy_with_grad", "forward", "backward"):
            if not hasattr(cce_cupy, fn):
                raise ImportError(f"cce_cupy.{fn} is missing (cce_cupy/api.py not there yet?)")

    def fwd(self):
        return self.cce.linear_cross_entropy(self.p.e, self.p.c, self.p.t, **self.opts)

    def fwd_bwd(self):
        return self.cce.linear_cross_entropy_with_grad(self.p.e, self.p.c, self.p.t, **self.opts)

    def bwd_prepare(self):
        if self._lse is None:  # backward does not change lse: one forward serves every repeat
            lse, _tgt = self.cce.forward(self.p.e, self.p.c, self.p.t)
            self._lse = lse
        return self._lse

    def bwd(self, lse):
        return self.cce.backward(self.p.e, self.p.c, self.p.t, lse, 1.0, **self.opts)

    def certified_fraction(self):
        if not self.filter:
            return None
        stats = {}
        if self.p.backend == "cupy":  # a call that runs the filter, whatever the last one certified
            from cce_cupy.cuda.filter_history import HISTORY

            HISTORY.clear()
        self.cce.linear_cross_entropy_with_grad(self.p.e, self.p.c, self.p.t, stats=stats, **self.opts)
        return stats["certified_rows"] / stats["rows"] if stats["rows"] else None

    def teardown(self):
        self._lse = None

    def measure_memory(self, mode):
        if self.p.backend != "cupy":
            return None, self.call(mode)
        if mode == "bwd":
            state = self.bwd_prepare()
        with CupyPeak() as pk:
            out = self.bwd(state) if mode == "bwd" else self.call(mode)
            Timer("cupy").sync()
        return max(0, pk.peak - grad_nbytes(mode, self.p)), out
