"""The one options object every layer receives, and the loss's math in closed form.

Definitions (one row i of the flattened batch, V classes, targets t_i after `shift`):

    z_ij   = e_i . c_j + bias_j
    y_ij   = softcap * tanh(z_ij / softcap)      (y = z when softcap is None)
    lse_i  = log sum_j exp(y_ij)
    tgt_i  = (1 - ls) * y_{i,t_i} + (ls / V) * sum_j y_ij      (ls = label_smoothing)
    loss_i = lse_i - tgt_i + z_loss * lse_i**2                 (0 where t_i == ignore_index)

The gradient with respect to y is, per row, two coefficients times two patterns:

    dL/dy_ij = coef_p_i * softmax_ij - coef_q_i * ((1 - ls) * [j == t_i] + ls / V)
    coef_p_i = g_i * (1 + 2 * z_loss * lse_i) + dlse_i ,   coef_q_i = g_i

where g_i is the upstream gradient of loss_i (0 for ignored rows) and dlse_i the upstream
gradient of a returned lse. Columns may be masked with bias -inf; a row whose every logit is -inf
has no distribution: lse_i = -inf, loss_i is NaN (0 when ignored) and its softmax counts as 0
(NumPy, JAX CPU). Softcap multiplies by dy/dz = 1 - (y/softcap)**2. Every backend (NumPy, CUDA,
JAX) takes `coef_p`, `coef_q` from `row_coefficients` below, so the reduction, z-loss and ignore
rules live in exactly one place.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any

import numpy as np

REDUCTIONS = ("mean", "sum", "none")
GRAD_DTYPES = (None, "float32")
_FP32_TINY = float(np.finfo(np.float32).tiny)
_FP32_MAX = float(np.finfo(np.float32).max)
# The certificate's default relative tolerance per row (filter_tol=None): the L1 error of a certified
# row's logit gradient is at most twice the relative rounding (2**-9) of a bf16 gradient element.
DEFAULT_FILTER_TOL = 2.0**-8


def certificate_margin(v: int) -> float:
    """The certificate's allowance for the fp32 rounding of its own sums: the bound is scaled up by
    1 + this before the comparison (docs/design.md, "Certified filtering"). A thread of the CUDA
    kernels adds up to V / 4 of a row's dropped terms in turn (at most a half-ulp each), rescales
    its sum at most once a 256-column tile, and the threads' sums then combine in a few more steps;
    each term's exp is within two ulps. 2^-23 a step covers all of them, 2^-10 the kept sum's."""
    return 2.0**-10 + (v / 4 + v / 256 + 64) * 2.0**-23


@dataclasses.dataclass(frozen=True)
class CCEOptions:
    """Options of the fused linear cross-entropy; frozen, hashable, passed whole to every layer.

    Attributes:
        ignore_index: targets equal to it contribute no loss and no gradient. It must fit the
            targets' dtype (a call with int32 targets and an ignore_index outside int32 raises).
        reduction: "mean" (over non-ignored targets; 0 when there are none), "sum" or "none"
            (per-token losses shaped like `targets`, ignored positions 0).
        softcap: logits become softcap * tanh(z / softcap) (Gemma 2); None for off.
        label_smoothing: mass spread uniformly over the V classes, in [0, 1).
        z_loss: weight of the auxiliary z_loss * lse**2 term per token (PaLM), >= 0.
        shift: next-token prediction: position t of a sequence predicts targets[t + 1]; the
            last position of each sequence is ignored. No copy of `e` is made. Sequences run
            along the last axis of `targets`: pass e (B, T, D) and targets (B, T); flattened
            (B*T, D) input would shift across sequence boundaries.
        filter_eps: certified gradient filtering (docs/design.md, "Certified filtering"). None is
            exact. "auto" or a float in (0, 1): each row keeps its target and the columns with
            softmax >= eps ("auto": filter_tol / 16), and a row is filtered only when the L1 mass
            of its dropped logit gradient is certified <= filter_tol times the kept mass (a lower
            bound of the row's whole L1 norm); every other row takes the exact gradient. eps only
            chooses the candidate lists; the error bound comes from the certificate. Filtering
            runs on Hopper with 16-bit inputs; elsewhere (and with deterministic=True) the
            gradient is exact, which meets the certificate trivially.
        filter_tol: the certificate's relative tolerance per row, in (0, 1); None is 2**-8 (the
            relative rounding of a bf16 gradient element is 2**-9). Only with filter_eps.
        return_lse: also return the per-token logsumexp (fp32, shaped like `targets`).
        return_z_loss: also return the z-loss part of the loss, reduced like the loss.
        grad_dtype: None for gradients in the input dtype, "float32" for fp32 gradients.
        deterministic: bitwise reproducible gradients (no float atomics; a filtered backward
            is then exact).
        allow_tf32: fp32 inputs on Hopper: the forward's matmul runs on TF32 tensor cores (10-bit
            mantissa products, fp32 accumulation: ~5x faster, logits ~1e-3 relative off, so the
            loss no longer meets fp32 accuracy). The backward stays exact fp32.
        memory_budget: extra device memory, in bytes, that a call computing gradients may use
            (`linear_cross_entropy_with_grad`; under JAX the custom_vjp forward when differentiated).
            "lean" (default): the recompute path (tens of MiB; four GEMMs' work). A number of bytes:
            where it fits a chunk of rows (bf16/fp16 on Hopper), the forward keeps each chunk's
            softmax (2 bytes a logit) and the backward reads it instead of recomputing: three
            GEMMs' work, still exact (docs/design.md, "Memory budget"). N * V * 2 bytes (what a loss
            keeping bf16 logits holds) take every row at once where the rest fits in the dC
            output's bytes until its GEMM (bf16 inputs, no label smoothing; gemma2's and llama3's
            shapes do; cce_cupy.cuda.budget.budget_plan tells for others). Less runs chunks of at
            least 1024 rows beside an fp32 (V, D) dC accumulator, slower. Elsewhere, or when the
            budget is too small for a chunk, the lean path runs (it needs less than any budget it
            declines).
    """

    ignore_index: int = -100
    reduction: str = "mean"
    softcap: float | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    shift: bool = False
    filter_eps: float | str | None = None
    filter_tol: float | None = None
    return_lse: bool = False
    return_z_loss: bool = False
    grad_dtype: str | None = None
    deterministic: bool = False
    allow_tf32: bool = False
    memory_budget: int | str = "lean"

    def __post_init__(self) -> None:
        if not (isinstance(self.ignore_index, numbers.Integral) and not _is_bool(self.ignore_index)):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if not -(2**63) <= self.ignore_index < 2**63:
            raise ValueError(f"ignore_index must be an int in [-2**63, 2**63), got {self.ignore_index!r}")
        # NumPy scalars are stored as Python numbers (equal options hash alike, repr stays plain).
        object.__setattr__(self, "ignore_index", int(self.ignore_index))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        # The kernels take softcap and z_loss as fp32: finite and representable there.
        if self.softcap is not None and not (_is_real(self.softcap) and _FP32_TINY <= self.softcap <= _FP32_MAX):
            raise ValueError(
                f"softcap must be None or a finite float in [{_FP32_TINY:.3g}, {_FP32_MAX:.3g}] (fp32), "
                f"got {self.softcap!r}"
            )
        if not (_is_real(self.label_smoothing) and 0.0 <= self.label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must be a float in [0, 1), got {self.label_smoothing!r}")
        if not (_is_real(self.z_loss) and 0.0 <= self.z_loss <= _FP32_MAX):
            raise ValueError(f"z_loss must be a finite float in [0, {_FP32_MAX:.3g}] (fp32), got {self.z_loss!r}")
        if self.filter_eps is not None:
            if self.filter_eps != "auto" and not (_is_real(self.filter_eps) and 0.0 < self.filter_eps < 1.0):
                raise ValueError(f"filter_eps must be None, 'auto' or a float in (0, 1), got {self.filter_eps!r}")
        if self.filter_tol is not None:
            if not (_is_real(self.filter_tol) and 0.0 < self.filter_tol < 1.0):
                raise ValueError(f"filter_tol must be None or a float in (0, 1), got {self.filter_tol!r}")
            if self.filter_eps is None:
                raise ValueError(
                    "filter_tol applies only to a filtered backward: pass filter_eps='auto' (or a float) "
                    "with it, or drop filter_tol"
                )
        for name in ("softcap", "label_smoothing", "z_loss", "filter_eps", "filter_tol"):
            value = getattr(self, name)
            if value is not None and value != "auto":
                object.__setattr__(self, name, float(value))
        if self.memory_budget != "lean":
            if not (isinstance(self.memory_budget, numbers.Integral) and not _is_bool(self.memory_budget)):
                raise TypeError(
                    "memory_budget must be 'lean' or a number of bytes (an int, e.g. 4 << 30), "
                    f"got {self.memory_budget!r}"
                )
            if self.memory_budget <= 0:
                raise ValueError(
                    f"memory_budget must be a positive number of bytes or 'lean', got {self.memory_budget!r}"
                )
            if self.filter_eps is not None:
                raise ValueError(
                    "memory_budget keeps the softmax for an exact backward and filter_eps drops gradient "
                    "elements: pass one of them (memory_budget='lean' or filter_eps=None)"
                )
            object.__setattr__(self, "memory_budget", int(self.memory_budget))
        if self.grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype must be None or 'float32', got {self.grad_dtype!r}")
        for flag in ("shift", "return_lse", "return_z_loss", "deterministic", "allow_tf32"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")

    def replace(self, **changes: Any) -> CCEOptions:
        return dataclasses.replace(self, **changes)

    def resolved_filter_tol(self) -> float | None:
        """The certificate's tolerance: None when exact, else filter_tol (default DEFAULT_FILTER_TOL)."""
        if self.filter_eps is None:
            return None
        return DEFAULT_FILTER_TOL if self.filter_tol is None else self.filter_tol

    def resolved_filter_eps(self) -> float | None:
        """The candidate threshold on the softmax: None when exact; "auto" is tol / 16.

        Why tol / 16: a row can be certified only if its dropped mass is below tol * ||g||_1 <=
        2 tol (1 + ...) (1 - p_t), so candidates far below tol cannot decide it, while every entry
        of at least tol / 16 is kept: one dropped entry uses at most 1/32 of the allowance of a row
        whose non-target mass is 1. At tol = 2**-8 that is 2**-12, the threshold "auto" had for bf16.
        """
        if self.filter_eps == "auto":
            return self.resolved_filter_tol() / 16.0
        return self.filter_eps


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(CCEOptions))


