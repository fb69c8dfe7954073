"""The public functions: array-kind dispatch, batch dims, shift, reductions and errors.

Array kinds:
    * NumPy arrays run the NumPy backend (`cce_cupy.numpy_backend`, blocked, never N x V).
    * CuPy arrays run the CUDA kernels (`cce_cupy.cuda`) on CuPy's current stream.
    * Any other GPU array with `__dlpack__` (PyTorch, JAX, ...) is viewed zero-copy through
      `cupy.from_dlpack`, runs the kernels, and results come back as that kind.
    * Other CPU arrays with `__array__` (a JAX CPU array, a PyTorch CPU tensor) go through
      `numpy.asarray` to the NumPy backend and come back as their kind.
All arrays of one call must be of one kind and, on GPU, on one device; NumPy arrays may go with
one framework's CPU arrays (NumPy targets beside JAX arrays). JAX tracers are refused with a pointer
to `jax_bindings`, and tensors that require grad with a pointer to `.detach()`: this API is eager
and records no autograd.

Leading batch dims of `e` (and `targets`) are flattened with `reshape`, which copies only when the
input is not contiguous; non-contiguous inputs are therefore copied (once) before the kernels.

Out-of-range targets (not ignore_index, outside [0, V)): the per-token loss is NaN.
    * NumPy backend: ValueError at once, before anything is computed.
    * GPU: the kernels set a device flag; this module copies it asynchronously to pinned host
      memory after each call (no host sync). The ValueError is raised at the start of the next
      call of this module in the same thread once that copy has landed, or by `check_targets()`,
      which waits for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
from typing import Any

import numpy as np

from cce_cupy import numpy_backend
from cce_cupy._arrays import _Kind, _take
from cce_cupy._targets import _WATCH, _check_targets_now
from cce_cupy.cuda import backward as cuda_backward
from cce_cupy.cuda import budget as cuda_budget
from cce_cupy.cuda import filter_history
from cce_cupy.cuda import filtered as cuda_filtered
from cce_cupy.cuda import forward as cuda_forward
from cce_cupy.cuda import logits as cuda_logits
from cce_cupy.options import (
    CCEOptions,
    grad_dtype,
    make_options,
    per_token_loss,
    reduce_loss,
    row_coefficients,
    row_loss_grads,
    shifted_targets,
)
from cce_cupy.validate import check_cross_entropy_args, check_ignore_index, check_linear_ce_args, dtype_of


# ------------------------------------------------------------------ out-of-range targets
def check_targets() -> None:
    """Wait for this thread's GPU calls made so far and raise ValueError if any saw an out-of-range
    target.

    GPU calls never synchronize to check targets: an out-of-range target makes its loss NaN and
    sets a device flag (one per thread), which is reported at the start of a later call of the same
    thread (once known without waiting) or here. The NumPy backend raises at once. Clears the flag
    after reporting.
    """
    _WATCH.poll(block=True)


# -------------------------------------------------------------------------------- helpers
@dataclasses.dataclass
class _Call:
    """One validated call, flattened for the backends."""

    kind: _Kind
    opts: CCEOptions
    batch_shape: tuple[int, ...]
    e: Any  # (N, D) C-contiguous
    c: Any
    bias: Any
    targets: Any  # (N,) shifted

    @functools.cached_property
    def valid(self):
        """(N,) bool: the rows whose target is not ignore_index. Made when first asked for: the
        budgeted path asks only after its forward is launched."""
        return self.targets != self.opts.ignore_index


def _prepare(e, c, targets, bias, options, kwargs, extra=None) -> tuple[_Call, dict[str, Any]]:
    opts = make_options(options, **kwargs)
    named = {"e": e, "c": c, "targets": targets, "bias": bias}
    named.update(extra or {})
    kind, conv = _take(named)
    p = check_linear_ce_args(conv["e"], conv["c"], conv["targets"], conv["bias"])
    check_ignore_index(opts.ignore_index, p.index_dtype)
    xp = kind.xp
    t = conv["targets"]
    t = _flat_targets(xp, t, opts)
    if kind.name in ("numpy", "host"):
        _check_targets_now(t, p.v, opts)
    else:
        _WATCH.poll()
    call = _Call(
        kind,
        opts,
        p.batch_shape,
        xp.ascontiguousarray(conv["e"].reshape(p.n, p.d)),
        xp.ascontiguousarray(conv["c"]),
        None if conv["bias"] is None else xp.ascontiguousarray(conv["bias"]),
        t,
    )
    return call, conv


def _device_ctx(call: _Call):
    if call.kind.xp is np:
        return contextlib.nullcontext()
    return call.kind.xp.cuda.Device(call.kind.device)


def _forward(call: _Call, allow_tf32: bool = False):
    """(lse, tgt) fp32 (N,) on the call's backend. allow_tf32 only where no gradient will be taken
    from the result (a backward needs the lse of the same exact logits it recomputes)."""
    xp, n = call.kind.xp, call.e.shape[0]
    if xp is np:
        lse, tgt = numpy_backend.forward(call.e, call.c, call.targets, call.bias, call.opts)
        return lse.astype(np.float32), tgt.astype(np.float32)
    lse = xp.empty(n, dtype=xp.float32)
    tgt = xp.empty(n, dtype=xp.float32)
    opts = call.opts.replace(allow_tf32=False) if call.opts.allow_tf32 and not allow_tf32 else call.opts
    cuda_forward.launch_forward(call.e, call.c, call.targets, call.bias, opts, lse, tgt)
    _WATCH.after_launch(xp)
    return lse, tgt


def _backward(call: _Call, lse, coef_p, coef_q, stats: dict | None = None):
    xp = call.kind.xp
    counted = None if stats is None else {}
    if xp is np:
        out = numpy_backend.backward(
            call.e, call.c, call.targets, call.bias, call.opts, lse, coef_p, coef_q, stats=counted
        )
    else:
        de, dc, db = _grad_outputs(call)
        cuda_backward.launch_backward(
            call.e, call.c, call.targets, call.bias, call.opts, lse, coef_p, coef_q, de, dc, db, stats=counted
        )
        out = de, dc, db
    if stats is not None:
        stats.update(_filter_stats(xp, counted, coef_p, coef_q))
    return out


def _filter_stats(xp, counted: dict, coef_p, coef_q) -> dict[str, int]:
    """{"rows", "certified_rows"} of one backward from the backend's counts: the NumPy backend
    counts certified rows, the CUDA one the uncertified ("fallback") rows; a backward that ran
    exact (no filter_eps, or a GPU without the sparse backward) counts nothing and certified none."""
    rows = counted.get("rows")
    if rows is None:
        rows = int(xp.count_nonzero((coef_p != 0) | (coef_q != 0)))
    certified = counted.get("certified_rows", rows - counted.get("fallback_rows", rows))
    return {"rows": int(rows), "certified_rows": int(certified)}


def _grad_outputs(call: _Call, with_dc: bool = True):
    """Uninitialized (de, dc, db) on the call's device, in grad_dtype (db None without bias; dc
    None unless with_dc)."""
    xp = call.kind.xp
    n, d = call.e.shape
    v = call.c.shape[0]
    gdt = grad_dtype(call.e.dtype, call.opts)
    db = xp.empty((v,), dtype=gdt) if call.bias is not None else None
    return xp.empty((n, d), dtype=gdt), xp.empty((v, d), dtype=gdt) if with_dc else None, db


def _fused_outputs(call: _Call, with_dc: bool = True):
    """Uninitialized (lse, tgt, de, dc, db) for the fused launchers: fp32 (N,) loss terms and
    _grad_outputs."""
    xp, n = call.kind.xp, call.e.shape[0]
    return (xp.empty(n, dtype=xp.float32), xp.empty(n, dtype=xp.float32), *_grad_outputs(call, with_dc))


def _fused_budgeted(call: _Call, g):
    """(lse, tgt, de, dc, db) by the memory-budgeted path (cce_cupy.cuda.budget), or None where
    it does not apply (no budget, NumPy, not the Hopper forward's inputs, a budget below one chunk)."""
    xp = call.kind.xp
    if call.opts.memory_budget == "lean" or xp is np or not cuda_budget.budget_applies(call.e, call.c, call.opts):
        return None
    n, d = call.e.shape
    v = call.c.shape[0]
    # dc_later: with several chunks, dC is made from its fp32 accumulator after them (below), so
    # its bytes are room for the chunks meanwhile.
    plan = cuda_budget.budget_plan(n, v, d, call.e.dtype, call.opts, call.bias is not None, dc_later=True)
    if plan is None:
        return None
    lse, tgt, de, dc, db = _fused_outputs(call, with_dc=not plan.acc_apart)
    acc = xp.empty((v, d), dtype=xp.float32) if plan.acc_apart else None
    scratch = xp.empty(plan.nbytes, dtype=xp.uint8)

    def row_grad():
        # coef_q (each row's loss gradient) needs no lse; the kernel forms coef_p from it and the lse.
        q = row_loss_grads(xp, call.opts, call.valid, g)
        return xp.ascontiguousarray(xp.broadcast_to(q, (n,)), dtype=xp.float32)

    # A scalar grad_loss (the usual case) leaves row_grad to be made while the forward runs; a per-row one
    # is made first, so that the forward skips the rows it zeroes.
    cuda_budget.launch_fused_budgeted(
        call.e, call.c, call.targets, call.bias, call.opts, plan, row_grad if g.ndim == 0 else row_grad(), lse, tgt, de,
        dc if acc is None else acc, db, scratch,
    )  # fmt: skip
    if acc is not None:
        scratch = None  # back to the pool (stream-ordered) before the output is made
        dc = acc.astype(grad_dtype(call.e.dtype, call.opts))
    _WATCH.after_launch(xp)
    return lse, tgt, de, dc, db


def _fused_filtered(call: _Call, g, stats=None) -> tuple[_Call, tuple | None]:
    """(call, (lse, tgt, de, dc, db)) by the certified filter with the forward's candidate lists
    (cce_cupy.cuda.filtered); (call, None) where it does not apply (no filter_eps, NumPy, not the
    Hopper forward's inputs, no list slots), and (the call with the filter off, None) where the
    last filtered call of this problem certified too few rows to pay (cuda.filter_history)."""
    xp = call.kind.xp
    if call.opts.filter_eps is None or xp is np or not cuda_filtered.filtered_applies(call.e, call.c, call.opts):
        return call, None
    key = filter_history.HISTORY.key(call.e, call.c, call.bias, call.opts)
    if not filter_history.HISTORY.use_filter(key):
        return dataclasses.replace(call, opts=call.opts.replace(filter_eps=None, filter_tol=None)), None
    lse, tgt, de, dc, db = _fused_outputs(call)
    counted = {}
    cuda_filtered.launch_fused_filtered(
        call.e, call.c, call.targets, call.bias, call.opts, call.valid, g, lse, tgt, de, dc, db, counted
    )
    filter_history.HISTORY.record(key, counted["rows"], counted["fallback_rows"])
    if stats is not None:
        stats.update(counted)
    _WATCH.after_launch(xp)
    return call, (lse, tgt, de, dc, db)


def _grad_loss_array(xp, grad_loss, call: _Call, name: str = "grad_loss"):
    """grad_loss as a float32 scalar, or (N,) for reduction="none" (a scalar is broadcast). A Python
    or NumPy number stays on the host (np.float32): a copy to the device would cost host time
    before the first kernel."""
    if isinstance(grad_loss, (numbers.Real, np.number)) and not isinstance(grad_loss, np.ndarray):
        return np.float32(grad_loss)
    g = xp.asarray(grad_loss, dtype=xp.float32)
    if call.opts.reduction == "none":
        if g.ndim == 0:
            return g
        if tuple(g.shape) != call.batch_shape:
            raise ValueError(
                f"{name} must be a scalar or shaped like targets {call.batch_shape} for reduction='none', "
                f"got shape {tuple(g.shape)}"
            )
        return g.reshape(-1)
    if g.ndim != 0:
        raise ValueError(f"{name} must be a scalar for reduction={call.opts.reduction!r}, got shape {tuple(g.shape)}")
    return g


def _loss_outputs(call: _Call, lse, tgt):
    """(loss, extras): the reduced loss and [lse][, z_loss] as requested, on the backend."""
    xp, o = call.kind.xp, call.opts
    loss_tok, zl_tok = per_token_loss(xp, o, call.valid, lse, tgt)
    loss = reduce_loss(xp, o, call.valid, loss_tok)
    if o.reduction == "none":
        loss = loss.reshape(call.batch_shape)
    extras = []
    if o.return_lse:
        extras.append(lse.reshape(call.batch_shape))
    if o.return_z_loss:
        zl = reduce_loss(xp, o, call.valid, zl_tok)
        extras.append(zl.reshape(call.batch_shape) if o.reduction == "none" else zl)
    return loss, extras


# --------------------------------------------------------------------------- public API
def linear_cross_entropy(e, c, targets, bias=None, *, options: CCEOptions | None = None, **option_kwargs):
    """Cross-entropy of `e @ c.T (+ bias)` against `targets`, without the N x V logits.

    Args:
        e: (..., D) float32, float16 or bfloat16 embeddings.
        c: (V, D) classifier of e's dtype.
        targets: (...) = e.shape[:-1], int32 or int64 class indices (or ignore_index).
        bias: optional (V,) of e's dtype.
        options: a `CCEOptions`; keyword arguments override its fields (see docs/design.md, Options).

    Returns:
        The float32 loss (a scalar for "mean"/"sum", shaped like targets for "none"). With
        return_lse and/or return_z_loss, a tuple `(loss[, lse][, z_loss])` in that order: lse is
        the fp32 per-token logsumexp shaped like targets, z_loss is reduced like the loss.
    """
    call, _ = _prepare(e, c, targets, bias, options, option_kwargs)
    with _device_ctx(call):
        lse, tgt = _forward(call, allow_tf32=call.opts.allow_tf32)
        loss, extras = _loss_outputs(call, lse, tgt)
    out = [call.kind.back(x) for x in [loss, *extras]]
    return out[0] if len(out) == 1 else tuple(out)


def linear_cross_entropy_with_grad(
    e,
    c,
    targets,
    bias=None,
    *,
    grad_loss=1.0,
    stats: dict | None = None,
    options: CCEOptions | None = None,
    **option_kwargs,
):
    """The loss and its gradients in one call (no autograd).

    Args:
        grad_loss: the upstream gradient of the loss: a scalar, or for reduction="none" a scalar
            or an array shaped like targets.
        stats: an optional dict that receives how the backward went: "rows", the rows with a
            nonzero gradient, and "certified_rows", those of them whose gradient the certified
            filter gave (filter_eps; the others took the exact path). 0 certified when the
            backward ran exact: with filter_eps on the GPU, that includes the calls that follow
            one that certified under half its rows (15 of every 16 such calls run exact: see
            cce_cupy.cuda.filter_history). On the GPU, filling it waits for the call (one host sync).
        Others as in `linear_cross_entropy`.

    Returns:
        `(loss, de, dc[, dbias][, lse][, z_loss])`: dbias only when bias is given; lse and z_loss
        when requested (as in `linear_cross_entropy`). de is shaped like e; gradients are in e's
        dtype, or float32 with grad_dtype="float32". The gradients do not include the returned
        lse's own gradient (use `backward(..., grad_lse=...)` for that).
    """
    call, _ = _prepare(e, c, targets, bias, options, option_kwargs)
    xp = call.kind.xp
    with _device_ctx(call):
        g = _grad_loss_array(xp, grad_loss, call)
        counted = None if stats is None else {}  # the fused filtered call's counts (budgeted: exact, none)
        fused = _fused_budgeted(call, g)
        if fused is None:
            call, fused = _fused_filtered(call, g, counted)
        if fused is not None:
            lse, tgt, de, dc, db = fused
            if stats is not None:
                q = row_loss_grads(xp, call.opts, call.valid, g)
                stats.update(_filter_stats(xp, counted, q, q))
        else:
            lse, tgt = _forward(call)
            coef_p, coef_q = row_coefficients(xp, call.opts, call.valid, lse, g)
            de, dc, db = _backward(call, lse, coef_p, coef_q, stats)
        loss, extras = _loss_outputs(call, lse, tgt)
    grads = [de.reshape(*call.batch_shape, de.shape[-1]), dc] + ([db] if db is not None else [])
    return tuple(call.kind.back(x) for x in [loss, *grads, *extras])


def forward(e, c, targets, bias=None, *, options: CCEOptions | None = None, **option_kwargs):
    """Per-token `(lse, tgt)`, float32, shaped like targets: the primitive the bindings build on.

    lse = logsumexp_j y_j, tgt = (1 - ls) * y_t + ls / V * sum_j y_j (0 where ignored, NaN where the
    target is out of range), with y = softcap(e @ c.T + bias); targets are shifted under `shift`.
    The loss is `lse - tgt + z_loss * lse**2` on valid tokens (see cce_cupy.options).
    """
    call, _ = _prepare(e, c, targets, bias, options, option_kwargs)
    with _device_ctx(call):
        lse, tgt = _forward(call)
    return call.kind.back(lse.reshape(call.batch_shape)), call.kind.back(tgt.reshape(call.batch_shape))


def backward(
    e,
    c,
    targets,
    lse,
    grad_loss,
    bias=None,
    *,
    grad_lse=None,
    options: CCEOptions | None = None,
    **option_kwargs,
):
    """Gradients `(de, dc[, dbias])` of the loss given the forward's lse.

    Args:
        lse: the per-token logsumexp from `forward`, shaped like targets.
        grad_loss: upstream gradient of the loss (scalar; for "none" a scalar or shaped like targets).
        grad_lse: optional upstream gradient of lse, shaped like targets.
    """
    call, conv = _prepare(e, c, targets, bias, options, option_kwargs, {"lse": lse, "grad_lse": grad_lse})
    xp = call.kind.xp
    for name in ("lse", "grad_lse"):
        x = conv[name]
        if x is not None and tuple(x.shape) != call.batch_shape:
            raise ValueError(f"{name} must be shaped like targets {call.batch_shape}, got {tuple(x.shape)}")
    with _device_ctx(call):
        lse_f = xp.ascontiguousarray(conv["lse"].reshape(-1).astype(xp.float32))
        gl = None if conv["grad_lse"] is None else conv["grad_lse"].reshape(-1).astype(xp.float32)
        g = _grad_loss_array(xp, grad_loss, call)
        coef_p, coef_q = row_coefficients(xp, call.opts, call.valid, lse_f, g, gl)
        de, dc, db = _backward(call, lse_f, xp.ascontiguousarray(coef_p), xp.ascontiguousarray(coef_q))
    grads = [de.reshape(*call.batch_shape, de.shape[-1]), dc] + ([db] if db is not None else [])
    return tuple(call.kind.back(x) for x in grads)


def _flat_targets(xp, t, opts: CCEOptions):
    """The targets each row is scored against (shifted under `shift`), flattened and contiguous."""
    if opts.shift:
        t = shifted_targets(xp, t, opts)
    return xp.ascontiguousarray(t.reshape(-1))


def cross_entropy(
    logits,
    targets,
    *,
    inplace_backward: bool = False,
    grad_loss=1.0,
    options: CCEOptions | None = None,
    **option_kwargs,
):
    """Cross-entropy of materialized logits (..., V) against targets (...), one pass per row.

    With `inplace_backward=True` the logits buffer is overwritten with dloss/dlogits (for the
    upstream gradient `grad_loss`, a scalar or, for "none", shaped like targets), so the backward
    needs no extra N x V memory; the logits must then be a writable, contiguous NumPy/CuPy/GPU
    array (JAX arrays are immutable: use jax_bindings). Under `shift` the gradient of each
    sequence's last position is 0. Returns what `linear_cross_entropy` returns.
    """
    opts = make_options(options, **option_kwargs)
    kind, conv = _take({"logits": logits, "targets": targets})
    x, t = conv["logits"], conv["targets"]
    p = check_cross_entropy_args(x, t)
    check_ignore_index(opts.ignore_index, p.index_dtype)
    xp = kind.xp
    if inplace_backward:
        if kind.module in ("jax", "jaxlib"):
            raise TypeError("logits: inplace_backward=True needs a mutable array; JAX arrays are immutable")
        if not x.flags.c_contiguous or kind.name == "host":
            raise ValueError("logits: inplace_backward=True needs a C-contiguous NumPy/CuPy/GPU array to write into")
    t = _flat_targets(xp, t, opts)
    x2 = x.reshape(p.n, p.v)
    if not inplace_backward:
        x2 = xp.ascontiguousarray(x2)
    if kind.name in ("numpy", "host"):
        _check_targets_now(t, p.v, opts)
    else:
        _WATCH.poll()
    call = _Call(kind, opts, p.batch_shape, None, None, None, t)
    valid = call.valid
    ctx = contextlib.nullcontext() if xp is np else xp.cuda.Device(kind.device)
    with ctx:
        row_grad = None
        if inplace_backward:
            g = _grad_loss_array(xp, grad_loss, call)
            row_grad = row_loss_grads(xp, opts, valid, g)
            row_grad = xp.ascontiguousarray(xp.broadcast_to(row_grad, (p.n,)).astype(xp.float32))
        if xp is np:
            lse, tgt = numpy_backend.cross_entropy_logits(x2, t, opts, row_grad)
            lse, tgt = lse.astype(np.float32), tgt.astype(np.float32)
        else:
            lse = xp.empty(p.n, dtype=xp.float32)
            tgt = xp.empty(p.n, dtype=xp.float32)
            cuda_logits.launch_cross_entropy(x2, t, opts, lse, tgt, row_grad)
            _WATCH.after_launch(xp)
        loss, extras = _loss_outputs(call, lse, tgt)
    out = [kind.back(y) for y in [loss, *extras]]
    return out[0] if len(out) == 1 else tuple(out)


__all__ = [
    "CCEOptions",
    "backward",
    "check_targets",
    "cross_entropy",
    "dtype_of",
    "forward",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
]
