"""Vocab-parallel (and data-parallel) linear cross-entropy under `jax.shard_map`.

The classifier `c` (V, D) is cut along V over a mesh axis ("tp"): shard k holds the rows
[k * V_local, (k + 1) * V_local) of `c` zero-padded to a multiple of the axis size; rows at or past
the true `vocab_size` are padding. Tokens may also be split over a data-parallel axis ("dp").

Per shard, one `jax.custom_vjp` primitive (`_shard_stats`) runs the single-device pieces:
  * forward: the kernels' (or the pure-JAX reference's) per-row logsumexp over the shard's real
    columns, and its target term for the rows whose target falls in the slice;
  * backward: the kernels' dE / dC / dbias for per-row coefficients (coef_p, coef_q).
The combine is plain JAX and JAX differentiates it:
    m = pmax(stop_gradient(lse_local)),  lse = m + log(psum(exp(lse_local - m))),
    tgt = psum(tgt_local).
Autodiff of the combine hands each shard d loss / d lse_local = g * exp(lse_local - lse), so the
shard's backward sees exactly the global softmax restricted to its columns. `e` enters the
primitive cast to "varying" over the vocab axis, so the transpose of that cast sums the shards'
partial dE over the axis: `jax.grad` gives every device the full dE and its own dC shard.

Padding is never read: the kernels mask columns >= their static V, so the primitive runs on the
static prefix `c[:n]` of the shard's real rows. The number of real rows of a shard is one of at most
three static values (V_local, the remainder, 0); `lax.switch` on a device index computed from
`lax.axis_index` picks the branch (no branch, and no switch, when nothing is padded). A target can
only match a column of the shard that owns it, as a local index < n: a padded column can never be a
target, and a target in [vocab_size, padded V) gives a NaN loss like any out-of-range target.

Label smoothing needs sum_j y_ij over the TRUE vocabulary. The kernels compute
(1 - ls_k) * y_{i,t} + (ls_k / n) * sum_j y_ij over their n columns for rows with an in-range target;
with ls_k chosen per branch so that, rescaled, this is (1 - ls) * y_{i,t} + (ls / V) * sum_j y_ij,
the kernels' own smoothing gives each shard its share, summed by the same psum. Rows whose target
is not in the slice are pointed at local column 0 and its term (1 - ls) * y_{i,0} (an N x D
gather-dot, in JAX) is subtracted outside the primitive, so JAX differentiates that part too.

On CPU the "kernels" are the pure-JAX blocked reference, run through the very same composition
(branches, ls_k, column-0 correction), so the CPU tests check the GPU path's arithmetic. The
reference is called through vma-aware copies (`_reference_forward` / `_reference_backward`): the
`lax.scan` carries of `jax_reference.forward` / `jax_reference.backward` start from constants, which
shard_map's `check_vma=True` rejects once the inputs vary over a mesh axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cce_cupy.options import CCEOptions, grad_dtype, make_options, per_token_loss, shifted_targets
from cce_cupy.validate import check_linear_ce_args
from jax_bindings import gpu, jax_reference
from jax_bindings._dispatch import check_call_args, dispatch

# The target the kernels see for rows whose target is not in the shard (with label_smoothing 0):
# the kernels' ignore_index is set to it, and no column index is negative.
_NOT_HERE = -1


# ------------------------------------------------------------------------- varying-ness (vma)
def _vma(x) -> frozenset:
    """Mesh axes `x` varies over inside shard_map (empty outside, or with check_vma=False)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # JAX <= 0.9
    if vma is None:
        mat = getattr(aval, "mat", None)  # JAX 0.10+: the manual axis type
        vma = getattr(mat, "varying", frozenset())
    return frozenset(vma)