def make_options(options: CCEOptions | None = None, **kwargs: Any) -> CCEOptions:
    """Options from an options object and/or keyword overrides (unknown names raise)."""
    base = _DEFAULTS if options is None else options
    if not isinstance(base, CCEOptions):
        raise TypeError(f"options must be a CCEOptions, got {type(base).__name__}")
    unknown = sorted(set(kwargs) - _OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; known options: {sorted(_OPTION_NAMES)}")
    for name, value in kwargs.items():
        if is_jax_tracer(value):
            raise TypeError(
                f"{name} is a JAX tracer: options must be static Python values (e.g. softcap=30.0), "
                "fixed when the function is traced. Pass it as a Python number, or mark the argument "
                "static (jax.jit(..., static_argnames=...))"
            )
    if not kwargs:
        return base
    # A call's options are usually the same as its last call's: building and validating them took
    # ~0.1 ms, host time before a GPU call's first kernel. The key holds each value's type, so that
    # a value equal to a cached one but of another type (1 for True) is still validated itself.
    key = tuple((name, type(value), value) for name, value in sorted(kwargs.items()))
    try:
        return _replaced(base, key)
    except TypeError:  # an unhashable value: validation names it
        return base.replace(**kwargs)


@functools.lru_cache(maxsize=64)
def _replaced(base: CCEOptions, key: tuple) -> CCEOptions:
    return base.replace(**{name: value for name, _, value in key})


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def is_jax_tracer(x: Any) -> bool:
    """True for a JAX tracer (under jit, grad, vmap, ...), without importing JAX."""
    return any(k.__name__ == "Tracer" and k.__module__.startswith("jax.") for k in type(x).__mro__)


def _is_real(x: Any) -> bool:
    """A Python or NumPy real number (not a bool)."""
    return isinstance(x, numbers.Real) and not _is_bool(x)


_DEFAULTS = CCEOptions()  # built (and validated) once, after the checks it runs: immutable, asked for on every call


def dtype_eps(dtype) -> float:
    """Machine epsilon of an input dtype, the base of filter_eps="auto" (2**-7 for bfloat16, whose
    np.finfo NumPy does not know)."""
    dt = np.dtype(dtype)
    return 2.0**-7 if dt.name == "bfloat16" else float(np.finfo(dt).eps)


def acc_dtype(dtype) -> np.dtype:
    """The accumulation dtype: float64 for float64 inputs, else float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def grad_dtype(input_dtype, opts: CCEOptions) -> np.dtype:
    """The dtype gradients are computed and written in: float32 with grad_dtype="float32", else the input's."""
    return np.dtype(np.float32) if opts.grad_dtype == "float32" else np.dtype(input_dtype)


def z_loss_dlse(z_loss: float, lse):
    """d(z_loss * lse**2) / d lse = 2 z_loss lse: coef_p = g * (1 + z_loss_dlse) (see the top).
    Kernel-side mirror: ce_row in cce_cupy/kernels/reductions.cu (r.cp); keep the two in step."""
    return 2.0 * z_loss * lse


def row_coefficients(xp, opts: CCEOptions, valid, lse, grad_loss, grad_lse=None):
    """Per-row (coef_p, coef_q), fp32, for dL/dy = coef_p * softmax - coef_q * smoothed_onehot.

    xp: the array namespace (numpy, cupy or jax.numpy). valid: bool (N,). lse: fp32 (N,).
    grad_loss: the upstream gradient of the returned loss: a scalar for "mean"/"sum", an (N,)
    array for "none". grad_lse: optional (N,) upstream gradient of a returned lse.
    """
    g = row_loss_grads(xp, opts, valid, grad_loss)
    return softmax_coefficient(xp, opts, g, lse, grad_lse), g


def softmax_coefficient(xp, opts: CCEOptions, coef_q, lse, grad_lse=None):
    """coef_p of row_coefficients from its coef_q (row_loss_grads) and the lse, for callers that
    have coef_q already (the certified filter forms it before the forward, for the thresholds)."""
    coef_p = coef_q * (1.0 + z_loss_dlse(opts.z_loss, lse)) if opts.z_loss else coef_q
    if grad_lse is not None:
        coef_p = coef_p + xp.asarray(grad_lse, dtype=xp.float32)
    return coef_p.astype(xp.float32)


def row_loss_grads(xp, opts: CCEOptions, valid, grad_loss):
    """coef_q of row_coefficients: each row's upstream loss gradient, fp32, 0 where ignored (the
    reduction's scale included). It needs no lse, so callers that form coef_p later (the
    memory-budgeted path, on the device beside the lse) take it alone. Shaped like valid, or a
    scalar broadcast where valid is."""
    validf = valid.astype(xp.float32)
    if not isinstance(grad_loss, np.float32):  # a host scalar needs no copy to the device
        grad_loss = xp.asarray(grad_loss, dtype=xp.float32)
    if opts.reduction == "mean":
        g = validf * (grad_loss / xp.maximum(xp.sum(validf), 1.0))
    else:  # "sum" broadcasts a scalar; "none" is per row
        g = validf * grad_loss
    return g if g.dtype == xp.float32 else g.astype(xp.float32)  # a copy costs a launch


def analytic_smoothing(opts: CCEOptions) -> bool:
    """Whether a certified filtered row keeps label smoothing's constant -coef_q ls / V on its
    dropped columns, exactly, as rank-one terms of dE, dC and dbias: without softcap. With softcap
    that constant is scaled by softcap' per element, so it is dropped with the element and counted
    in the row's bound instead (docs/design.md, "Certified filtering")."""
    return opts.label_smoothing > 0.0 and opts.softcap is None


def per_token_loss(xp, opts: CCEOptions, valid, lse, tgt):
    """(loss_i, z_loss_i) per row, fp32, zero where ignored."""
    zl = opts.z_loss * lse * lse if opts.z_loss else xp.zeros_like(lse)
    loss = xp.where(valid, lse - tgt + zl, 0.0).astype(xp.float32)
    return loss, xp.where(valid, zl, 0.0).astype(xp.float32)


def reduce_loss(xp, opts: CCEOptions, valid, per_token):
    """Apply the reduction to per-token values (ignored rows already 0)."""
    if opts.reduction == "none":
        return per_token
    total = xp.sum(per_token, dtype=xp.float32)
    if opts.reduction == "sum":
        return total
    return (total / xp.maximum(xp.sum(valid.astype(xp.float32)), 1.0)).astype(xp.float32)


def shifted_targets(xp, targets, opts: CCEOptions):
    """Targets each row is scored against: targets[..., t + 1] under `shift` (last -> ignored)."""
    if not opts.shift:
        return targets
    if targets.ndim == 0:
        raise ValueError("targets: shift=True needs targets with a sequence dimension (..., T), got a scalar")
    pad = xp.full(targets.shape[:-1] + (1,), opts.ignore_index, dtype=targets.dtype)
    return xp.concatenate([targets[..., 1:], pad], axis=-1)
