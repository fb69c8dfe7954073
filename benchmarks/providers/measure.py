"""Timing (CUDA events or host clock) and peak-memory helpers shared by every provider."""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

import numpy as np


# ------------------------------------------------------------------------------------- timing
def median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


class Timer:
    """Times fn() `repeats` times after `warmup` calls; returns the median in ms.

    kind: "cupy" / "torch" (CUDA events on the framework's current stream), "host" (perf_counter
    around a call that blocks until the result is ready: JAX, NumPy).
    """

    def __init__(self, kind: str):
        self.kind = kind

    def sync(self) -> None:
        if self.kind == "cupy":
            import cupy

            cupy.cuda.get_current_stream().synchronize()
        elif self.kind == "torch":
            import torch

            torch.cuda.synchronize()

    def time(
        self, fn: Callable[[], Any], repeats: int, warmup: int = 1, prepare: Callable[[], Any] | None = None
    ) -> float:
        """prepare (optional, untimed) runs before each call; its result is passed to fn."""
        for _ in range(warmup):
            arg = prepare() if prepare else None
            out = fn(arg) if prepare else fn()
            del out, arg
        self.sync()
        times = []
        for _ in range(repeats):
            arg = prepare() if prepare else None
            self.sync()
            if self.kind == "cupy":
                import cupy

                a, b = cupy.cuda.Event(), cupy.cuda.Event()
                a.record()
                out = fn(arg) if prepare else fn()
                b.record()
                b.synchronize()
                times.append(cupy.cuda.get_elapsed_time(a, b))
            elif self.kind == "torch":
                import torch

                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                out = fn(arg) if prepare else fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                out = fn(arg) if prepare else fn()
                block(out)
                times.append((time.perf_counter() - t0) * 1e3)
            del out, arg
        return median(times)


def block(out: Any) -> None:
    """Wait for JAX results; no-op for anything else."""
    leaves = out if isinstance(out, (tuple, list)) else (out,)
    for x in leaves:
        if hasattr(x, "block_until_ready"):
            x.block_until_ready()
        elif isinstance(x, (tuple, list)):
            block(x)


class CupyPeak:
    """Peak bytes handed out by CuPy's memory pool while active (a MemoryHook)."""

    def __init__(self):
        import cupy

        class _Hook(cupy.cuda.MemoryHook):
            name = "bench_peak"

            def __init__(self):
                self.cur = 0
                self.peak = 0

            def malloc_postprocess(self, **kw):
                self.cur += int(kw.get("mem_size", 0))
                self.peak = max(self.peak, self.cur)

            def free_postprocess(self, **kw):
                self.cur -= int(kw.get("mem_size", 0))

        self.hook = _Hook()
        self.pool = cupy.get_default_memory_pool()

    def __enter__(self):
        self.pool.free_all_blocks()
        self.total0 = self.pool.total_bytes()
        self.hook.__enter__()
        return self

    def __exit__(self, *exc):
        self.hook.__exit__(*exc)
        self.total_grown = self.pool.total_bytes() - self.total0
        return False

    @property
    def peak(self) -> int:
        # The hook counts exactly; the pool's growth is an upper bound used if the hook saw nothing.
        return self.hook.peak if self.hook.peak > 0 else max(0, self.total_grown)


def free_device_memory() -> None:
    """Return cached blocks of every framework already imported (never imports one)."""
    import sys

    gc.collect()
    if "cupy" in sys.modules:
        try:
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
        except Exception:  # noqa: BLE001
            pass
    if "torch" in sys.modules:
        try:
            torch = sys.modules["torch"]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
