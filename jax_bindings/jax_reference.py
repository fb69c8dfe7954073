"""Pure-JAX blocked reference: the CPU path, the ground truth of the tests, `backward_impl="reference"`.

Same algorithm as the kernels: the vocabulary is cut into blocks of `block_v` columns and a
`lax.scan` walks them with an online logsumexp, so no (N, V) array exists, only (N, block_v).
V is padded up to a multiple of `block_v` with zero columns that are masked out of every sum and
can never equal a target (their indices are >= V). The backward recomputes each block's logits
and applies the analytic gradient of `cce_cupy.options` (same `coef_p`, `coef_q`).

Differences from the CUDA path, on purpose:
  * `filter_eps` is ignored: the reference gradient is exact.
  * float64 inputs compute in float64 (lse, loss, gradients), so float64 tests are tight;
    every other dtype accumulates in float32, like the kernels.

All functions take flattened, validated arrays: e (N, D), c (V, D), targets (N,) already shifted,
bias (V,) or None.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from cce_cupy.options import CCEOptions, acc_dtype

# Bytes of one (N, block_v) block of accumulator-typed logits when block_v is not given.
BLOCK_BYTES = 8 << 20
_MIN_BLOCK = 128


class _Namespace:
    """jax.numpy whose `float32` is the accumulation type, for the shared math of cce_cupy.options.

    `options.row_coefficients` & co. cast to `xp.float32`; with float64 inputs this keeps them in
    float64 instead of rounding the ground truth to float32.
    """

    def __init__(self, dtype) -> None:
        self.float32 = jnp.dtype(dtype)

    def __getattr__(self, name: str):
        return getattr(jnp, name)


def namespace(dtype):
    """The array namespace to call cce_cupy.options' math with, for inputs of `dtype`."""
    return jnp if acc_dtype(dtype) == np.float32 else _Namespace(acc_dtype(dtype))


