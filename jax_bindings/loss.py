"""`linear_cross_entropy` for JAX: one `jax.custom_vjp` over the kernels (GPU) or the pure-JAX
blocked reference (CPU and every other platform), never materializing the N x V logits.

Layout (as in JAX's FFI rms_norm example): the primal `_lce`, `_lce_fwd` returning the residuals
(the inputs and the per-row logsumexp, never logits), `_lce_bwd` turning the cotangents into the
per-row coefficients of `cce_cupy.options.row_coefficients`, and `defvjp` at the bottom.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cce_cupy.cuda import filtered as cuda_filtered
from cce_cupy.options import (
    CCEOptions,
    grad_dtype,
    make_options,
    per_token_loss,
    reduce_loss,
    row_coefficients,
    row_loss_grads,
    shifted_targets,
    z_loss_dlse,
)
from cce_cupy.validate import check_ignore_index, check_linear_ce_args
from jax_bindings import gpu, jax_reference
from jax_bindings._dispatch import check_call_args, dispatch


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call: hashable, the nondiff argument of the custom_vjp."""

    opts: CCEOptions
    backward_impl: str
    vmap_method: str
    command_buffer_compatible: bool
    block_v: int | None
    kernels: bool  # False: the reference on every platform (float64 inputs)


def _split_bias(args):
    return args if len(args) == 4 else (*args, None)


def _forward(e, c, t, bias, cfg: _Config):
    """Per-row (lse, tgt) in the accumulation type."""
    opts = cfg.opts

    def ref_fn(*a):
        return jax_reference.forward(*_split_bias(a)[:3], _split_bias(a)[3], opts, cfg.block_v)

    def gpu_fn(*a):
        e_, c_, t_, b_ = _split_bias(a)
        return gpu.forward(
            e_, c_, t_, b_, opts, vmap_method=cfg.vmap_method, command_buffer_compatible=cfg.command_buffer_compatible
        )

    args = (e, c, t) if bias is None else (e, c, t, bias)
    return dispatch(cfg.kernels, ref_fn, gpu_fn, *args)


def _backward(e, c, t, bias, lse, coef_p, coef_q, cfg: _Config):
    """(dE, dC, dbias) (dbias None without bias) in the gradient dtype; cast by the caller."""
    opts = cfg.opts
    has_bias = bias is not None

    def unpack(a):
        return (a[0], a[1], a[2], a[3] if has_bias else None, *a[3 + has_bias :])

    # Both branches of platform_dependent must return the same types: the kernels' gradient dtype
    # (e's dtype, or float32 with grad_dtype="float32"), so the GPU branch adds no conversion.
    gdt = jax_reference.acc_dtype(e.dtype) if not cfg.kernels else grad_dtype(np.dtype(e.dtype), opts)

    def ref_fn(*a):
        e_, c_, t_, b_, lse_, p_, q_ = unpack(a)
        de, dc, db = jax_reference.backward(e_, c_, t_, b_, opts, lse_, p_, q_, cfg.block_v)
        return de.astype(gdt), dc.astype(gdt), (None if db is None else db.astype(gdt))

    def gpu_fn(*a):
        e_, c_, t_, b_, lse_, p_, q_ = unpack(a)
        return gpu.backward(
            e_,
            c_,
            t_,
            b_,
            opts,
            lse_,
            p_,
            q_,
            vmap_method=cfg.vmap_method,
            command_buffer_compatible=cfg.command_buffer_compatible,
        )

    args = (e, c, t) + ((bias,) if has_bias else ()) + (lse, coef_p, coef_q)
    if cfg.backward_impl == "reference":
        return ref_fn(*args)
    return dispatch(cfg.kernels, ref_fn, gpu_fn, *args)


class _KeptGrads(NamedTuple):
    """Residuals of the memory-budgeted forward: the gradients for a loss cotangent of 1, which the
    backward only scales. e_dtype: a zero-size array of e's dtype (the cotangents' dtype)."""

    de: Any
    dc: Any
    db: Any
    e_dtype: Any


