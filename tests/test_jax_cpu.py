"""JAX bindings on CPU: the pure-JAX blocked path against optax on materialized float64 logits.

On CPU both `backward_impl`s run the pure-JAX reference (platform_dependent picks it), so their
equality here only checks the switch; the kernel-vs-reference comparison is in test_jax_gpu.py.
The buffer_callback plumbing (argument order, scratch outputs, vmap methods) is exercised on CPU
by swapping the CuPy launchers for NumPy stand-ins (`test_callback_plumbing_*`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import NumpyBridge, assert_rel_close, make_problem
from jax.test_util import check_grads

from cce_cupy.options import CCEOptions, make_options
from jax_bindings import _dispatch, gpu, linear_cross_entropy

pytestmark = pytest.mark.usefixtures("jax_x64")


# --------------------------------------------------------------------------------- truth
def optax_truth(e, c, t, bias, o: CCEOptions):
    """Outputs like ours, from optax on materialized float64 logits (differentiable in e, c, bias)."""
    batch = t.shape
    t = np.asarray(t).astype(np.int64)
    if o.shift:
        t = np.concatenate([t[..., 1:], np.full(batch[:-1] + (1,), o.ignore_index)], axis=-1)
    t = t.reshape(-1)
    e = e.astype(jnp.float64).reshape(-1, e.shape[-1])
    z = e @ c.astype(jnp.float64).T
    if bias is not None:
        z = z + bias.astype(jnp.float64)
    y = o.softcap * jnp.tanh(z / o.softcap) if o.softcap else z
    v = y.shape[-1]
    valid = t != o.ignore_index
    safe_t = np.where(valid, t, 0)
    if o.label_smoothing:
        labels = optax.smooth_labels(jax.nn.one_hot(safe_t, v, dtype=jnp.float64), o.label_smoothing)
        ce = optax.softmax_cross_entropy(y, labels)
    else:
        ce = optax.softmax_cross_entropy_with_integer_labels(y, safe_t)
    lse = jax.nn.logsumexp(y, axis=-1)
    zl_tok = jnp.where(valid, o.z_loss * lse**2, 0.0)
    loss_tok = jnp.where(valid, ce, 0.0) + zl_tok
    cnt = max(int(valid.sum()), 1)
    red = {"mean": lambda x: x.sum() / cnt, "sum": jnp.sum, "none": lambda x: x.reshape(batch)}[o.reduction]
    out = [red(loss_tok)]
    if o.return_lse:
        out.append(lse.reshape(batch))
    if o.return_z_loss:
        out.append(red(zl_tok))
    return out[0] if len(out) == 1 else tuple(out)


def _cotangents(out, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), out)


def _vjp(fn, *args, seed=1):
    """Outputs and the VJP of random cotangents (touches every output's gradient path)."""
    out, pull = jax.vjp(fn, *args)
    return out, pull(_cotangents(out, seed))


def _jax_args(e, c, t, b):
    return jnp.asarray(e), jnp.asarray(c), jnp.asarray(t), (None if b is None else jnp.asarray(b))


OPTION_CASES = {
    "default": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "ignore_index_0": {"ignore_index": 0},
    "softcap": {"softcap": 2.5},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 0.05},
    "shift": {"shift": True},
    "return_lse": {"return_lse": True},
    "return_z_loss": {"return_z_loss": True, "z_loss": 0.05},
    # The pure-JAX path is exact: the Hopper kernels' element rule at this eps would move this
    # problem's gradient by ~2e-3, 100x the tolerance. (grad_dtype and deterministic act in the
    # kernels only: tests/test_cuda_*.py, tests/test_jax_gpu.py.)
    "filter_eps_ignored": {"filter_eps": 1e-3},
    "all": {
        "reduction": "none",
        "softcap": 3.0,
        "label_smoothing": 0.1,
        "z_loss": 0.05,
        "shift": True,
        "return_lse": True,
        "return_z_loss": True,
    },
    "all_mean": {
        "softcap": 3.0,
        "label_smoothing": 0.1,
        "z_loss": 0.05,
        "shift": True,
        "return_lse": True,
        "return_z_loss": True,
    },
}


