"""Bad input raises TypeError/ValueError naming the argument; NaN/Inf give NaN; array kinds."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import make_problem

import cce_cupy as cce
from cce_cupy.validate import check_cross_entropy_args, check_linear_ce_args


def _ok(n=6, d=8, v=10, dtype="float32"):
    return make_problem(n, d, v, dtype, bias=True, seed=1)


class _FakeGPUArray:
    """Has __dlpack__ on a CUDA device: classified as a GPU array without touching a GPU."""

    def __init__(self, shape, dtype, device=0):
        self.shape, self.dtype, self._device = shape, np.dtype(dtype), device

    def __dlpack__(self, **kw):  # pragma: no cover - never converted in these tests
        raise RuntimeError("not a real array")

    def __dlpack_device__(self):
        return (2, self._device)


def _set(a, i, value):
    a = a.copy()
    a[i] = value
    return a


BAD = [
    # (description, builder -> (args, kwargs), exception, words the message must contain)
    ("e 0-d", lambda e, c, t, b: ((np.float32(1.0), c, t), {}), ValueError, ["e", "(..., D)"]),
    ("c 1-D", lambda e, c, t, b: ((e, c[0], t), {}), ValueError, ["c", "(V, D)"]),
    ("c 3-D", lambda e, c, t, b: ((e, c[None], t), {}), ValueError, ["c", "(V, D)"]),
    ("D mismatch", lambda e, c, t, b: ((e, c[:, :5], t), {}), ValueError, ["D=8", "D=5"]),
    ("targets shape", lambda e, c, t, b: ((e, c, t[:-1]), {}), ValueError, ["targets", "e.shape[:-1]"]),
    (
        "batch dims",
        lambda e, c, t, b: ((e.reshape(2, 3, 8), c, t.reshape(3, 2)), {}),
        ValueError,
        ["targets"],
    ),
    (
        "mixed dtypes",
        lambda e, c, t, b: ((e.astype(ml_dtypes.bfloat16), c, t), {}),
        TypeError,
        ["e is bfloat16 but c is float32", "cast both"],
    ),
    (
        "float64",
        lambda e, c, t, b: ((e.astype(np.float64), c.astype(np.float64), t), {}),
        TypeError,
        ["e", "float64", "float32, float16, bfloat16"],
    ),
    (
        "int inputs",
        lambda e, c, t, b: ((e.astype(np.int32), c.astype(np.int32), t), {}),
        TypeError,
        ["e", "int32"],
    ),
    (
        "float targets",
        lambda e, c, t, b: ((e, c, t.astype(np.float32)), {}),
        TypeError,
        ["targets", "float32"],
    ),
    ("bool targets", lambda e, c, t, b: ((e, c, t > 0), {}), TypeError, ["targets", "bool"]),
    (
        "int16 targets",
        lambda e, c, t, b: ((e, c, t.astype(np.int16)), {}),
        TypeError,
        ["targets", "cast", "int32"],
    ),
    (
        "uint8 targets",
        lambda e, c, t, b: ((e, c, np.abs(t).astype(np.uint8)), {}),
        TypeError,
        ["targets", "cast"],
    ),
    ("bias shape", lambda e, c, t, b: ((e, c, t, b[:-1]), {}), ValueError, ["bias", "(V,)"]),
    ("bias 2-D", lambda e, c, t, b: ((e, c, t, b[None]), {}), ValueError, ["bias", "(V,)"]),
    ("bias dtype", lambda e, c, t, b: ((e, c, t, b.astype(np.float16)), {}), TypeError, ["bias", "float16"]),
    ("V = 0", lambda e, c, t, b: ((e, c[:0], t), {}), ValueError, ["V=0"]),
    ("D = 0", lambda e, c, t, b: ((e[:, :0], c[:, :0], t), {}), ValueError, ["D=0"]),
    (
        "out of range",
        lambda e, c, t, b: ((e, c, _set(t, 2, 10)), {}),
        ValueError,
        ["targets", "outside [0, V=10)", "index 2: 10"],
    ),
    ("negative target", lambda e, c, t, b: ((e, c, np.full_like(t, -1)), {}), ValueError, ["targets", "-1"]),
    ("unknown option", lambda e, c, t, b: ((e, c, t), {"reductoin": "sum"}), TypeError, ["reductoin"]),
    ("bad reduction", lambda e, c, t, b: ((e, c, t), {"reduction": "avg"}), ValueError, ["reduction"]),
    ("allow_tf32 not bool", lambda e, c, t, b: ((e, c, t), {"allow_tf32": 1}), TypeError, ["allow_tf32", "bool"]),
    (
        "bad options",
        lambda e, c, t, b: ((e, c, t), {"options": {"reduction": "sum"}}),
        TypeError,
        ["options"],
    ),
    ("not an array", lambda e, c, t, b: ((e.tolist(), c, t), {}), TypeError, ["e", "list"]),
    (
        "mixed kinds",
        lambda e, c, t, b: ((e, _FakeGPUArray(c.shape, c.dtype), t), {}),
        TypeError,
        ["e", "c", "one kind"],
    ),
    (
        "two devices",
        lambda e, c, t, b: (
            (
                _FakeGPUArray(e.shape, e.dtype, 0),
                _FakeGPUArray(c.shape, c.dtype, 1),
                _FakeGPUArray(t.shape, t.dtype, 0),
            ),
            {},
        ),
        ValueError,
        ["cuda:0", "cuda:1", "one device"],
    ),
    ("shift scalar", lambda e, c, t, b: ((e[0], c, t[0]), {"shift": True}), ValueError, ["targets", "shift"]),
]


@pytest.mark.parametrize("fn", ["linear_cross_entropy", "linear_cross_entropy_with_grad", "forward"])
@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, fn):
    _, build, exc, words = case
    args, kwargs = build(*_ok())
    with pytest.raises(exc) as info:
        getattr(cce, fn)(*args, **kwargs)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"message {msg!r} lacks {w!r}"


def test_backward_bad_lse_and_grad_loss():
    e, c, t, b = _ok()
    lse, _ = cce.forward(e, c, t)
    with pytest.raises(ValueError, match="lse"):
        cce.backward(e, c, t, lse[:-1], 1.0)
    with pytest.raises(ValueError, match="grad_loss"):
        cce.backward(e, c, t, lse, np.ones(6, np.float32))  # "mean" wants a scalar
    with pytest.raises(ValueError, match="grad_loss"):
        cce.backward(e, c, t, lse, np.ones(5, np.float32), reduction="none")
    with pytest.raises(ValueError, match="grad_lse"):
        cce.backward(e, c, t, lse, 1.0, grad_lse=np.ones(3, np.float32))


def test_cross_entropy_bad_input():
    logits = np.zeros((4, 5), np.float32)
    t = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="targets"):
        cce.cross_entropy(logits, t[:3])
    with pytest.raises(TypeError, match="logits"):
        cce.cross_entropy(logits.astype(np.float64), t)
    with pytest.raises(TypeError, match="targets"):
        cce.cross_entropy(logits, t.astype(np.float32))
    with pytest.raises(ValueError, match="V=0"):
        cce.cross_entropy(logits[:, :0], t)
    with pytest.raises(ValueError, match="outside"):
        cce.cross_entropy(logits, t + 5)
    with pytest.raises(ValueError, match="C-contiguous"):
        cce.cross_entropy(np.zeros((5, 4), np.float32).T, t, inplace_backward=True)


def test_validate_on_shape_dtype_structs():
    """validate reads only .shape and .dtype (works on jax.ShapeDtypeStruct, tracers, ...)."""
    jax = pytest.importorskip("jax")
    s = jax.ShapeDtypeStruct
    p = check_linear_ce_args(
        s((2, 3, 16), ml_dtypes.bfloat16),
        s((100, 16), ml_dtypes.bfloat16),
        s((2, 3), np.int32),
        s((100,), ml_dtypes.bfloat16),
    )
    assert (p.batch_shape, p.n, p.d, p.v, p.dtype.name, p.index_dtype.name) == (
        (2, 3),
        6,
        16,
        100,
        "bfloat16",
        "int32",
    )
    p = check_cross_entropy_args(s((0, 7), np.float16), s((0,), np.int64))
    assert (p.n, p.d, p.v) == (0, 0, 7)
    with pytest.raises(TypeError, match="e is bfloat16 but c is float32"):
        check_linear_ce_args(s((3, 4), ml_dtypes.bfloat16), s((5, 4), np.float32), s((3,), np.int32))
    assert check_linear_ce_args(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros(2, np.int64), allow_float64=True).v == 4


@pytest.mark.parametrize("where", ["e", "c"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_inf_give_nan(where, value, reduction):
    e, c, t, b = make_problem(6, 8, 10, ignore_frac=0.0, seed=2)
    if where == "e":
        e[2, 3] = value
    else:
        c[4, 3] = value
    loss, de, dc = cce.linear_cross_entropy_with_grad(e, c, t, reduction=reduction)
    li = np.asarray(loss).reshape(-1)
    if reduction == "mean":
        assert np.isnan(li).all(), f"loss {loss} is not NaN with {value} in {where}"
    elif where == "e":  # row 2 has +-inf logits of both signs (or NaN ones): its loss is NaN
        assert np.isnan(li[2]) and np.isfinite(np.delete(li, 2)).all(), f"per-token loss {loss}"
    else:  # one poisoned column: rows where it is +inf or NaN get NaN (-inf is a zero probability)
        assert np.isnan(li).any(), f"per-token loss {loss} has no NaN with {value} in c"


def test_noncontiguous_inputs_are_copied():
    e, c, t, b = make_problem(12, 8, 10, bias=True, seed=3)
    ref = cce.linear_cross_entropy_with_grad(e, c, t, b)
    e_nc = np.asfortranarray(e)
    c_nc = np.repeat(c, 2, axis=1)[:, ::2]
    t_nc = np.stack([t, t], axis=1)[:, 0]
    assert not (e_nc.flags.c_contiguous or c_nc.flags.c_contiguous or t_nc.flags.c_contiguous)
    out = cce.linear_cross_entropy_with_grad(e_nc, c_nc, t_nc, b)
    for a, r in zip(out, ref):
        np.testing.assert_allclose(a, r, rtol=1e-6, atol=1e-7)


def test_jax_cpu_arrays_round_trip():
    jnp = pytest.importorskip("jax.numpy")
    e, c, t, b = make_problem(12, 8, 10, bias=True, seed=4)
    ref = cce.linear_cross_entropy_with_grad(e, c, t, b)
    out = cce.linear_cross_entropy_with_grad(jnp.asarray(e), jnp.asarray(c), jnp.asarray(t), jnp.asarray(b))
    for a, r in zip(out, ref):
        assert type(a).__module__.startswith("jax"), type(a)
        np.testing.assert_allclose(np.asarray(a), r, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="immutable"):
        cce.cross_entropy(jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32), inplace_backward=True)


def test_options_object_and_overrides():
    e, c, t, b = _ok()
    o = cce.CCEOptions(reduction="sum", return_lse=True)
    loss, lse = cce.linear_cross_entropy(e, c, t, options=o)
    loss2 = cce.linear_cross_entropy(e, c, t, options=o, return_lse=False)
    assert lse.shape == t.shape and lse.dtype == np.float32 and loss == loss2
    loss3, lse3, zl = cce.linear_cross_entropy(e, c, t, options=o, z_loss=0.1, return_z_loss=True)
    assert np.isclose(loss3, loss2 + zl, rtol=1e-6) and zl > 0


def test_check_targets_without_gpu_calls_is_noop(monkeypatch):
    """A thread that made no GPU call: check_targets touches no CuPy and raises nothing, even after
    a NumPy call with a bad target (the NumPy backend raises at once, not later here)."""
    import threading

    from cce_cupy import _targets

    def no_cupy():
        raise AssertionError("check_targets touched CuPy with no GPU call made")

    e, c, t, _ = make_problem(4, 8, 10, ignore_frac=0.0)
    t[0] = 10
    results = []

    def body():  # a fresh thread: the target watch is per thread, other tests' GPU calls don't count
        try:
            cce.linear_cross_entropy(e, c, t)
        except ValueError as err:
            results.append(str(err))
        monkeypatch.setattr(_targets, "_cupy", no_cupy)
        results.append(cce.check_targets())

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert len(results) == 2 and "outside [0, V=10)" in results[0] and results[1] is None, results