class _KeptLists(NamedTuple):
    """Residuals of the forward that also collected the certified filter's candidate lists
    (jax_bindings.gpu.forward_with_lists): the lean residuals and the lists, n x slots x 8 bytes
    and (2 splits + 1) x n x 4 more."""

    e: Any
    c: Any
    t: Any
    bias: Any
    lse: Any
    lists: tuple  # entries (N, slots, 2) int32, row_count (N,) int32, other_mass, part_max (splits, N) f32


def _filter_list_slots(e, c, cfg: _Config) -> int:
    """List slots per row where the differentiated forward collects the certified filter's
    candidates (gpu.filter_list_slots), else 0: the lean path. The reference backward and
    CUDA-graph capture (the backward runs cuBLAS and reads host state) keep the lean path."""
    if (
        cfg.opts.filter_eps is None
        or not cfg.kernels
        or cfg.backward_impl != "kernel"
        or cfg.command_buffer_compatible
        or cfg.opts.memory_budget != "lean"
        or e.shape[0] == 0
    ):
        return 0
    return gpu.filter_list_slots(e, c, cfg.opts)


def _forward_with_lists(e, c, t, bias, slots: int, cfg: _Config):
    """(lse, tgt, lists) with the candidate lists on CUDA; the pure-JAX forward elsewhere, with
    empty lists of the same shapes (its backward is the exact reference, which needs none)."""
    opts = cfg.opts
    has_bias = bias is not None
    n, v = e.shape[0], c.shape[0]
    splits = cuda_filtered.list_splits(n, v)
    # Thresholds for the rows that may get a gradient: those not ignored (a cotangent of another
    # row, through lse, sends that row to the exact path).
    row_grad = (t != opts.ignore_index).astype(jnp.float32)

    def unpack(a):
        return (a[0], a[1], a[2], a[3] if has_bias else None, a[-1])

    def ref_fn(*a):
        e_, c_, t_, b_, _ = unpack(a)
        lse, tgt = jax_reference.forward(e_, c_, t_, b_, opts, cfg.block_v)
        f32 = jnp.float32
        empty = (
            jnp.zeros((n, slots, 2), jnp.int32),
            jnp.zeros((n,), jnp.int32),
            jnp.zeros((splits, n), f32),
            jnp.zeros((splits, n), f32),
        )
        return lse.astype(f32), tgt.astype(f32), empty

    def gpu_fn(*a):
        e_, c_, t_, b_, rg = unpack(a)
        return gpu.forward_with_lists(e_, c_, t_, b_, rg, opts, slots, vmap_method=cfg.vmap_method)

    args = (e, c, t) + ((bias,) if has_bias else ()) + (row_grad,)
    return dispatch(cfg.kernels, ref_fn, gpu_fn, *args)


def _backward_from_lists(e, c, t, bias, lse, coef_p, coef_q, lists, cfg: _Config):
    """(dE, dC, dbias) from the forward's lists on CUDA, the exact pure-JAX backward elsewhere."""
    opts = cfg.opts
    has_bias = bias is not None
    gdt = grad_dtype(np.dtype(e.dtype), opts)

    def unpack(a):
        return (a[0], a[1], a[2], a[3] if has_bias else None, *a[3 + has_bias :])

    def ref_fn(*a):
        e_, c_, t_, b_, lse_, p_, q_, *_ = unpack(a)
        de, dc, db = jax_reference.backward(e_, c_, t_, b_, opts, lse_, p_, q_, cfg.block_v)
        return de.astype(gdt), dc.astype(gdt), (None if db is None else db.astype(gdt))

    def gpu_fn(*a):
        e_, c_, t_, b_, lse_, p_, q_, *lists_ = unpack(a)
        return gpu.backward_from_lists(e_, c_, t_, b_, opts, lse_, p_, q_, lists_, vmap_method=cfg.vmap_method)

    args = (e, c, t) + ((bias,) if has_bias else ()) + (lse, coef_p, coef_q, *lists)
    return dispatch(cfg.kernels, ref_fn, gpu_fn, *args)