def _compare(e, c, t, b, o, tol, block_v=None, grad_tol=None):
    args = _jax_args(e, c, t, b)
    diff = (0, 1) if b is None else (0, 1, 3)

    def ours(*xs):
        full = list(args)
        for i, x in zip(diff, xs):
            full[i] = x
        return linear_cross_entropy(*full, options=o, block_v=block_v)

    def truth(*xs):
        full = list(args)
        for i, x in zip(diff, xs):
            full[i] = x
        return optax_truth(full[0], full[1], np.asarray(t), full[3], o)

    prim = [args[i] for i in diff]
    out, grads = jax.jit(lambda *xs: _vjp(ours, *xs))(*prim)
    ref_out, ref_grads = jax.jit(lambda *xs: _vjp(truth, *xs))(*[x.astype(jnp.float64) for x in prim])
    for name, a, r in zip(("loss", "extra1", "extra2"), jax.tree.leaves(out), jax.tree.leaves(ref_out)):
        assert a.shape == r.shape, (name, a.shape, r.shape)
        assert_rel_close(a, r, tol, name)
    for name, g, r, x in zip(("de", "dc", "db"), grads, ref_grads, prim):
        assert g.shape == x.shape and g.dtype == x.dtype, (name, g.shape, g.dtype)
        assert_rel_close(g, r, grad_tol or tol, name)


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
@pytest.mark.parametrize("block_v", [None, 32])
def test_options_match_optax(case, block_v):
    kw = dict(OPTION_CASES[case])
    o = make_options(**kw)
    e, c, t, _ = make_problem(14, 13, 129, "float32", peaked=True, ignore_index=o.ignore_index, batch_shape=(2, 7))
    e, c = e * 1.5, c * 1.5  # logits large enough that softcap bends them
    _compare(e, c, t, None, o, 2e-5, block_v)


@pytest.mark.parametrize("case", ["default", "all", "all_mean"])
def test_bias_matches_optax(case):
    o = make_options(**OPTION_CASES[case])
    e, c, t, b = make_problem(7, 13, 129, "float32", bias=True, batch_shape=(7,))
    _compare(e, c, t, b, o, 2e-5, block_v=32)


@pytest.mark.parametrize("n,d,v", [(7, 13, 129), (3, 5, 1), (1, 1, 2), (5, 4, 256)])
@pytest.mark.parametrize(
    "dtype,tol,grad_tol",
    [("float64", 1e-12, 1e-12), ("float32", 2e-5, 2e-5), ("bfloat16", 2e-5, 8e-3), ("float16", 2e-5, 1e-3)],
)
def test_shapes_and_dtypes(n, d, v, dtype, tol, grad_tol):
    # 16-bit inputs are compared with float64 logits of the *same rounded inputs*: the path
    # accumulates in float32 (values within float32 error); gradients are rounded once to the
    # input dtype (half an ulp: 2^-9 for bfloat16, 2^-12 for float16).
    o = make_options(z_loss=0.01, return_lse=True)
    e, c, t, b = make_problem(n, d, v, dtype, bias=True, batch_shape=(n,))
    _compare(e, c, t, b, o, tol, block_v=64, grad_tol=grad_tol)


def test_empty_batch():
    e, c, t, b = make_problem(0, 6, 33, "float32", bias=True, batch_shape=(2, 0))
    for red in ("mean", "sum", "none"):
        o = make_options(reduction=red, return_lse=True)
        (loss, lse), (de, dc, db) = _vjp(
            lambda e_, c_, b_, o=o: linear_cross_entropy(e_, c_, jnp.asarray(t), b_, options=o),
            jnp.asarray(e),
            jnp.asarray(c),
            jnp.asarray(b),
        )
        assert lse.shape == (2, 0) and de.shape == e.shape
        assert loss.shape == ((2, 0) if red == "none" else ())
        if red != "none":
            assert float(loss) == 0.0
        assert not np.any(np.asarray(dc)) and not np.any(np.asarray(db))


def test_all_ignored_mean_is_zero():
    e, c, t, _ = make_problem(6, 5, 40, "float32", ignore_frac=1.0)
    loss, (de, dc) = jax.value_and_grad(linear_cross_entropy, argnums=(0, 1))(e, c, t)
    assert float(loss) == 0.0 and not np.any(np.asarray(de)) and not np.any(np.asarray(dc))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_check_grads_float64(reduction):
    o = make_options(
        reduction=reduction, softcap=3.0, label_smoothing=0.1, z_loss=0.05, return_lse=True, return_z_loss=True
    )
    e, c, t, b = make_problem(6, 4, 19, "float64", bias=True, batch_shape=(2, 3))
    tj = jnp.asarray(t)

    def f(e_, c_, b_):
        return linear_cross_entropy(e_, c_, tj, b_, options=o, block_v=8)

    check_grads(f, (jnp.asarray(e), jnp.asarray(c), jnp.asarray(b)), order=1, modes=("rev",))


