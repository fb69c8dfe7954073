"""Property tests: the NumPy backend and the JAX CPU path against a float64 reference with
materialized logits, on random small problems and options (hypothesis); the CUDA kernels against
the NumPy backend on a GPU.

The reference here is written independently of cce_cupy: log_softmax of the full logits, the
cross-entropy against the (smoothed) one-hot, and the analytic gradient softmax - target.
Inputs are rounded to their dtype first and the reference reads the rounded values, so the only
differences are the backends' arithmetic: relative norm error <= 1e-5 for fp32, 1e-2 for 16-bit.
Set CCE_PROPERTY_REPORT=path to have the GPU test record its example count and worst error.
"""

from __future__ import annotations

import json
import os
from unittest import mock

import numpy as np
import pytest
from conftest import DTYPES, rel_err, to_f64
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cce_cupy as cce
from cce_cupy import numpy_backend as np_backend
from cce_cupy.options import CCEOptions

TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
CONDITION_MAX = 20.0  # see _well_conditioned
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


# ------------------------------------------------------------------------------- problems
@st.composite
def problems(draw):
    """(arrays, options, cotangents): e (*batch, D), c (V, D), targets (*batch), bias or None."""
    dtype = draw(st.sampled_from(sorted(TOL)))
    batch = draw(st.sampled_from([(1,), (5,), (12,), (2, 3), (3, 4), (2, 1)]))
    d = draw(st.integers(1, 16))
    v = draw(st.one_of(st.integers(2, 40), st.integers(129, 300)))  # > 128: several NumPy blocks
    scale = draw(st.sampled_from([0.3, 1.0, 4.0]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    opts = CCEOptions(
        reduction=reduction,
        ignore_index=draw(st.sampled_from([-100, 0, v - 1])),  # also a class that collides
        softcap=draw(st.sampled_from([None, None, 1.5, 30.0])),
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-3, 0.1])),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])),
        shift=draw(st.booleans()),
        return_lse=draw(st.booleans()),
        return_z_loss=draw(st.booleans()),
        grad_dtype=draw(st.sampled_from([None, "float32"])),
        deterministic=draw(st.booleans()),
    )
    bias_kind = draw(st.sampled_from(["none", "finite", "masked_prefix", "masked_random"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = int(np.prod(batch))
    e = scale * rng.standard_normal((n, d))
    c = rng.standard_normal((v, d)) / np.sqrt(d)
    allowed = np.arange(v)  # target classes (masked columns never are: their loss is infinite)
    bias = None
    if bias_kind != "none":
        bias = 0.5 * rng.standard_normal(v)
        if bias_kind != "finite" and v > 2:
            # At least two columns stay finite: with one, softmax is exactly one-hot and the whole
            # gradient is the z-loss term 2 z lse g, computed as coef_p p - coef_q: the fp32
            # cancellation of every backend (coef_p, coef_q interface), not a float64-level bug.
            k = int(rng.integers(1, v - 1))
            cols = np.arange(k) if bias_kind == "masked_prefix" else rng.choice(v, k, replace=False)
            bias[cols] = -np.inf
            allowed = np.setdiff1d(allowed, cols)
            if opts.softcap is None and opts.label_smoothing:  # smoothing onto -inf: infinite loss
                opts = opts.replace(label_smoothing=0.0)
    t = rng.choice(allowed, n)
    t[rng.random(n) < 0.25] = opts.ignore_index
    np_dt = DTYPES[dtype]
    arrays = (
        e.astype(np.float32).astype(np_dt).reshape(*batch, d),
        c.astype(np.float32).astype(np_dt),
        t.astype(draw(st.sampled_from([np.int32, np.int64]))).reshape(batch),
        None if bias is None else bias.astype(np.float32).astype(np_dt),
    )
    grad_loss = rng.standard_normal(batch) if reduction == "none" and draw(st.booleans()) else rng.standard_normal()
    cot = {
        "loss": np.asarray(grad_loss, np.float32),
        "lse": rng.standard_normal(batch).astype(np.float32),
        "z_loss": np.asarray(rng.standard_normal(batch) if reduction == "none" else rng.standard_normal(), np.float32),
    }
    return arrays, opts, cot


# ------------------------------------------------------------------- float64 reference
def reference(e, c, t, bias, o: CCEOptions, grad_loss, grad_lse=None, grad_z_loss=None):
    """Loss outputs and gradients in float64 from materialized logits (see the module docstring)."""
    batch = t.shape
    d = e.shape[-1]
    e64 = np.asarray(e, np.float64).reshape(-1, d)
    c64 = np.asarray(c, np.float64)
    z = e64 @ c64.T + (0.0 if bias is None else np.asarray(bias, np.float64))
    y = o.softcap * np.tanh(z / o.softcap) if o.softcap else z
    t = np.asarray(t, np.int64)
    if o.shift:
        t = np.concatenate([t[..., 1:], np.full(batch[:-1] + (1,), o.ignore_index)], axis=-1)
    t = t.reshape(-1)
    n, v = y.shape
    m = y.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(y - m).sum(axis=1, keepdims=True)))[:, 0]
    logp = y - lse[:, None]
    p = np.exp(logp)
    valid = t != o.ignore_index
    q = np.zeros((n, v))
    q[np.flatnonzero(valid), t[valid]] = 1.0
    q = np.where(valid[:, None], (1.0 - o.label_smoothing) * q + o.label_smoothing / v, 0.0)
    with np.errstate(invalid="ignore"):
        ce = -np.where(q > 0, q * logp, 0.0).sum(axis=1)  # 0 * -inf (masked columns) counts 0
    zl = np.where(valid, o.z_loss * lse**2, 0.0)
    loss_tok = np.where(valid, ce, 0.0) + zl

    def weights(g):  # d(reduced value) / d(per-token value)
        if o.reduction == "mean":
            return valid * (float(g) / max(valid.sum(), 1))
        return valid * np.broadcast_to(np.asarray(g, np.float64), batch).reshape(-1)

    def reduce(x):
        if o.reduction == "none":
            return x.reshape(batch)
        return x.sum() / max(valid.sum(), 1) if o.reduction == "mean" else x.sum()

    w = weights(grad_loss)
    coef_p = w * (1.0 + 2.0 * o.z_loss * lse)
    if grad_lse is not None:
        coef_p = coef_p + np.asarray(grad_lse, np.float64).reshape(-1)
    if grad_z_loss is not None:
        coef_p = coef_p + weights(grad_z_loss) * 2.0 * o.z_loss * lse
    dydz = 1.0 - np.tanh(z / o.softcap) ** 2 if o.softcap else 1.0
    gz = (coef_p[:, None] * p - w[:, None] * q) * dydz
    gz = np.where(np.isneginf(z), 0.0, gz)  # masked columns: no gradient
    out = {
        "loss": reduce(loss_tok),
        "lse": lse.reshape(batch),
        "z_loss": reduce(zl),
        "de": (gz @ c64).reshape(*batch, d),
        "dc": gz.T @ e64,
        "db": None if bias is None else gz.sum(axis=0),
    }
    # The same outputs with every term made positive: the size of what fp32 arithmetic adds and
    # subtracts. Their ratio to the outputs is the condition number of each output.
    lse_mag = np.abs(m[:, 0]) + np.log(np.exp(y - m).sum(axis=1))
    with np.errstate(invalid="ignore"):
        tgt_mag = np.where(q > 0, q * np.abs(y), 0.0).sum(axis=1)
    zl_mag = np.where(valid, o.z_loss * lse_mag**2, 0.0)
    gz_mag = np.where(np.isneginf(z), 0.0, (np.abs(coef_p)[:, None] * p + np.abs(w)[:, None] * q) * dydz)
    mags = {
        "loss": reduce(np.where(valid, lse_mag + tgt_mag, 0.0) + zl_mag),
        "lse": lse_mag,
        "z_loss": reduce(zl_mag),
        "de": gz_mag @ np.abs(c64),
        "dc": gz_mag.T @ np.abs(e64),
        "db": gz_mag.sum(axis=0),
    }
    out["condition"] = max(
        np.linalg.norm(mags[k]) / np.linalg.norm(out[k]) if np.linalg.norm(out[k]) > 0 else 1.0
        for k in mags
        if out[k] is not None
    )
    return out


def _errors(ours: dict, ref: dict) -> dict:
    """{name: relative norm error} over the outputs both have; NaN where shapes differ."""
    out = {}
    for k, x in ours.items():
        if k == "condition":
            continue
        if x is None:
            assert ref[k] is None, k
            continue
        a, b = to_f64(x), to_f64(ref[k])
        out[k] = rel_err(a, b) if a.shape == b.shape else float("nan")
    return out


def _well_conditioned(ref: dict, dtype: str) -> bool:
    """fp32 arithmetic meets 1e-5 only where the outputs are not mostly cancellation (a loss far
    below its lse, a softmax within 1e-5 of one-hot): CONDITION_MAX bounds how much larger the terms
    are than their result. The 16-bit tolerance leaves room for any condition seen here."""
    return dtype != "float32" or ref["condition"] <= CONDITION_MAX


def _check(errs: dict, dtype: str, what: str):
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"{what} ({dtype}): relative errors over {TOL[dtype]:.0e}: {bad}"


def _unpack(out, o: CCEOptions, has_bias: bool) -> dict:
    """The outputs of linear_cross_entropy_with_grad by name."""
    out = list(out)
    named = {"loss": out.pop(0), "de": out.pop(0), "dc": out.pop(0), "db": out.pop(0) if has_bias else None}
    if o.return_lse:
        named["lse"] = out.pop(0)
    if o.return_z_loss:
        named["z_loss"] = out.pop(0)
    assert not out
    return named


# -------------------------------------------------------------------------- NumPy backend
def _numpy_outputs(arrays, o: CCEOptions, cot, xp=np):
    """Outputs of the public API (NumPy or CuPy arrays): the loss, its gradients and extras, and
    with return_lse the gradients under an lse cotangent as well (`backward(grad_lse=...)`)."""
    e, c, t, b = (None if x is None else xp.asarray(x) for x in arrays)
    grad_loss = xp.asarray(cot["loss"])
    named = _unpack(cce.linear_cross_entropy_with_grad(e, c, t, b, grad_loss=grad_loss, options=o), o, b is not None)
    out = {"plain": named}
    if o.return_lse:
        grads = cce.backward(e, c, t, named["lse"], grad_loss, b, grad_lse=xp.asarray(cot["lse"]), options=o)
        out["grad_lse"] = {"de": grads[0], "dc": grads[1], "db": grads[2] if b is not None else None}
    return out


@settings(max_examples=300, **SETTINGS)
@given(problems())
def test_numpy_backend_matches_float64_reference(problem):
    arrays, o, cot = problem
    dtype = np.dtype(arrays[0].dtype).name
    ref = reference(*arrays, o, cot["loss"])
    ref_lse = reference(*arrays, o, cot["loss"], grad_lse=cot["lse"]) if o.return_lse else ref
    assume(_well_conditioned(ref, dtype) and _well_conditioned(ref_lse, dtype))
    # Blocks of 128 x 128: V > 128 runs the online logsumexp over several column blocks.
    with mock.patch.object(np_backend, "BLOCK_BYTES", 1):  # the least: 128 x 128 blocks
        out = _numpy_outputs(arrays, o, cot)
    _check(_errors(out["plain"], ref), dtype, "NumPy backend")
    gdt = np.float32 if o.grad_dtype == "float32" else arrays[0].dtype
    assert out["plain"]["de"].dtype == gdt and out["plain"]["de"].shape == arrays[0].shape
    if o.return_lse:
        _check(_errors(out["grad_lse"], ref_lse), dtype, "NumPy backend, grad_lse")


# ---------------------------------------------------------------------------- JAX CPU path
@settings(max_examples=30, **SETTINGS)
@given(problems(), st.sampled_from([None, 1, 7, 128]))
def test_jax_cpu_matches_float64_reference(problem, block_v):
    import jax
    import jax.numpy as jnp

    import jax_bindings as jb

    arrays, o, cot = problem
    dtype = np.dtype(arrays[0].dtype).name
    ref = reference(
        *arrays,
        o,
        cot["loss"],
        grad_lse=cot["lse"] if o.return_lse else None,
        grad_z_loss=cot["z_loss"] if o.return_z_loss else None,
    )
    assume(_well_conditioned(ref, dtype))
    e, c, t, b = (None if x is None else jnp.asarray(x) for x in arrays)

    def f(e_, c_, b_):
        out = jb.linear_cross_entropy(e_, c_, t, b_, options=o, block_v=block_v)
        return out if isinstance(out, tuple) else (out,)

    names = ["loss"] + ["lse"] * o.return_lse + ["z_loss"] * o.return_z_loss

    @jax.jit  # one compilation, instead of one per eager operation
    def run(e_, c_, b_):
        outs, vjp = jax.vjp(f, e_, c_, b_)
        cts = tuple(jnp.broadcast_to(jnp.asarray(cot[k]), x.shape).astype(x.dtype) for k, x in zip(names, outs))
        return outs, vjp(cts)

    outs, (de, dc, db) = run(e, c, b)
    ours = dict(zip(names, outs), de=de, dc=dc, db=db)
    _check(_errors(ours, ref), dtype, f"JAX CPU (block_v={block_v})")
    assert de.dtype == e.dtype and de.shape == e.shape


# ------------------------------------------------------------------------- CUDA kernels
_GPU_REPORT = {"examples": 0, "worst": {}}


@pytest.mark.gpu
@settings(max_examples=60, **SETTINGS)
@given(problems())
def test_cuda_kernels_match_numpy_backend(problem):
    import cupy

    arrays, o, cot = problem
    dtype = np.dtype(arrays[0].dtype).name
    ref = reference(*arrays, o, cot["loss"], grad_lse=cot["lse"] if o.return_lse else None)
    assume(_well_conditioned(ref, dtype))  # two fp32 computations differ by eps times the condition
    ours = _numpy_outputs(arrays, o, cot, xp=cupy)
    truth = _numpy_outputs(arrays, o, cot)
    errs = {}
    for case, named in ours.items():
        errs.update({f"{case}.{k}": err for k, err in _errors(named, truth[case]).items()})
    report = os.environ.get("CCE_PROPERTY_REPORT")
    if report:
        _GPU_REPORT["examples"] += 1
        worst = _GPU_REPORT["worst"].setdefault(dtype, {})
        for k, err in errs.items():
            worst[k] = max(worst.get(k, 0.0), err) if err == err else float("nan")
        with open(report, "w") as f:
            json.dump(_GPU_REPORT, f, indent=1, sort_keys=True)
    _check(errs, dtype, "CUDA kernels vs NumPy backend")