def default_block_v(n: int, v: int, dtype) -> int:
    """Vocabulary columns per block: the (n, block) accumulator block stays near BLOCK_BYTES."""
    cols = BLOCK_BYTES // max(1, n * acc_dtype(dtype).itemsize)
    cols = max(_MIN_BLOCK, cols // _MIN_BLOCK * _MIN_BLOCK)
    return int(min(v, cols))


def _blocks(c, bias, block_v: int):
    """c as (nblocks, block_v, D) and bias as (nblocks, block_v), zero-padded past V."""
    v, d = c.shape
    nblocks = -(-v // block_v)
    pad = nblocks * block_v - v
    cb = jnp.pad(c, ((0, pad), (0, 0))).reshape(nblocks, block_v, d)
    bb = None if bias is None else jnp.pad(bias, (0, pad)).reshape(nblocks, block_v)
    return cb, bb, nblocks


def _block_logits(e, c_blk, b_blk, k, block_v: int, v: int, softcap, acc):
    """(y, cols, col_ok, z) of one block: softcapped logits in `acc`, column indices, column < V,
    and the logits before the softcap."""
    z = lax.dot_general(
        e, c_blk, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=acc
    ).astype(acc)
    if b_blk is not None:
        z = z + b_blk.astype(acc)[None, :]
    y = softcap * jnp.tanh(z / softcap) if softcap is not None else z
    cols = k * block_v + jnp.arange(block_v, dtype=jnp.int32)
    return y, cols, cols < v, z


def _softcap_grad(z, softcap):
    """1 - tanh^2(z / s) as 4 u / (1 + u)^2, u = exp(-2 |z / s|): accurate where tanh saturates,
    unlike 1 - (y / s)^2 (the kernels and the NumPy backend use the same form)."""
    u = jnp.exp(-2.0 * jnp.abs(z / softcap))
    return 4.0 * u / jnp.square(1.0 + u)


def _same(x):
    return x


def forward(e, c, targets, bias, opts: CCEOptions, block_v: int | None = None, vary=_same):
    """Per-row (lse, tgt) in the accumulation type; tgt is 0 for ignored rows, NaN out of range.

    `vary` is applied to the scan's constant starting values: inside shard_map it casts them to
    the inputs' varying mesh axes (see `jax_bindings.sharded`).
    """
    n, _ = e.shape
    v = c.shape[0]
    acc = acc_dtype(e.dtype)
    block_v = block_v or default_block_v(n, v, e.dtype)
    cb, bb, nblocks = _blocks(c, bias, block_v)
    t = targets  # compared in its own dtype: an int64 target never wraps onto a column
    softcap = opts.softcap

    def step(carry, xs):
        m, s, yt, ysum = carry
        k, c_blk, b_blk = xs
        y, cols, col_ok, _ = _block_logits(e, c_blk, b_blk, k, block_v, v, softcap, acc)
        ym = jnp.where(col_ok[None, :], y, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(ym, axis=1))
        # Rows with no finite logit yet (all -inf so far: masked columns) shift by 0, not by -inf:
        # exp(-inf - -inf) would be NaN; their terms are then exp(-inf) = 0.
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(ym - shift[:, None]), axis=1)
        hit = cols[None, :] == t[:, None]  # padded columns (>= V) never match
        yt = yt + jnp.sum(jnp.where(hit, y, 0.0), axis=1)
        if opts.label_smoothing:
            ysum = ysum + jnp.sum(jnp.where(col_ok[None, :], y, 0.0), axis=1)
        return (m_new, s, yt, ysum), None

    init = (
        jnp.full((n,), -jnp.inf, acc),
        jnp.zeros((n,), acc),
        jnp.zeros((n,), acc),
        jnp.zeros((n,), acc),
    )
    xs = (vary(jnp.arange(nblocks, dtype=jnp.int32)), cb, bb)
    (m, s, yt, ysum), _ = lax.scan(step, tuple(vary(x) for x in init), xs)
    lse = m + jnp.log(s)
    ls = opts.label_smoothing
    tgt = (1.0 - ls) * yt + (ls / v) * ysum if ls else yt
    in_range = (targets >= 0) & (targets < v)
    tgt = jnp.where(in_range, tgt, jnp.nan)
    tgt = jnp.where(targets == opts.ignore_index, 0.0, tgt).astype(acc)
    return lse.astype(acc), tgt


def backward(e, c, targets, bias, opts: CCEOptions, lse, coef_p, coef_q, block_v: int | None = None, vary=_same):
    """(dE, dC, dbias) in the accumulation type, for dL/dy = coef_p * softmax - coef_q * onehot_ls.

    dbias is None when bias is None. `vary` as in `forward`.
    """
    n, d = e.shape
    v = c.shape[0]
    acc = acc_dtype(e.dtype)
    block_v = block_v or default_block_v(n, v, e.dtype)
    cb, bb, nblocks = _blocks(c, bias, block_v)
    t = targets  # compared in its own dtype: an int64 target never wraps onto a column
    softcap, ls = opts.softcap, opts.label_smoothing
    # A row whose logits are all -inf has lse = -inf and no distribution: p = 0 there, not NaN.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse).astype(acc)
    cp = coef_p.astype(acc)[:, None]
    cq = coef_q.astype(acc)[:, None]
    e_acc = e.astype(acc)

    def step(de, xs):
        k, c_blk, b_blk = xs
        y, cols, col_ok, z = _block_logits(e, c_blk, b_blk, k, block_v, v, softcap, acc)
        p = jnp.exp(jnp.where(col_ok[None, :], y, -jnp.inf) - lse[:, None])
        onehot = (cols[None, :] == t[:, None]).astype(acc)
        if ls:
            onehot = (1.0 - ls) * onehot + (ls / v) * col_ok[None, :].astype(acc)
        dz = cp * p - cq * onehot
        if softcap is not None:
            dz = dz * _softcap_grad(z, softcap)
        dz = jnp.where(col_ok[None, :], dz, 0.0)
        de = de + jnp.dot(dz, c_blk.astype(acc), precision=lax.Precision.HIGHEST)
        dc_blk = jnp.dot(dz.T, e_acc, precision=lax.Precision.HIGHEST)
        db_blk = jnp.sum(dz, axis=0) if b_blk is not None else None
        return de, (dc_blk, db_blk)

    xs = (vary(jnp.arange(nblocks, dtype=jnp.int32)), cb, bb)
    de, (dc, db) = lax.scan(step, vary(jnp.zeros((n, d), acc)), xs)
    dc = dc.reshape(nblocks * block_v, d)[:v]
    db = None if db is None else db.reshape(nblocks * block_v)[:v]
    return de, dc, db


__all__ = ["BLOCK_BYTES", "acc_dtype", "backward", "default_block_v", "forward", "namespace"]