# --------------------------------------------------------------------- transformations
def test_jit_and_value_and_grad_equal_eager():
    o = make_options(return_lse=True, z_loss=0.01)
    e, c, t, b = _jax_args(*make_problem(9, 8, 70, "float32", bias=True))

    def f(e_, c_, b_):
        loss, lse = linear_cross_entropy(e_, c_, t, b_, options=o, block_v=32)
        return loss + 0.1 * lse.sum()

    eager = jax.value_and_grad(f, argnums=(0, 1, 2))(e, c, b)
    jitted = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(e, c, b)
    for a, r in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch_c", [False, True])
def test_vmap_equals_loop(batch_c):
    o = make_options(reduction="sum", softcap=4.0, shift=True)
    b_sz, n, d, v = 3, 5, 6, 45
    rng = np.random.default_rng(3)
    e = jnp.asarray(rng.standard_normal((b_sz, n, d)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((b_sz, v, d) if batch_c else (v, d)) / 2, jnp.float32)
    t = jnp.asarray(rng.integers(0, v, (b_sz, n)), jnp.int32)

    def f(e_, c_, t_):
        return linear_cross_entropy(e_, c_, t_, options=o, block_v=16)

    g = jax.value_and_grad(f, argnums=(0, 1))
    c_axis = 0 if batch_c else None
    vm = jax.jit(jax.vmap(g, in_axes=(0, c_axis, 0)))(e, c, t)
    for i in range(b_sz):
        li, (dei, dci) = g(e[i], c[i] if batch_c else c, t[i])
        np.testing.assert_allclose(vm[0][i], li, rtol=1e-6)
        np.testing.assert_allclose(vm[1][0][i], dei, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(vm[1][1][i], dci, rtol=1e-5, atol=1e-7)


def test_checkpoint():
    e, c, t, _ = _jax_args(*make_problem(8, 7, 50, "float32"))

    def f(e_, c_):
        return linear_cross_entropy(jnp.tanh(e_), c_, t, block_v=16)

    plain = jax.grad(f, argnums=(0, 1))(e, c)
    remat = jax.jit(jax.grad(jax.checkpoint(f), argnums=(0, 1)))(e, c)
    for a, r in zip(remat, plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-6, atol=1e-7)


def test_backward_impl_reference_equals_kernel_path(numpy_bridge):
    # The "kernel" path runs the callback plumbing (NumPy stand-ins, numpy_bridge), the "reference"
    # one the pure-JAX backward: two implementations, and the switch picks the backward's.
    e, c, t, b = _jax_args(*make_problem(8, 7, 50, "float32", bias=True))
    grads, calls = [], []
    for impl in ("kernel", "reference"):
        numpy_bridge.calls.clear()
        grads.append(
            jax.grad(
                lambda e_, c_, b_, impl=impl: linear_cross_entropy(e_, c_, t, b_, backward_impl=impl), argnums=(0, 1, 2)
            )(e, c, b)
        )
        calls.append(list(numpy_bridge.calls))
    assert calls == [["forward", "backward"], ["forward"]]
    for a, r in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-6, atol=1e-7)


def test_int64_targets_without_x64():
    jax.config.update("jax_enable_x64", False)
    e, c, t, _ = make_problem(8, 7, 50, "float32", idx_dtype=np.int64)
    loss = jax.jit(linear_cross_entropy)(e, c, t)
    jax.config.update("jax_enable_x64", True)
    ref = optax_truth(jnp.asarray(e), jnp.asarray(c), t, None, CCEOptions())
    assert_rel_close(loss, ref, 2e-5, "loss")


def test_out_of_range_target_gives_nan():
    e, c, t, _ = make_problem(6, 5, 40, "float32", ignore_frac=0.0)
    t = t.copy()
    t[2] = 40
    tok = linear_cross_entropy(e, c, t, reduction="none")
    assert np.isnan(np.asarray(tok)[2]) and np.isfinite(np.delete(np.asarray(tok), 2)).all()
    assert np.isnan(float(linear_cross_entropy(e, c, t)))


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda e, c, t: (e, c[:, :-1], t), ValueError, "D="),
        (lambda e, c, t: (e, c, t[:-1]), ValueError, "targets has shape"),
        (lambda e, c, t: (e, c, t.astype(jnp.float32)), TypeError, "targets"),
        (lambda e, c, t: (e, c.astype(jnp.float16), t), TypeError, "c is"),
        (lambda e, c, t: (e.astype(jnp.int32), c, t), TypeError, "e has unsupported dtype"),
        (lambda e, c, t: (e, c[:0], t), ValueError, "V=0"),
    ],
)
def test_bad_inputs_raise_at_trace_time(mutate, exc, match):
    e, c, t, _ = _jax_args(*make_problem(6, 5, 40, "float32"))
    args = mutate(e, c, t)
    with pytest.raises(exc, match=match):
        jax.eval_shape(linear_cross_entropy, *args)