def _budget_plan(e, c, has_bias: bool, cfg: _Config):
    """The budgeted path's plan when the differentiated forward can take it, else None (lean).

    Its residuals are the gradients for a loss cotangent of 1, which the backward scales: so the
    loss must be a scalar ("mean"/"sum") and no other output may carry a cotangent (no returned
    lse or z_loss). The backward_impl="reference" switch and CUDA-graph capture (cuBLAS) keep the
    lean path."""
    o = cfg.opts
    if (
        o.memory_budget == "lean"
        or not cfg.kernels
        or cfg.backward_impl != "kernel"
        or cfg.command_buffer_compatible
        or o.reduction == "none"
        or o.return_lse
        or o.return_z_loss
        or e.shape[0] == 0
    ):
        return None
    return gpu.budget_plan(e, c, o, has_bias)


def _fused_budgeted(e, c, t, bias, plan, cfg: _Config):
    """(lse, tgt, dE, dC, dbias) for a loss cotangent of 1: one callback on CUDA, the pure-JAX
    forward and backward elsewhere (same dtypes)."""
    opts = cfg.opts
    has_bias = bias is not None
    gdt = grad_dtype(np.dtype(e.dtype), opts)
    valid = t != opts.ignore_index
    # coef_q (each row's loss gradient) needs no lse; coef_p is formed from it beside the lse.
    row_grad = row_loss_grads(jnp, opts, valid, 1.0)

    def unpack(a):
        return (a[0], a[1], a[2], a[3] if has_bias else None, a[-1])

    def ref_fn(*a):
        e_, c_, t_, b_, _ = unpack(a)
        lse, tgt = jax_reference.forward(e_, c_, t_, b_, opts, cfg.block_v)
        coef_p, coef_q = row_coefficients(jnp, opts, t_ != opts.ignore_index, lse, 1.0)
        de, dc, db = jax_reference.backward(e_, c_, t_, b_, opts, lse, coef_p, coef_q, cfg.block_v)
        f32 = jnp.float32
        return (
            lse.astype(f32),
            tgt.astype(f32),
            de.astype(gdt),
            dc.astype(gdt),
            (None if db is None else db.astype(gdt)),
        )

    def gpu_fn(*a):
        e_, c_, t_, b_, rg = unpack(a)
        return gpu.fused_budgeted(e_, c_, t_, b_, rg, opts, plan, vmap_method=cfg.vmap_method)

    args = (e, c, t) + ((bias,) if has_bias else ()) + (row_grad,)
    return dispatch(cfg.kernels, ref_fn, gpu_fn, *args)


# ------------------------------------------------------------------------------ custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lce(e, c, t, bias, cfg: _Config):
    """(loss, z_loss, lse) of flattened e (N, D), c (V, D), shifted t (N,), bias (V,) or None."""
    out, _ = _lce_forward_pass(e, c, t, bias, cfg)
    return out


def _lce_fwd(e, c, t, bias, cfg: _Config):
    # Differentiated: the backward's exact recompute needs an lse of the same exact logits.
    if cfg.opts.allow_tf32:
        cfg = dataclasses.replace(cfg, opts=cfg.opts.replace(allow_tf32=False))
    plan = _budget_plan(e, c, bias is not None, cfg)
    if plan is not None:
        # Memory budget: the gradients come out of the forward (three GEMMs' work, no recompute).
        lse, tgt, de, dc, db = _fused_budgeted(e, c, t, bias, plan, cfg)
        return _loss_outputs(t, lse, tgt, cfg), _KeptGrads(de, dc, db, jnp.zeros((0,), e.dtype))
    slots = _filter_list_slots(e, c, cfg)
    if slots:
        # Certified filter: the forward also collects the candidate lists, so the backward needs
        # no recompute pass to build them.
        lse, tgt, lists = _forward_with_lists(e, c, t, bias, slots, cfg)
        return _loss_outputs(t, lse, tgt, cfg), _KeptLists(e, c, t, bias, lse, lists)
    return _lce_forward_pass(e, c, t, bias, cfg)


def _lce_forward_pass(e, c, t, bias, cfg: _Config):
    if e.shape[0] == 0:  # no rows: nothing to launch
        lse = tgt = jnp.zeros((0,), jax_reference.acc_dtype(e.dtype))
    else:
        lse, tgt = _forward(e, c, t, bias, cfg)
    return _loss_outputs(t, lse, tgt, cfg), (e, c, t, bias, lse)