def _vary(x, axes: frozenset):
    """`x` cast to varying over `axes` (a no-op for the axes it already varies over)."""
    missing = tuple(sorted(axes - _vma(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def _vma_union(*xs) -> frozenset:
    out = frozenset()
    for x in xs:
        if x is not None:
            out |= _vma(x)
    return out


# ------------------------------------------------------------ the reference, vma-aware
# `jax_reference.forward` / `jax_reference.backward` start their `lax.scan` carries from constants, which
# shard_map (check_vma=True) rejects once the inputs vary over a mesh axis: cast them.
def _reference_forward(e, c, targets, bias, opts: CCEOptions, block_v: int | None = None):
    """`jax_reference.forward` that runs inside shard_map: per-row (lse, tgt) over c's columns."""
    vma = _vma_union(e, c, targets, bias)
    return jax_reference.forward(e, c, targets, bias, opts, block_v, vary=lambda x: _vary(x, vma))


def _reference_backward(e, c, targets, bias, opts: CCEOptions, lse, coef_p, coef_q, block_v: int | None = None):
    """`jax_reference.backward` that runs inside shard_map: (dE, dC, dbias) in the accumulation type."""
    vma = _vma_union(e, c, targets, bias, lse, coef_p, coef_q)
    return jax_reference.backward(e, c, targets, bias, opts, lse, coef_p, coef_q, block_v, vary=lambda x: _vary(x, vma))


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class _ShardConfig:
    """Static description of one call (hashable: the nondiff argument of the custom_vjp)."""

    opts: CCEOptions  # the user's options (shift already applied)
    vocab_size: int  # the true V
    branch_cols: tuple[int, ...]  # the distinct numbers of real columns a shard can hold
    backward_impl: str
    vmap_method: str
    command_buffer_compatible: bool
    block_v: int | None
    kernels: bool  # False for float64 inputs: the pure-JAX reference on every platform
    compute_dtype: Any  # e's dtype: the primitive may receive e upcast (grad_reduce_dtype="float32")
    grad_reduce_f32: bool  # grad_reduce_dtype="float32"

    def fp32_grads(self) -> bool:
        """Kernel gradients in float32 before the shard's last step: to sum dE over the vocab axis in
        float32, and with label smoothing, where the column-0 correction (see _grads_cols) cancels
        most of column 0's gradient and must not cancel 16-bit roundings."""
        return self.kernels and (self.grad_reduce_f32 or bool(self.opts.label_smoothing))

    def grad_dtype(self, e_dtype):
        if not self.kernels:
            return jax_reference.acc_dtype(e_dtype)
        return jnp.float32 if self.fp32_grads() else grad_dtype(np.dtype(e_dtype), self.opts)

    def kernel_options(self, n: int) -> tuple[CCEOptions, float]:
        """(options the kernels run with on n real columns, scale of their target term).

        The kernels' target term is (1 - ls_k) y_t + (ls_k / n) sum_j y_j; times `scale` it is
        (1 - ls) y_t + (ls / V) sum_j y_j, the shard's share of the smoothed target.
        """
        ls = float(self.opts.label_smoothing)
        if ls:
            r = ls * n / ((1.0 - ls) * self.vocab_size)
            ls_k, scale = r / (1.0 + r), (1.0 - ls) * (1.0 + r)
        else:
            ls_k, scale = 0.0, 1.0
        kopts = self.opts.replace(
            ignore_index=_NOT_HERE,
            label_smoothing=ls_k,
            z_loss=0.0,
            shift=False,
            reduction="sum",
            return_lse=False,
            return_z_loss=False,
            grad_dtype="float32" if self.fp32_grads() else self.opts.grad_dtype,
        )
        return kopts, scale


def _with_bias(args, has_bias: bool, k: int):
    """Split the flat argument tuple of platform_dependent: bias sits at position k if present."""
    if has_bias:
        return args
    return (*args[:k], None, *args[k:])


def _kernel_forward(e, c, t, bias, opts: CCEOptions, cfg: _ShardConfig):
    """(lse, tgt) of the single-device kernels (or reference) over all of c's columns."""
    vma = _vma_union(e, c, t, bias)

    def ref_fn(*a):
        e_, c_, t_, b_ = _with_bias(a, bias is not None, 3)
        return _reference_forward(e_, c_, t_, b_, opts, cfg.block_v)

    def gpu_fn(*a):
        e_, c_, t_, b_ = _with_bias(a, bias is not None, 3)
        lse, tgt = gpu.forward(
            e_, c_, t_, b_, opts, vmap_method=cfg.vmap_method, command_buffer_compatible=cfg.command_buffer_compatible
        )
        # buffer_callback outputs are not typed as varying over the mesh axes: say so.
        return _vary(lse, vma), _vary(tgt, vma)

    args = (e, c, t) if bias is None else (e, c, t, bias)
    return dispatch(cfg.kernels, ref_fn, gpu_fn, *args)


def _kernel_backward(e, c, t, bias, lse, coef_p, coef_q, opts: CCEOptions, cfg: _ShardConfig):
    """(dE, dC, dbias) of the single-device kernels (or reference), in the kernels' gradient dtype."""
    has_bias = bias is not None
    vma = _vma_union(e, c, t, bias, lse, coef_p, coef_q)
    gdt = cfg.grad_dtype(e.dtype)  # what the kernels write under opts (cfg.kernel_options)

    def ref_fn(*a):
        e_, c_, t_, b_, lse_, p_, q_ = _with_bias(a, has_bias, 3)
        de, dc, db = _reference_backward(e_, c_, t_, b_, opts, lse_, p_, q_, cfg.block_v)
        return de.astype(gdt), dc.astype(gdt), (None if db is None else db.astype(gdt))

    def gpu_fn(*a):
        e_, c_, t_, b_, lse_, p_, q_ = _with_bias(a, has_bias, 3)
        de, dc, db = gpu.backward(
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
        return _vary(de, vma), _vary(dc, vma), (None if db is None else _vary(db, vma))

    args = (e, c, t) + ((bias,) if has_bias else ()) + (lse, coef_p, coef_q)
    if cfg.backward_impl == "reference":
        return ref_fn(*args)
    return dispatch(cfg.kernels, ref_fn, gpu_fn, *args)


# --------------------------------------------------------------------- per-shard primitive
def _column0_logit(cfg: _ShardConfig, e, c, bias):
    """(y0, dy0/dz0): each row's (softcapped) logit of local column 0, in the accumulation type."""
    acc = jax_reference.acc_dtype(e.dtype)
    z0 = lax.dot_general(
        e, c[0], (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=acc
    ).astype(acc)
    if bias is not None:
        z0 = z0 + bias[0].astype(acc)
    if cfg.opts.softcap is None:
        return z0, jnp.ones_like(z0)
    y0 = cfg.opts.softcap * jnp.tanh(z0 / cfg.opts.softcap)
    return y0, 1.0 - (y0 / cfg.opts.softcap) ** 2


def _stats_cols(n: int, cfg: _ShardConfig, e, c, t, owned, bias):
    """(lse_local, tgt_local) over the shard's first n columns (its real ones).

    With label smoothing, rows whose target is not in this shard were scored against local column 0
    (the kernels skip target-less rows entirely, smoothing term included): that column's
    (1 - ls) y_{i,0} is taken back out here, and its gradient in _grads_cols."""
    e = e.astype(cfg.compute_dtype)
    acc = jax_reference.acc_dtype(e.dtype)
    vma = _vma_union(e, c, t, bias)
    rows = e.shape[0]
    if n == 0:  # a shard of padding only: no mass, no target
        lse, tgt = jnp.full((rows,), -jnp.inf, acc), jnp.zeros((rows,), acc)
    else:
        kopts, scale = cfg.kernel_options(n)
        lse, tgt = _kernel_forward(e, c[:n], t, None if bias is None else bias[:n], kopts, cfg)
        lse, tgt = lse.astype(acc), (tgt * scale).astype(acc)
        ls = float(cfg.opts.label_smoothing)
        if ls:
            y0, _ = _column0_logit(cfg, e, c, bias)
            tgt = tgt - jnp.where(owned, 0.0, (1.0 - ls) * y0).astype(acc)
    return _vary(lse, vma), _vary(tgt, vma)


def _grads_cols(n: int, cfg: _ShardConfig, e, c, t, owned, bias, lse, g_lse, g_tgt):
    """(dE, dC, dbias) of the shard for cotangents (g_lse, g_tgt) of `_stats_cols(n, ...)`."""
    e = e.astype(cfg.compute_dtype)
    v_local = c.shape[0]
    gdt = cfg.grad_dtype(e.dtype)
    vma = _vma_union(e, c, t, bias, lse, g_lse, g_tgt)
    if n == 0:
        de, dc = jnp.zeros(e.shape, gdt), jnp.zeros(c.shape, gdt)
        db = None if bias is None else jnp.zeros(bias.shape, gdt)
    else:
        kopts, scale = cfg.kernel_options(n)
        f32 = jnp.float32 if cfg.kernels else jax_reference.acc_dtype(e.dtype)
        # d tgt / d y_ij = scale * ((1 - ls_k) [j == t_i] + ls_k / n): the kernels' coef_q pattern.
        coef_q = jnp.where(t == _NOT_HERE, 0.0, -g_tgt * scale).astype(f32)
        de, dc, db = _kernel_backward(
            e, c[:n], t, None if bias is None else bias[:n], lse.astype(f32), g_lse.astype(f32), coef_q, kopts, cfg
        )
        ls = float(cfg.opts.label_smoothing)
        if ls:  # the gradient of the column-0 correction of _stats_cols, added before any rounding
            _, dy0 = _column0_logit(cfg, e, c, bias)
            dz0 = jnp.where(owned, 0.0, -(1.0 - ls) * g_tgt.astype(f32) * dy0).astype(gdt)
            de = de + dz0[:, None] * c[0].astype(gdt)[None, :]
            dc0 = lax.dot_general(dz0, e.astype(gdt), (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)
            # A masked add, not `dc.at[0].add`: XLA's GPU compiler rejects a dynamic-update-slice
            # into a buffer_callback output ("DUS target must be a fusion parameter"); this one fuses
            # with the cast to c's dtype that follows.
            dc = jnp.where(lax.broadcasted_iota(jnp.int32, dc.shape, 0) == 0, dc + dc0[None, :], dc)
            if db is not None:
                db = jnp.where(jnp.arange(db.shape[0]) == 0, db + jnp.sum(dz0), db)
        if n < v_local:  # padded rows get a zero gradient
            dc = jnp.pad(dc, ((0, v_local - n), (0, 0)))
            db = None if db is None else jnp.pad(db, (0, v_local - n))
    return _vary(de, vma), _vary(dc, vma), (None if db is None else _vary(db, vma))


def _switch(cfg: _ShardConfig, branch, fn, *args):
    if len(cfg.branch_cols) == 1:
        return fn(cfg.branch_cols[0], cfg, *args)
    return lax.switch(branch, [functools.partial(fn, n, cfg) for n in cfg.branch_cols], *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _shard_stats(e, c, t, owned, bias, branch, cfg: _ShardConfig):
    """Per-row (lse, tgt) of one shard: e (N, D), c (V_local, D), local targets t (N,), `owned`
    (N,) bool (the row's target is in this shard), bias or None.

    `branch` (a device int32) indexes `cfg.branch_cols`, the shard's number of real columns n.
    lse = log sum_{j<n} exp(y_j); tgt = (1 - ls) [owned] y_t + (ls / V) sum_{j<n} y_j.
    """
    return _switch(cfg, branch, _stats_cols, e, c, t, owned, bias)


def _shard_stats_fwd(e, c, t, owned, bias, branch, cfg: _ShardConfig):
    lse, tgt = _shard_stats(e, c, t, owned, bias, branch, cfg)
    return (lse, tgt), (e, c, t, owned, bias, branch, lse)


def _shard_stats_bwd(cfg: _ShardConfig, res, cts):
    e, c, t, owned, bias, branch, lse = res
    g_lse, g_tgt = cts
    de, dc, db = _switch(cfg, branch, _grads_cols, e, c, t, owned, bias, lse, g_lse, g_tgt)
    de, dc = de.astype(e.dtype), dc.astype(c.dtype)
    db = None if bias is None else db.astype(bias.dtype)
    return de, dc, None, None, db, None


_shard_stats.defvjp(_shard_stats_fwd, _shard_stats_bwd)


# ---------------------------------------------------------------------------------- public
def vocab_parallel_linear_cross_entropy(
    e,
    c_shard,
    targets,
    bias_shard=None,
    *,
    axis_name: str,
    vocab_size: int | None = None,
    data_parallel_axis: str | tuple[str, ...] | None = None,
    options: CCEOptions | None = None,
    backward_impl: str = "kernel",
    vmap_method: str = "sequential",
    command_buffer_compatible: bool | None = None,
    block_v: int | None = None,
    grad_reduce_dtype: str = "input",
    **option_kwargs: Any,
):
    """`linear_cross_entropy` with `c` sharded along V over mesh axis `axis_name`; call inside shard_map.

    Args:
        e: (..., D) this device's embeddings (replicated over `axis_name`; may be split over a
            data-parallel axis along the token dimensions).
        c_shard: (V_local, D) this device's rows of the classifier: shard k holds rows
            [k * V_local, (k + 1) * V_local) of `c` zero-padded to V_local * axis_size rows
            (`shard_classifier` builds it). Padded rows are never read.
        targets: (...) = e.shape[:-1] global class indices in [0, vocab_size), or ignore_index.
        bias_shard: optional (V_local,), sharded like c_shard.
        axis_name: the mesh axis c is sharded over.
        vocab_size: the true V (default V_local * axis_size, i.e. no padding).
        data_parallel_axis: mesh axis (or axes) the tokens are split over. With it, "mean" is the
            global mean (psum over those axes of the loss sums / psum of the valid-token counts) and
            "sum" the global sum; both come out replicated. Without it they reduce this device's
            tokens only. "none" always returns this device's per-token losses.
        options, backward_impl, vmap_method, command_buffer_compatible, block_v, **option_kwargs:
            as in `jax_bindings.linear_cross_entropy` (every option is supported).
        grad_reduce_dtype: "input" (default) sums the shards' partial dE over `axis_name` in e's
            dtype; "float32" sums them in float32 and rounds once (16-bit inputs: one rounding
            instead of one per shard, for an all-reduce of twice the bytes).

    Returns:
        As `jax_bindings.linear_cross_entropy`: the loss, or `(loss[, lse][, z_loss])`, with lse
        the global per-token logsumexp. All outputs are replicated over `axis_name`.

    Use with `check_vma=True` (shard_map's default): the gradient of `e` is then summed over
    `axis_name` by JAX, and that of `c` over the data-parallel axes.
    """
    opts = make_options(options, **option_kwargs)
    prob = check_linear_ce_args(e, c_shard, targets, bias_shard, allow_float64=True)
    command_buffer_compatible = check_call_args(backward_impl, vmap_method, block_v, command_buffer_compatible)
    shards = lax.axis_size(axis_name)
    v_local = prob.v
    padded = v_local * shards
    if vocab_size is None:
        vocab_size = padded
    if not (isinstance(vocab_size, (int, np.integer)) and 1 <= vocab_size <= padded):
        raise ValueError(
            f"vocab_size must be an int in [1, {padded}] (V_local={v_local} x {shards} shards), got {vocab_size!r}"
        )
    vocab_size = int(vocab_size)
    cols_of_shard = [min(max(vocab_size - k * v_local, 0), v_local) for k in range(shards)]
    branch_cols = tuple(sorted(set(cols_of_shard), reverse=True))
    if grad_reduce_dtype not in ("input", "float32"):
        raise ValueError(f"grad_reduce_dtype must be 'input' or 'float32', got {grad_reduce_dtype!r}")
    cfg = _ShardConfig(
        opts=opts.replace(shift=False),
        vocab_size=vocab_size,
        branch_cols=branch_cols,
        backward_impl=backward_impl,
        vmap_method=vmap_method,
        command_buffer_compatible=bool(command_buffer_compatible),
        block_v=block_v,
        kernels=np.dtype(prob.dtype) != np.float64,
        compute_dtype=jnp.dtype(prob.dtype),
        grad_reduce_f32=grad_reduce_dtype == "float32",
    )
    acc = jax_reference.acc_dtype(prob.dtype)
    xp = jax_reference.namespace(prob.dtype)
    ls = float(opts.label_smoothing)

    t = jnp.reshape(shifted_targets(jnp, jnp.asarray(targets), opts), (prob.n,))
    e2 = jnp.reshape(e, (prob.n, prob.d))
    c_shard = jnp.asarray(c_shard)
    bias_shard = None if bias_shard is None else jnp.asarray(bias_shard)

    # This shard's vocab slice, on device: [offset, offset + n_real).
    k = lax.axis_index(axis_name)
    offset = (k * v_local).astype(t.dtype)
    branch = jnp.asarray([branch_cols.index(n) for n in cols_of_shard], jnp.int32)[k]
    valid = t != opts.ignore_index
    in_range = (t >= 0) & (t < vocab_size)
    owned = valid & in_range & (t >= offset) & (t < offset + v_local)
    t_local = jnp.where(owned, t - offset, 0 if ls else _NOT_HERE).astype(t.dtype)

    if prob.n == 0:
        lse_l = jnp.zeros((0,), acc)
        tgt_l = jnp.zeros((0,), acc)
    else:
        vma = _vma_union(e2, c_shard, t_local, bias_shard, branch)
        # e enters the primitive in the dtype its dE is summed in over the vocab axis (the
        # transpose of this cast to varying is that sum).
        e_in = e2.astype(jnp.float32) if grad_reduce_dtype == "float32" and e2.dtype.itemsize < 4 else e2
        args = [_vary(x, vma) for x in (e_in, c_shard, t_local)]
        b_in = None if bias_shard is None else _vary(bias_shard, vma)
        lse_l, tgt_l = _shard_stats(*args, _vary(owned, vma), b_in, _vary(branch, vma), cfg)

    # Combine over the vocab axis (JAX differentiates this part): two collectives, one max and
    # one sum carrying both the rescaled exp-sums and the target terms.
    m = lax.pmax(lax.stop_gradient(lse_l), axis_name)
    sums = lax.psum(jnp.stack([jnp.exp(lse_l - m), tgt_l]), axis_name)
    lse = m + jnp.log(sums[0])
    tgt = sums[1]
    tgt = jnp.where(valid & ~in_range, jnp.nan, tgt).astype(acc)  # out of range: NaN, as single-device

    loss_tok, zl_tok = per_token_loss(xp, opts, valid, lse, tgt)
    loss, zl = _reduce(opts, valid, (loss_tok, zl_tok), data_parallel_axis, acc)
    if opts.reduction == "none":
        loss, zl = loss.reshape(prob.batch_shape), zl.reshape(prob.batch_shape)
    out = [loss]
    if opts.return_lse:
        out.append(lse.astype(acc).reshape(prob.batch_shape))
    if opts.return_z_loss:
        out.append(zl)
    return out[0] if len(out) == 1 else tuple(out)


def _reduce(opts: CCEOptions, valid, per_tokens: tuple, dp_axis, acc) -> tuple:
    """Each per-token array reduced over this device's tokens, then over the data-parallel axes.

    One psum over dp carries every sum and the valid-token count. Its input depends on the vocab-
    axis collectives above, so every device runs the collectives in the same order: independent
    dp and tp all-reduces could otherwise be started in different orders by different devices
    (seen deadlocking XLA's CPU runtime with 4 host devices on a 2-core machine).
    """
    if opts.reduction == "none":
        return per_tokens
    sums = jnp.stack([jnp.sum(p, dtype=acc) for p in per_tokens] + [jnp.sum(valid.astype(acc))])
    if dp_axis is not None:
        sums = lax.psum(sums, dp_axis)
    if opts.reduction == "sum":
        return tuple(sums[i] for i in range(len(per_tokens)))
    count = jnp.maximum(sums[-1], 1.0)
    return tuple((sums[i] / count).astype(acc) for i in range(len(per_tokens)))


# ----------------------------------------------------------------------------------- helpers
class VocabShards(NamedTuple):
    """A classifier padded to a multiple of the vocab axis and sharded along V."""

    c: Any  # (V_padded, D), NamedSharding(mesh, P(axis, None))
    bias: Any  # (V_padded,) sharded P(axis), or None
    vocab_size: int  # the true V


def make_vocab_parallel_mesh(
    tp: int | None = None, dp: int | None = None, *, devices=None, tp_axis: str = "tp", dp_axis: str = "dp"
) -> Mesh:
    """A mesh for vocab parallelism: 1-D `(tp_axis,)` when dp is None, else 2-D `(dp_axis, tp_axis)`.

    tp defaults to all the devices (divided by dp); devices defaults to `jax.devices()`.
    """
    devices = list(jax.devices() if devices is None else devices)
    rows = 1 if dp is None else int(dp)
    if tp is None:
        tp = len(devices) // rows
    tp = int(tp)
    if tp < 1 or rows < 1 or tp * rows > len(devices):
        raise ValueError(f"a ({rows} x {tp}) mesh needs {rows * tp} devices, {len(devices)} given")
    grid = np.asarray(devices[: rows * tp], dtype=object)
    if dp is None:
        return Mesh(grid.reshape(tp), (tp_axis,))
    return Mesh(grid.reshape(rows, tp), (dp_axis, tp_axis))


def pad_vocab(x, multiple: int):
    """x (V, ...) with zero rows appended up to a multiple of `multiple` along axis 0."""
    v = x.shape[0]
    pad = -v % multiple
    if not pad:
        return x
    return jnp.pad(jnp.asarray(x), ((0, pad),) + ((0, 0),) * (x.ndim - 1))


def shard_classifier(c, mesh: Mesh, axis: str = "tp", bias=None) -> VocabShards:
    """Pad c (V, D) (and bias (V,)) with zero rows to a multiple of the axis size and shard along V."""
    shards = mesh.shape[axis]
    vocab_size = int(c.shape[0])
    c_sh = jax.device_put(pad_vocab(c, shards), NamedSharding(mesh, P(axis, None)))
    b_sh = None if bias is None else jax.device_put(pad_vocab(bias, shards), NamedSharding(mesh, P(axis)))
    return VocabShards(c_sh, b_sh, vocab_size)


def make_vocab_parallel_loss(
    mesh: Mesh,
    *,
    vocab_size: int,
    tp_axis: str = "tp",
    dp_axis: str | None = None,
    check_vma: bool = True,
    **kwargs: Any,
):
    """`fn(e, c, targets, bias=None)`: the loss over global arrays, run under `jax.shard_map`.

    c (and bias) are the padded classifier (`shard_classifier(...).c`), split along V over
    `tp_axis`; e and targets are split along their first axis over `dp_axis` (replicated when
    None). `check_vma` goes to `jax.shard_map`. kwargs go to `vocab_parallel_linear_cross_entropy`
    (options, reduction, ...). The
    result matches `jax_bindings.linear_cross_entropy(e, c[:vocab_size], targets, ...)`, gradients
    included (dC of the padded rows is 0). Differentiable, and jittable.
    """
    opts = make_options(
        kwargs.pop("options", None),
        **{k: kwargs.pop(k) for k in list(kwargs) if k in {f.name for f in dataclasses.fields(CCEOptions)}},
    )
    tok = P(dp_axis)
    per_token = P(dp_axis)
    red = per_token if opts.reduction == "none" else P()
    outs = [red]
    if opts.return_lse:
        outs.append(per_token)
    if opts.return_z_loss:
        outs.append(red)
    out_specs = outs[0] if len(outs) == 1 else tuple(outs)

    def body(e, c, t, *b):
        return vocab_parallel_linear_cross_entropy(
            e,
            c,
            t,
            b[0] if b else None,
            axis_name=tp_axis,
            vocab_size=vocab_size,
            data_parallel_axis=dp_axis,
            options=opts,
            **kwargs,
        )

    def fn(e, c, targets, bias=None):
        in_specs = (tok, P(tp_axis, None), tok) + (() if bias is None else (P(tp_axis),))
        args = (e, c, targets) + (() if bias is None else (bias,))
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)(*args)

    return fn


__all__ = [
    "VocabShards",
    "make_vocab_parallel_loss",
    "make_vocab_parallel_mesh",
    "pad_vocab",
    "shard_classifier",
    "vocab_parallel_linear_cross_entropy",
]