def test_bad_options_raise():
    e, c, t, _ = _jax_args(*make_problem(6, 5, 40, "float32"))
    with pytest.raises(TypeError, match="unknown option"):
        linear_cross_entropy(e, c, t, bogus=1)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(e, c, t, reduction="avg")
    with pytest.raises(ValueError, match="backward_impl"):
        linear_cross_entropy(e, c, t, backward_impl="cuda")
    with pytest.raises(ValueError, match="vmap_method"):
        linear_cross_entropy(e, c, t, vmap_method="legacy_vectorized")
    with pytest.raises(ValueError, match="bias must have shape"):
        jax.jit(linear_cross_entropy)(e, c, t, jnp.zeros(3, jnp.float32))


# --------------------------------------------------------------------- no N x V anywhere
def _avals(jaxpr):
    """Every aval in a jaxpr and its sub-jaxprs (scan / cond / custom_vjp / pjit bodies)."""
    for var in list(jaxpr.invars) + list(jaxpr.constvars):
        yield var.aval
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def test_no_n_by_v_intermediate():
    n, d, v, block_v = 96, 24, 8192, 1024
    o = make_options(softcap=5.0, label_smoothing=0.1, z_loss=0.01, return_lse=True)
    e, c, t, b = _jax_args(*make_problem(n, d, v, "float32", bias=True))

    def step(e_, c_, b_):
        loss, lse = linear_cross_entropy(e_, c_, t, b_, options=o, block_v=block_v)
        return loss + lse.sum()

    for fn in (step, jax.value_and_grad(step, argnums=(0, 1, 2))):
        jaxpr = jax.make_jaxpr(fn)(e, c, b).jaxpr
        shapes = [tuple(getattr(a, "shape", ())) for a in _avals(jaxpr)]
        assert any(s == (n, block_v) for s in shapes), "the blocked path did not run"
        offenders = [s for s in shapes if n in s and (v in s or int(np.prod(s)) >= n * v)]
        assert not offenders, f"N x V intermediates: {offenders}"


# ------------------------------------------------- buffer_callback plumbing, NumPy stand-ins
@pytest.fixture
def numpy_bridge(monkeypatch):
    bridge = NumpyBridge()
    monkeypatch.setattr(_dispatch, "CPU_PATH", "callback")
    monkeypatch.setattr(gpu, "BRIDGE", bridge)
    return bridge


@pytest.mark.parametrize("case", ["default", "all", "all_mean"])
def test_callback_plumbing(numpy_bridge, case):
    o = make_options(**OPTION_CASES[case])
    e, c, t, b = make_problem(10, 6, 37, "float32", bias=True, batch_shape=(2, 5))
    _compare(e, c, t, b, o, 2e-5)
    assert numpy_bridge.calls == ["forward", "backward"]


