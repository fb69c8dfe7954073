"""Shape and dtype checks shared by every front end (NumPy, CuPy, DLPack, JAX).

The checks read only `.shape` and `.dtype`, never data, so they work on NumPy and CuPy arrays,
JAX arrays and tracers, and `jax.ShapeDtypeStruct`. Each error names the argument and the fix.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

SUPPORTED_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
INDEX_DTYPES: tuple[str, ...] = ("int32", "int64")
# The float64 reference (tests, ground truth) also accepts float64; the public API does not.
REFERENCE_DTYPES: tuple[str, ...] = SUPPORTED_DTYPES + ("float64",)


class Problem(NamedTuple):
    """The sizes of one call: e (*batch_shape, d) is flattened to (n, d); c is (v, d)."""

    batch_shape: tuple[int, ...]
    n: int
    d: int
    v: int
    dtype: np.dtype
    index_dtype: np.dtype


def dtype_of(x: Any) -> np.dtype | None:
    """The NumPy dtype of `x.dtype` (bfloat16 through ml_dtypes), or None if it has none."""
    dt = getattr(x, "dtype", None)
    if dt is None:
        return None
    try:
        return np.dtype(dt)
    except TypeError:
        return None


def _name(x: Any) -> str:
    dt = dtype_of(x)
    return dt.name if dt is not None else str(getattr(x, "dtype", type(x).__name__))


def _shape(x: Any, arg: str) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    if shape is None or getattr(x, "dtype", None) is None:
        raise TypeError(
            f"{arg} must be an array with .shape and .dtype (NumPy, CuPy, JAX, ...), got {type(x).__name__}"
        )
    dt = dtype_of(x)
    if dt is not None and not dt.isnative:  # the kernels and JAX read native byte order only
        raise TypeError(
            f"{arg} has non-native byte order (dtype {dt.str!r}): convert it with "
            f"{arg}.astype({arg}.dtype.newbyteorder('='))"
        )
    return tuple(int(s) for s in shape)


def check_ignore_index(ignore_index: int, index_dtype: Any) -> None:
    """ignore_index must be representable in the targets' dtype (to compare and to pad under shift)."""
    info = np.iinfo(np.dtype(index_dtype))
    if not info.min <= ignore_index <= info.max:
        raise ValueError(
            f"ignore_index={ignore_index} does not fit the targets' dtype {np.dtype(index_dtype).name} "
            f"([{info.min}, {info.max}]): pass int64 targets or an ignore_index in that range"
        )


def _check_float_dtype(x: Any, arg: str, allowed: tuple[str, ...]) -> np.dtype:
    dt = dtype_of(x)
    name = _name(x)
    if dt is None or name not in allowed:
        hint = ""
        if name == "float64":  # no automatic cast: it would hide a 2x memory copy of c
            hint = (
                f"; cast the float arrays first, e.g. {arg}.astype('float32') (the loss is computed in fp32), "
                "or use jax_bindings.linear_cross_entropy, which computes float64 on CPU"
            )
        raise TypeError(f"{arg} has unsupported dtype {name}: use one of {', '.join(allowed)}{hint}")
    return dt


def _check_targets_dtype(targets: Any) -> np.dtype:
    dt = dtype_of(targets)
    name = _name(targets)
    if dt is not None and name in INDEX_DTYPES:
        return dt
    if dt is not None and dt.kind in "iu":
        raise TypeError(f"targets has dtype {name}: cast it to int32 or int64 (e.g. targets.astype('int32'))")
    kind = "bool" if dt is not None and dt.kind == "b" else "floating-point" if dt is not None else "unknown"
    raise TypeError(
        f"targets must hold integer class indices (int32 or int64), got {kind} dtype {name}: "
        "pass class indices, not probabilities or masks"
    )


def check_linear_ce_args(e: Any, c: Any, targets: Any, bias: Any = None, *, allow_float64: bool = False) -> Problem:
    """Validate the arguments of the fused linear cross-entropy; return the problem's sizes.

    e: (..., D) float32/float16/bfloat16; c: (V, D) same dtype; targets: e.shape[:-1], int32 or
    int64; bias: None or (V,) of e's dtype. V >= 1 and D >= 1; N = prod(batch) may be 0.
    `allow_float64` admits float64 inputs (the float64 reference only).
    """
    es = _shape(e, "e")
    cs = _shape(c, "c")
    ts = _shape(targets, "targets")
    if len(es) < 1:
        raise ValueError("e must have shape (..., D) with at least one dimension, got a 0-d array")
    if len(cs) != 2:
        raise ValueError(f"c must be 2-D with shape (V, D), got shape {cs}")
    v, d = cs
    if es[-1] != d:
        raise ValueError(f"e has D={es[-1]} (shape {es}) but c has D={d} (shape {cs}): the last dims must match")
    if ts != es[:-1]:
        raise ValueError(
            f"targets has shape {ts} but e has shape {es}: targets must have shape e.shape[:-1] = {es[:-1]}"
        )
    allowed = REFERENCE_DTYPES if allow_float64 else SUPPORTED_DTYPES
    edt = _check_float_dtype(e, "e", allowed)
    cdt = dtype_of(c)
    if cdt != edt:
        raise TypeError(f"e is {edt.name} but c is {_name(c)}: cast both to the same dtype")
    idt = _check_targets_dtype(targets)
    if bias is not None:
        bs = _shape(bias, "bias")
        if bs != (v,):
            raise ValueError(f"bias must have shape (V,) = ({v},), got {bs}")
        if dtype_of(bias) != edt:
            raise TypeError(f"bias is {_name(bias)} but e and c are {edt.name}: cast bias to {edt.name}")
    if v == 0:
        raise ValueError("c has V=0 rows: the vocabulary must have at least one class")
    if d == 0:
        raise ValueError("e and c have D=0: the hidden dimension must be at least 1")
    batch = es[:-1]
    return Problem(batch, math.prod(batch), d, v, edt, idt)


def check_cross_entropy_args(logits: Any, targets: Any, *, allow_float64: bool = False) -> Problem:
    """Validate the arguments of the logits-level cross-entropy: logits (..., V), targets (...).

    The returned Problem has d = 0.
    """
    ls = _shape(logits, "logits")
    ts = _shape(targets, "targets")
    if len(ls) < 1:
        raise ValueError("logits must have shape (..., V) with at least one dimension, got a 0-d array")
    if ts != ls[:-1]:
        raise ValueError(
            f"targets has shape {ts} but logits has shape {ls}: targets must have shape logits.shape[:-1] = {ls[:-1]}"
        )
    allowed = REFERENCE_DTYPES if allow_float64 else SUPPORTED_DTYPES
    ldt = _check_float_dtype(logits, "logits", allowed)
    idt = _check_targets_dtype(targets)
    v = ls[-1]
    if v == 0:
        raise ValueError("logits has V=0 columns: the vocabulary must have at least one class")
    batch = ls[:-1]
    return Problem(batch, math.prod(batch), 0, v, ldt, idt)


__all__ = [
    "INDEX_DTYPES",
    "SUPPORTED_DTYPES",
    "Problem",
    "check_cross_entropy_args",
    "check_ignore_index",
    "check_linear_ce_args",
    "dtype_of",
]
