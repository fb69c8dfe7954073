"""Where a JAX call runs, and the binding's own keyword checks: shared by loss.py and sharded.py.

`dispatch` runs the GPU function on CUDA and the pure-JAX reference elsewhere, through
`jax.lax.platform_dependent` (only the matching branch is lowered); `CPU_PATH` picks what the CPU
branch runs. This module imports neither loss.py nor sharded.py.
"""

from __future__ import annotations

import numbers

import jax
import numpy as np

from jax_bindings import gpu

BACKWARD_IMPLS = ("kernel", "reference")
# Which implementation the CPU branch of `platform_dependent` runs. "reference" in production;
# the CPU tests set "callback" to push the buffer_callback plumbing through NumPy stand-ins.
CPU_PATH = "reference"


def dispatch(kernels: bool, ref_fn, gpu_fn, *args):
    """`gpu_fn(*args)` on CUDA, `ref_fn(*args)` elsewhere; `ref_fn` everywhere when `kernels` is
    False (float64 inputs)."""
    if not kernels:
        return ref_fn(*args)
    cpu_fn = gpu_fn if CPU_PATH == "callback" else ref_fn
    return jax.lax.platform_dependent(*args, cpu=cpu_fn, cuda=gpu_fn, default=ref_fn)


def check_call_args(backward_impl: str, vmap_method: str, block_v, command_buffer_compatible) -> bool:
    """Validate the binding's own keyword arguments; returns command_buffer_compatible resolved."""
    if backward_impl not in BACKWARD_IMPLS:
        raise ValueError(f"backward_impl must be one of {BACKWARD_IMPLS}, got {backward_impl!r}")
    if vmap_method not in gpu.VMAP_METHODS:
        raise ValueError(f"vmap_method must be one of {gpu.VMAP_METHODS}, got {vmap_method!r}")
    if block_v is not None and not (
        isinstance(block_v, numbers.Integral) and not isinstance(block_v, (bool, np.bool_)) and block_v >= 1
    ):
        raise ValueError(f"block_v must be None or an int >= 1, got {block_v!r}")
    if command_buffer_compatible is None:
        return bool(gpu.COMMAND_BUFFER_COMPATIBLE)
    return bool(command_buffer_compatible)


__all__ = ["BACKWARD_IMPLS", "CPU_PATH", "check_call_args", "dispatch"]