def _loss_outputs(t, lse, tgt, cfg: _Config):
    """(loss, z_loss, lse): the reduced loss terms of the per-row lse and tgt."""
    opts = cfg.opts
    xp = jax_reference.namespace(lse.dtype)
    valid = t != opts.ignore_index
    loss_tok, zl_tok = per_token_loss(xp, opts, valid, lse, tgt)
    return reduce_loss(xp, opts, valid, loss_tok), reduce_loss(xp, opts, valid, zl_tok), lse


def _lce_bwd(cfg: _Config, res, cts):
    if isinstance(res, _KeptGrads):  # the budgeted forward's gradients, for a loss cotangent of 1
        g_loss = cts[0]  # lse and z_loss were not returned (see _budget_plan): their cotangents are 0
        dtype = res.e_dtype.dtype
        de, dc = ((x.astype(jnp.float32) * g_loss).astype(dtype) for x in (res.de, res.dc))
        db = None if res.db is None else (res.db.astype(jnp.float32) * g_loss).astype(dtype)
        return de, dc, None, db
    opts = cfg.opts
    e, c, t, bias, lse = res[:5]
    g_loss, g_zl, g_lse = cts
    n = e.shape[0]
    assert lse.shape == (n,), (lse.shape, n)
    assert g_lse.shape == (n,), (g_lse.shape, n)
    xp = jax_reference.namespace(e.dtype)
    valid = t != opts.ignore_index
    grad_lse = g_lse
    if opts.z_loss:
        # The returned z_loss output is reduced like the loss: d z_loss_i / d lse_i = 2 z lse_i.
        w_zl = row_loss_grads(xp, opts, valid, g_zl)
        grad_lse = grad_lse + z_loss_dlse(opts.z_loss, lse) * w_zl
    coef_p, coef_q = row_coefficients(xp, opts, valid, lse, g_loss, grad_lse)
    if n == 0:
        de, dc = jnp.zeros(e.shape, e.dtype), jnp.zeros(c.shape, c.dtype)
        db = None if bias is None else jnp.zeros(bias.shape, bias.dtype)
    elif isinstance(res, _KeptLists):
        de, dc, db = _backward_from_lists(e, c, t, bias, lse, coef_p, coef_q, res.lists, cfg)
    else:
        de, dc, db = _backward(e, c, t, bias, lse, coef_p, coef_q, cfg)
    # Cotangents take the primal dtypes (custom_vjp requires it); grad_dtype="float32" means the
    # kernels accumulate and write in float32 and the single rounding to e's dtype happens here.
    de, dc = de.astype(e.dtype), dc.astype(c.dtype)
    db = None if bias is None else db.astype(bias.dtype)
    return de, dc, None, db


_lce.defvjp(_lce_fwd, _lce_bwd)


# ---------------------------------------------------------------------------------- public
def _targets_array(targets):
    """targets as a JAX array. Host (NumPy) int64 targets with 64-bit types off (jax_enable_x64)
    would be cast to int32, wrapping an out-of-range target onto a valid class: they must fit."""
    if not isinstance(targets, jax.Array) and not jax.config.jax_enable_x64:
        host = np.asarray(targets)
        info = np.iinfo(np.int32)
        if host.dtype.itemsize > 4 and host.size and (host.min() < info.min or host.max() > info.max):
            raise ValueError(
                f"targets holds values outside int32 ({int(host.min())} .. {int(host.max())}), which JAX "
                "would wrap to other classes with 64-bit types off: fix the targets, or enable them with "
                "jax.config.update('jax_enable_x64', True)"
            )
    return jnp.asarray(targets)