@pytest.mark.parametrize("vmap_method", ["sequential", "expand_dims", "broadcast_all"])
@pytest.mark.parametrize("batch_c", [False, True])
def test_callback_plumbing_vmap(numpy_bridge, vmap_method, batch_c):
    o = make_options(reduction="sum", softcap=4.0)
    b_sz, n, d, v = 3, 5, 6, 45
    rng = np.random.default_rng(3)
    e = jnp.asarray(rng.standard_normal((b_sz, n, d)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((b_sz, v, d) if batch_c else (v, d)) / 2, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(v) / 4, jnp.float32)
    t = jnp.asarray(rng.integers(0, v, (b_sz, n)), jnp.int32)

    def f(e_, c_, b_, t_):
        return linear_cross_entropy(e_, c_, t_, b_, options=o, vmap_method=vmap_method)

    g = jax.value_and_grad(f, argnums=(0, 1, 2))
    vm = jax.jit(jax.vmap(g, in_axes=(0, 0 if batch_c else None, None, 0)))(e, c, bias, t)
    assert "forward" in numpy_bridge.calls and "backward" in numpy_bridge.calls
    for i in range(b_sz):
        ci = c[i] if batch_c else c
        ref_l, ref_g = jax.value_and_grad(
            lambda e_, c_, b_: optax_truth(e_, c_, np.asarray(t[i]), b_, o), argnums=(0, 1, 2)
        )(e[i].astype(jnp.float64), ci.astype(jnp.float64), bias.astype(jnp.float64))
        assert_rel_close(vm[0][i], ref_l, 2e-5, "loss")
        for k, name in enumerate(("de", "dc", "db")):
            assert_rel_close(vm[1][k][i], ref_g[k], 2e-5, name)


@pytest.mark.parametrize("case", ["default", "all_mean"])
def test_callback_plumbing_memory_budget(numpy_bridge, monkeypatch, case):
    """With a memory budget the differentiated forward is one callback returning the gradients too
    (no backward callback), and the backward only scales them by the loss cotangent."""
    from cce_cupy.cuda import budget as cuda_budget

    monkeypatch.setattr(
        gpu,
        "budget_plan",
        lambda e, c, o, has_bias: cuda_budget.budget_plan(e.shape[0], c.shape[0], e.shape[1], e.dtype, o, has_bias),
    )
    o = make_options(**OPTION_CASES[case]).replace(memory_budget=1 << 30, return_lse=False, return_z_loss=False)
    e, c, t, b = make_problem(10, 6, 37, "float32", bias=True, batch_shape=(2, 5))

    def f(e_, c_, b_):
        return 3.0 * linear_cross_entropy(e_, c_, jnp.asarray(t), b_, options=o)  # a loss cotangent of 3

    loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(jnp.asarray(e), jnp.asarray(c), jnp.asarray(b))
    assert numpy_bridge.calls == ["fused"]
    ref_l, ref_g = jax.value_and_grad(
        lambda e_, c_, b_: 3.0 * optax_truth(e_, c_, np.asarray(t), b_, o), argnums=(0, 1, 2)
    )(*(jnp.asarray(x, jnp.float64) for x in (e, c, b)))
    assert_rel_close(loss, ref_l, 2e-5, "loss")
    for k, name in enumerate(("de", "dc", "db")):
        assert_rel_close(grads[k], ref_g[k], 2e-5, name)
    # Not differentiated: the plain forward callback; reduction="none" keeps the lean backward.
    numpy_bridge.calls.clear()
    linear_cross_entropy(jnp.asarray(e), jnp.asarray(c), jnp.asarray(t), jnp.asarray(b), options=o)
    assert numpy_bridge.calls == ["forward"]
    numpy_bridge.calls.clear()
    jax.grad(
        lambda e_: linear_cross_entropy(e_, jnp.asarray(c), jnp.asarray(t), options=o.replace(reduction="none")).sum()
    )(jnp.asarray(e))
    assert numpy_bridge.calls == ["forward", "backward"]


def test_softcap_gradient_where_tanh_saturates():
    """fp32 on the pure-JAX path, target logits at z/s ~ 7: the softcap derivative must keep its
    accuracy there (see cce_cupy.numpy_backend.softcap_grad)."""
    from conftest import dense_reference

    n, d, v = 64, 32, 4096
    e, c, t, _ = make_problem(n, d, v, peaked=True, seed=3)
    e, c = (e * 2).astype(np.float32), c.astype(np.float32)
    o = CCEOptions(softcap=3.0)
    truth = dense_reference(e, c, t, None, o)
    loss, (de, dc) = jax.value_and_grad(
        lambda a, b: linear_cross_entropy(a, b, jnp.asarray(t), softcap=3.0), argnums=(0, 1)
    )(jnp.asarray(e), jnp.asarray(c))
    assert_rel_close(loss, truth["loss"], 1e-5, "loss")
    assert_rel_close(de, truth["de"], 1e-5, "dE")
    assert_rel_close(dc, truth["dc"], 1e-5, "dC")


def test_allow_tf32_only_where_not_differentiated(numpy_bridge, monkeypatch):
    """allow_tf32 reaches the forward launcher for a loss that is only evaluated; under
    differentiation the forward runs exact (the backward needs the lse of exact logits)."""
    seen = []
    real = numpy_bridge.launch_forward
    monkeypatch.setattr(
        numpy_bridge, "launch_forward", lambda *a, **k: (seen.append(a[4].allow_tf32), real(*a, **k))[1]
    )
    e, c, t, _ = make_problem(8, 6, 37, "float32")
    f = jax.jit(lambda e_, c_: linear_cross_entropy(e_, c_, t, allow_tf32=True))
    f(e, c)
    assert seen == [True]
    jax.jit(jax.grad(lambda e_, c_: linear_cross_entropy(e_, c_, t, allow_tf32=True)))(e, c)
    assert seen == [True, False]
