"""The provider interface: one peer's loss on one Problem, timed and measured per mode."""

from __future__ import annotations

from typing import Any

from .measure import Timer
from .problem import Problem


class Provider:
    """One provider variant on one Problem.

    Subclasses set `timer`, implement `setup`, `fwd`, `fwd_bwd` (returns loss, de, dc) and either
    `bwd_prepare` + `bwd` (the backward alone, timed directly) or leave `bwd_direct = False`, in
    which case bwd = fwd_bwd - fwd. `measure_memory(mode)` returns (extra bytes, output) where
    output is the result of one call (used for the errors).
    """

    name = "?"
    filter = False
    timer = "cupy"
    bwd_direct = True
    modes = ("fwd", "bwd", "fwd_bwd")
    note = ""

    def __init__(self, p: Problem):
        self.p = p

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def fwd(self):
        raise NotImplementedError

    def fwd_bwd(self):
        raise NotImplementedError

    def bwd_prepare(self):
        return None

    def bwd(self, state):
        raise NotImplementedError

    def call(self, mode: str):
        if mode == "fwd":
            return self.fwd()
        if mode == "fwd_bwd":
            return self.fwd_bwd()
        return self.bwd(self.bwd_prepare())

    def time(self, mode: str, repeats: int, warmup: int) -> float:
        t = Timer(self.timer)
        if mode == "fwd":
            return t.time(self.fwd, repeats, warmup)
        if mode == "fwd_bwd":
            return t.time(self.fwd_bwd, repeats, warmup)
        return t.time(self.bwd, repeats, warmup, prepare=self.bwd_prepare)

    def certified_fraction(self) -> float | None:
        """The fraction of rows (with a gradient) that a filtered backward certified, from one
        untimed call; None where the provider does not report it."""
        return None

    def measure_memory(self, mode: str) -> tuple[int | None, Any]:
        out = self.call(mode)
        Timer(self.timer).sync()
        return None, out


def grad_nbytes(mode: str, p: Problem) -> int:
    return p.grad_bytes() if mode in ("bwd", "fwd_bwd") else 0