def linear_cross_entropy(
    e,
    c,
    targets,
    bias=None,
    *,
    options: CCEOptions | None = None,
    backward_impl: str = "kernel",
    vmap_method: str = "sequential",
    command_buffer_compatible: bool | None = None,
    block_v: int | None = None,
    vocab_parallel_axis: str | None = None,
    vocab_size: int | None = None,
    data_parallel_axis: str | None = None,
    **option_kwargs: Any,
):
    """Cross-entropy of `e @ c.T (+ bias)` against `targets`, differentiable, without N x V logits.

    Args:
        e: (..., D) float32, float16 or bfloat16 embeddings (float64 too: it runs the pure-JAX
            reference on every platform).
        c: (V, D) classifier of e's dtype.
        targets: (...) = e.shape[:-1], int32 or int64 class indices (or ignore_index). No gradient.
        bias: optional (V,) of e's dtype.
        options: a `cce_cupy.CCEOptions`; keyword arguments override its fields (same names and
            defaults as `cce_cupy.linear_cross_entropy`).
        backward_impl: "kernel" (the platform's path) or "reference" (the pure-JAX backward on every
            platform, to tell a forward bug from a backward bug).
        vmap_method: how the GPU callbacks batch under `jax.vmap`: "sequential" (default; one
            callback per batch element), "sequential_unrolled", "expand_dims" or "broadcast_all"
            (one callback looping over the batch). The CPU path batches natively.
        command_buffer_compatible: let XLA capture the GPU callbacks into CUDA graphs; None takes
            `jax_bindings.gpu.COMMAND_BUFFER_COMPATIBLE`.
        block_v: vocabulary columns per block of the pure-JAX path (default: from a memory budget).
        vocab_parallel_axis: inside `jax.shard_map` with `c` (and `bias`) sharded along V over this
            mesh axis: the loss over the whole vocabulary, each device getting its dC shard and the
            full dE (see `jax_bindings.sharded.vocab_parallel_linear_cross_entropy`).
        vocab_size: with vocab_parallel_axis, the true V when c was padded to a multiple of the
            axis size (`jax_bindings.shard_classifier` pads); padded rows are never read.
        data_parallel_axis: with vocab_parallel_axis, the mesh axis sharding the tokens: "mean" and
            "sum" then reduce over all of them.

    Returns:
        The loss (float32; float64 for float64 inputs): a scalar for "mean"/"sum", shaped like
        targets for "none". With return_lse and/or return_z_loss, a tuple `(loss[, lse][, z_loss])`
        in that order, as in `cce_cupy.linear_cross_entropy`.

    Out-of-range targets (not ignore_index, outside [0, V)) give a NaN loss; nothing is raised.
    The pure-JAX path ignores `filter_eps` (its gradient is exact).
    """
    if vocab_parallel_axis is not None:  # inside jax.shard_map: c is this device's vocab slice
        from jax_bindings.sharded import vocab_parallel_linear_cross_entropy  # lazy: sharded builds on jax_bindings

        return vocab_parallel_linear_cross_entropy(
            e,
            c,
            targets,
            bias,
            axis_name=vocab_parallel_axis,
            vocab_size=vocab_size,
            data_parallel_axis=data_parallel_axis,
            options=options,
            backward_impl=backward_impl,
            vmap_method=vmap_method,
            command_buffer_compatible=command_buffer_compatible,
            block_v=block_v,
            **option_kwargs,
        )
    if vocab_size is not None or data_parallel_axis is not None:
        raise ValueError("vocab_size and data_parallel_axis go with vocab_parallel_axis (sharded vocabulary)")
    opts = make_options(options, **option_kwargs)
    prob = check_linear_ce_args(e, c, targets, bias, allow_float64=True)
    command_buffer_compatible = check_call_args(backward_impl, vmap_method, block_v, command_buffer_compatible)
    cfg = _Config(
        opts=opts.replace(shift=False),  # the shift is applied here, once
        backward_impl=backward_impl,
        vmap_method=vmap_method,
        command_buffer_compatible=bool(command_buffer_compatible),
        block_v=None if block_v is None else int(block_v),
        kernels=np.dtype(prob.dtype) != np.float64,
    )
    t = _targets_array(targets)
    check_ignore_index(opts.ignore_index, t.dtype)
    t = shifted_targets(jnp, t, opts)
    e2 = jnp.reshape(e, (prob.n, prob.d))
    loss, zl, lse = _lce(
        e2, jnp.asarray(c), jnp.reshape(t, (prob.n,)), None if bias is None else jnp.asarray(bias), cfg
    )
    if opts.reduction == "none":
        loss, zl = loss.reshape(prob.batch_shape), zl.reshape(prob.batch_shape)
    out = [loss]
    if opts.return_lse:
        out.append(lse.reshape(prob.batch_shape))
    if opts.return_z_loss:
        out.append(zl)
    return out[0] if len(out) == 1 else tuple(out)


__all__ = ["linear_cross_entropy"]
