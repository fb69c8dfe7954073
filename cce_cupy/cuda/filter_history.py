"""Whether the certified filter paid off on the last call of the same problem (CuPy path).

A filtered call that certifies fewer than backward.MIN_CERTIFIED_FRACTION of its rows runs the
exact backward for all of them, after paying for the candidate lists, their pruning and a host
sync: on data that does not certify it is a few percent slower than the exact call, more at small
shapes. A training loop calls the loss on the same shapes every step, and its data's certified
fraction changes slowly; so after such a call, the next PROBE_EVERY - 1 calls of the same problem
(device, shapes, dtype, bias, options) run the exact path directly, and the one after that tries
the filter again. Exact gradients meet the certificate, so this choice changes speed only, never
what the result is allowed to be.
"""

from __future__ import annotations

import threading

from cce_cupy.cuda.backward import list_sums_pay

# One filtered call in this many, on data where the last one did not pay: the probe's cost is
# spread over that many calls.
PROBE_EVERY = 16


class FilterHistory:
    """Exact calls left before the next filtered one, per problem key (see the module doc)."""

    def __init__(self) -> None:
        self._exact_left: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(e, c, bias, opts) -> tuple:
        return (e.device.id, tuple(e.shape), c.shape[0], e.dtype.str, bias is not None, opts)

    def use_filter(self, key) -> bool:
        """True if this call should run the filter; else counts it as one of the exact calls."""
        with self._lock:
            left = self._exact_left.get(key, 0)
            if left > 0:
                self._exact_left[key] = left - 1
            return left == 0

    def record(self, key, rows: int, uncertified: int) -> None:
        """The counts of a filtered call (rows with a gradient, those not certified): did it pay
        (backward.list_sums_pay)?"""
        with self._lock:
            if list_sums_pay(rows, uncertified):
                self._exact_left.pop(key, None)
            else:
                self._exact_left[key] = PROBE_EVERY - 1

    def clear(self) -> None:
        """Forget every problem: the next call of each runs the filter."""
        with self._lock:
            self._exact_left.clear()


HISTORY = FilterHistory()

__all__ = ["HISTORY", "PROBE_EVERY", "FilterHistory"]
