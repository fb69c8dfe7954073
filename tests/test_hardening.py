"""Defects found by differential fuzzing of the CPU paths (issue 18), one test each."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_rel_close, dense_reference

import cce_cupy as cce
from cce_cupy import reference
from cce_cupy.options import CCEOptions


# ------------------------------------------------------------- 1. bias = -inf (masked columns)
def _masked_problem(n, v, d=16, seed=0):
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((n, d)).astype(np.float32)
    c = (rng.standard_normal((v, d)) / np.sqrt(d)).astype(np.float32)
    b = np.zeros(v, np.float32)
    b[: v // 2] = -np.inf  # the whole leading block of columns is masked
    t = rng.integers(v // 2, v, n)
    return e, c, t, b


def test_numpy_masked_leading_block_is_finite_and_exact(monkeypatch):
    # A small block budget makes the leading column block all -inf, as V=1024, N=8192 does.
    monkeypatch.setattr(reference, "BLOCK_BYTES", 128 * 128 * 4)
    e, c, t, b = _masked_problem(300, 512)
    assert reference.block_shape(300, 512)[1] <= 256
    o = CCEOptions(z_loss=1e-3, return_lse=True)
    loss, de, dc, db, lse = cce.linear_cross_entropy_with_grad(e, c, t, b, options=o)
    ref = dense_reference(e, c, t, b, o)
    assert_rel_close(loss, ref["loss"], 2e-5, "loss")
    assert_rel_close(lse, ref["lse"], 2e-5, "lse")
    assert_rel_close(de, ref["de"], 2e-5, "de")
    assert_rel_close(dc, ref["dc"], 2e-5, "dc")
    assert_rel_close(db, np.where(np.isfinite(b), ref["db"], 0.0), 2e-5, "dbias")


def test_jax_masked_leading_block_is_finite():
    import jax
    import jax.numpy as jnp

    import jax_bindings as jb

    bias = jnp.array([-jnp.inf, 0.0])
    f = lambda e, c: jb.linear_cross_entropy(e, c, jnp.array([1]), bias=bias, block_v=1)  # noqa: E731
    assert float(f(jnp.ones((1, 1)), jnp.ones((2, 1)))) == 0.0
    de, dc = jax.grad(f, argnums=(0, 1))(jnp.ones((1, 1)), jnp.ones((2, 1)))
    assert np.all(np.asarray(de) == 0.0) and np.all(np.asarray(dc) == 0.0)
    # Against the float64 reference on a larger problem, with blocks of 128 columns.
    e, c, t, b = _masked_problem(64, 512)
    o = CCEOptions(reduction="sum")
    g = jax.grad(lambda e_, c_: jb.linear_cross_entropy(e_, c_, jnp.asarray(t), jnp.asarray(b), options=o,
                                                        block_v=128), argnums=(0, 1))
    de, dc = g(jnp.asarray(e), jnp.asarray(c))
    ref = dense_reference(e, c, t, b, o)
    assert_rel_close(de, ref["de"], 2e-5, "de")
    assert_rel_close(dc, ref["dc"], 2e-5, "dc")


def test_row_with_every_column_masked():
    """No distribution: lse = -inf and a NaN loss when counted; ignored, it adds 0 loss and 0 gradient."""
    e, c, _, _ = _masked_problem(4, 8)
    b = np.full(8, -np.inf, np.float32)
    t = np.array([1, -100, -100, -100])
    loss, lse = cce.linear_cross_entropy(e, c, t, b, reduction="none", return_lse=True)
    assert np.isnan(loss[0]) and np.all(loss[1:] == 0.0) and np.all(lse == -np.inf)
    _, de, dc, db = cce.linear_cross_entropy_with_grad(e, c, np.full(4, -100), b, reduction="sum")
    assert np.all(de == 0.0) and np.all(dc == 0.0) and np.all(db == 0.0)


# ------------------------------------------------------ 2. filter_eps with z_loss or grad_lse
def _confident_bf16():
    """4 rows whose target logit is 20 (softmax ~ 1 at the target): every |p - onehot| is tiny."""
    e = np.zeros((4, 16), np.float32)
    e[:, 3] = 20.0
    c = np.eye(16, dtype=np.float32)
    return e.astype(ml_dtypes.bfloat16), c.astype(ml_dtypes.bfloat16), np.full(4, 3)


def test_filter_keeps_z_loss_and_grad_lse_terms():
    e, c, t = _confident_bf16()
    o = CCEOptions(z_loss=1e-4, reduction="sum", grad_dtype="float32")
    exact = cce.linear_cross_entropy_with_grad(e, c, t, options=o)[1]
    filtered = cce.linear_cross_entropy_with_grad(e, c, t, options=o.replace(filter_eps="auto"))[1]
    assert np.abs(exact).max() > 3e-3  # 2 z_loss lse ~ 4e-3 per row
    assert_rel_close(filtered, exact, 1e-2, "de(filtered, z_loss)")
    # grad_lse alone (grad_loss 0): dE = grad_lse * softmax @ C, all at the target.
    lse, _ = cce.forward(e, c, t)
    o = CCEOptions(reduction="sum", grad_dtype="float32")
    for eps in (None, "auto"):
        de = cce.backward(e, c, t, lse, 0.0, grad_lse=np.ones(4, np.float32), options=o.replace(filter_eps=eps))[0]
        assert_rel_close(de, np.eye(16)[[3] * 4], 1e-2, f"de(grad_lse, filter_eps={eps})")


def test_filter_still_drops_confident_rows_without_lse_term():
    e, c, t = _confident_bf16()
    stats = {}
    lse, _ = reference.forward(e, c, t, None, CCEOptions())
    g = np.ones(4, np.float32)
    reference.backward(e, c, t, None, CCEOptions(filter_eps="auto"), lse, g, g, stats=stats)
    assert stats == {"tiles": 1, "live_tiles": 0}


# ------------------------------------------------ 8. per-token loss is never negative (NumPy)
def test_numpy_per_token_loss_is_not_negative():
    rng = np.random.default_rng(0)
    e = (10 * rng.standard_normal((2000, 64))).astype(np.float32)
    c = rng.standard_normal((300, 64)).astype(np.float32)
    t = (e @ c.T).argmax(1)  # confident rows at a logit scale of ~100: loss ~ 0
    loss = cce.linear_cross_entropy(e, c, t, reduction="none")
    assert loss.min() >= 0.0, f"{int((loss < 0).sum())} negative per-token losses, min {loss.min()}"


def test_filter_tile_rule_with_z_loss_matches_dense_rule():
    """The NumPy backend drops exactly the tiles of the float64 rule (conftest) with a z-loss."""
    from conftest import make_problem

    o = CCEOptions(z_loss=1e-2, filter_eps=1e-3)
    e, c, t, _ = make_problem(300, 136, 1000, "float32", peaked=True, seed=11)
    _, de, dc = cce.linear_cross_entropy_with_grad(e, c, t, options=o)
    ref = dense_reference(e, c, t, None, o, filter_eps=1e-3)
    exact = dense_reference(e, c, t, None, o)
    assert_rel_close(de, ref["de"], 2e-5, "de")
    assert_rel_close(dc, ref["dc"], 2e-5, "dc")
    assert_rel_close(de, exact["de"], 1e-2, "de vs exact")
