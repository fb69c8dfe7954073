"""Out-of-range targets: the asynchronous watch of the GPU kernels' device flag (per thread, per
device, no host sync) and the NumPy backend's immediate check.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from cce_cupy._arrays import _cupy
from cce_cupy.cuda.device import target_error_flag
from cce_cupy.options import CCEOptions


class _TargetWatch:
    """Per-thread, per-device, non-blocking watch of cuda.device.target_error_flag() (a flag per thread
    too): each thread is told of its own calls' bad targets only, and never shares this state."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _state(self) -> dict[int, tuple[Any, Any]]:
        """This thread's {device: (pinned host copy, event)}."""
        return self._local.__dict__.setdefault("state", {})

    def after_launch(self, cupy) -> None:
        """Queue an async copy of the flag to pinned memory and an event after it (no sync)."""
        import cupyx

        state = self._state()
        dev = cupy.cuda.Device().id
        if dev not in state:
            state[dev] = (cupyx.zeros_pinned(1, dtype=np.int32), cupy.cuda.Event(disable_timing=True))
        host, event = state[dev]
        target_error_flag().get(out=host, blocking=False)
        event.record()

    def poll(self, block: bool = False) -> None:
        """Raise (and clear the flags) if a finished copy shows an out-of-range target."""
        state = self._state()
        if not state:
            return
        cupy = _cupy()
        for dev, (host, event) in list(state.items()):
            if block:
                event.synchronize()
            elif not event.done:
                continue
            if host[0]:
                host[0] = 0
                with cupy.cuda.Device(dev):
                    target_error_flag().fill(0)
                raise ValueError(
                    f"targets: an earlier cce_cupy call on cuda:{dev} had a target outside [0, V) that is "
                    "not ignore_index; its loss is NaN. Fix the targets (or set ignore_index to the "
                    "padding value)."
                )


_WATCH = _TargetWatch()


def _check_targets_now(t: np.ndarray, v: int, opts: CCEOptions) -> None:
    bad = (t != opts.ignore_index) & ((t < 0) | (t >= v))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"targets: {int(bad.sum())} target(s) outside [0, V={v}) that are not ignore_index="
            f"{opts.ignore_index} (first at flat index {i}: {int(t[i])})"
        )
