"""Defects found by differential fuzzing of the CPU paths (issue 18), one test each."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_rel_close, dense_reference, make_problem

import cce_cupy as cce
from cce_cupy import numpy_backend
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
    monkeypatch.setattr(numpy_backend, "BLOCK_BYTES", 128 * 128 * 4)
    e, c, t, b = _masked_problem(300, 512)
    assert numpy_backend.block_shape(300, 512)[1] <= 256
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
    g = jax.grad(
        lambda e_, c_: jb.linear_cross_entropy(e_, c_, jnp.asarray(t), jnp.asarray(b), options=o, block_v=128),
        argnums=(0, 1),
    )
    de, dc = g(jnp.asarray(e), jnp.asarray(c))
    ref = dense_reference(e, c, t, b, o)
    assert_rel_close(de, ref["de"], 2e-5, "de")
    assert_rel_close(dc, ref["dc"], 2e-5, "dc")


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # the NaN asked for
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


def test_confident_rows_without_lse_term_stay_exact():
    """Without z-loss the confident rows' gradient is ~0 (p_t rounds to 1): the kept part is no
    lower bound worth certifying against, so they take the exact path (and match it)."""
    e, c, t = _confident_bf16()
    stats = {}
    lse, _ = numpy_backend.forward(e, c, t, None, CCEOptions())
    g = np.ones(4, np.float32)
    de = numpy_backend.backward(e, c, t, None, CCEOptions(filter_eps="auto"), lse, g, g, stats=stats)[0]
    exact = numpy_backend.backward(e, c, t, None, CCEOptions(), lse, g, g)[0]
    assert stats == {"rows": 4, "certified_rows": 0}
    assert np.array_equal(de, exact)


# ------------------------------------------------ 8. per-token loss is never negative (NumPy)
def test_numpy_per_token_loss_is_not_negative():
    rng = np.random.default_rng(0)
    e = (10 * rng.standard_normal((2000, 64))).astype(np.float32)
    c = rng.standard_normal((300, 64)).astype(np.float32)
    t = (e @ c.T).argmax(1)  # confident rows at a logit scale of ~100: loss ~ 0
    loss = cce.linear_cross_entropy(e, c, t, reduction="none")
    assert loss.min() >= 0.0, f"{int((loss < 0).sum())} negative per-token losses, min {loss.min()}"


def test_single_class_loss_is_exactly_zero():
    """V = 1: lse and the target logit are the same number, so the loss is 0, not -1e-8 (issue 20)."""
    rng = np.random.default_rng(1)
    e = rng.standard_normal((64, 16)).astype(np.float32)
    c = rng.standard_normal((1, 16)).astype(np.float32)
    t = np.zeros(64, np.int64)
    assert np.all(cce.linear_cross_entropy(e, c, t, reduction="none") == 0.0)
    assert cce.linear_cross_entropy(e, c, t) == 0.0


# ------------------------------------------------------------------ 7. environment variables
@pytest.mark.parametrize("value", ["foo", "AUTO", "sm90"])
def test_kernels_env_is_validated(value, monkeypatch):
    from cce_cupy.cuda import device

    monkeypatch.setenv("CCE_CUPY_KERNELS", value)
    with pytest.raises(ValueError, match=r"CCE_CUPY_KERNELS must be one of auto, sm80"):
        device.kernels_from_env()


@pytest.mark.parametrize(("value", "family"), [(None, "auto"), ("", "auto"), ("auto", "auto"), ("sm80", "sm80")])
def test_kernels_env_values(value, family, monkeypatch):
    from cce_cupy.cuda import device

    if value is None:
        monkeypatch.delenv("CCE_CUPY_KERNELS", raising=False)
    else:
        monkeypatch.setenv("CCE_CUPY_KERNELS", value)
    assert device.kernels_from_env() == family


# ------------------------------------------------------------------ 5. JAX int64 targets
def test_jax_int64_targets_out_of_int32_range():
    import jax
    import jax.numpy as jnp

    import jax_bindings as jb

    if jax.config.jax_enable_x64:
        pytest.skip("64-bit JAX keeps int64 targets")
    e, c = jnp.ones((1, 3), jnp.float32), jnp.ones((7, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"targets holds values outside int32.*jax_enable_x64"):
        jb.linear_cross_entropy(e, c, np.array([2**32 + 1], np.int64))
    # In-range int64 host targets are fine (and give the loss of their class).
    loss = jb.linear_cross_entropy(e, c, np.array([1], np.int64))
    assert abs(float(loss) - np.log(7)) < 1e-6


# --------------------------------------------------------------------- 6. non-finite options
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"softcap": float("inf")}, "softcap must be None or a finite float"),
        ({"softcap": 1e39}, "softcap must be None or a finite float"),
        ({"softcap": float("nan")}, "softcap must be None or a finite float"),
        ({"softcap": 0.0}, "softcap"),
        ({"z_loss": float("inf")}, r"z_loss must be a finite float in \[0, "),
        ({"z_loss": 1e39}, "z_loss must be a finite float"),
        ({"z_loss": float("nan")}, "z_loss"),
        ({"label_smoothing": float("nan")}, "label_smoothing"),
        ({"filter_eps": float("nan")}, "filter_eps"),
        ({"ignore_index": 2**63}, r"ignore_index must be an int in \[-2\*\*63, 2\*\*63\)"),
    ],
)
def test_non_finite_options_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        CCEOptions(**kw)


# --------------------------------------------------------------------- 9. clearer errors
def test_numpy_scalars_are_accepted_as_numbers():
    o = CCEOptions(
        softcap=np.float32(30), z_loss=np.float64(1e-4), label_smoothing=np.float16(0.125), ignore_index=np.int64(-1)
    )
    assert o == CCEOptions(softcap=30.0, z_loss=1e-4, label_smoothing=0.125, ignore_index=-1)
    assert CCEOptions(filter_eps=np.float32(0.5)).filter_eps == 0.5
    assert type(o.ignore_index) is int and type(o.softcap) is float
    assert hash(o) == hash(o.replace())
    for bad in (True, np.bool_(True)):
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            CCEOptions(ignore_index=bad)
        with pytest.raises(ValueError, match="z_loss"):
            CCEOptions(z_loss=bad)


def test_jax_block_v_accepts_numpy_int():
    import jax.numpy as jnp

    import jax_bindings as jb

    e, c, t = jnp.ones((2, 3)), jnp.ones((5, 3)), jnp.array([0, 4])
    assert float(jb.linear_cross_entropy(e, c, t, block_v=np.int64(2))) == pytest.approx(np.log(5))
    with pytest.raises(ValueError, match="block_v must be None or an int >= 1"):
        jb.linear_cross_entropy(e, c, t, block_v=True)


def test_big_endian_input_names_byte_order_and_fix():
    e = np.ones((2, 3), np.float32)
    c = np.ones((5, 3), ">f4")
    with pytest.raises(TypeError, match=r"c has non-native byte order.*c\.astype\(c\.dtype\.newbyteorder\('='\)\)"):
        cce.linear_cross_entropy(e, c, np.array([0, 1]))
    fixed = cce.linear_cross_entropy(e, c.astype(c.dtype.newbyteorder("=")), np.array([0, 1]))
    assert float(fixed) == pytest.approx(np.log(5))


def test_missing_arrays_name_the_argument():
    with pytest.raises(TypeError, match="e must be an array"):
        cce.linear_cross_entropy(None, None, None)
    e, c, t = np.ones((2, 3), np.float32), np.ones((5, 3), np.float32), np.array([0, 1])
    with pytest.raises(TypeError, match="targets must be an array"):
        cce.linear_cross_entropy(e, c, None)
    with pytest.raises(TypeError, match="lse must be an array"):
        cce.backward(e, c, t, None, 1.0)
    with pytest.raises(TypeError, match="logits must be an array"):
        cce.cross_entropy(None, t)


def test_jax_shift_with_scalar_targets():
    import jax.numpy as jnp

    import jax_bindings as jb

    with pytest.raises(ValueError, match="shift=True needs targets with a sequence dimension"):
        jb.linear_cross_entropy(jnp.ones(3), jnp.ones((5, 3)), jnp.array(1), shift=True)


@pytest.mark.parametrize("shift", [False, True])
def test_ignore_index_outside_targets_dtype(shift):
    e, c = np.ones((2, 3), np.float32), np.ones((5, 3), np.float32)
    t32 = np.array([0, 1], np.int32)
    with pytest.raises(ValueError, match=r"ignore_index=4294967296 does not fit the targets' dtype int32"):
        cce.linear_cross_entropy(e, c, t32, ignore_index=2**32, shift=shift)
    loss = cce.linear_cross_entropy(e, c, t32.astype(np.int64), ignore_index=2**32, shift=shift)
    assert float(loss) == pytest.approx(np.log(5))


# ------------------------------------------------- 10. the GPU target-flag watch and threads
class _FakeFlag(np.ndarray):
    def get(self, out, blocking=True):
        out[...] = self


class _FakeCupy:
    """Just enough of cupy / cupyx for cuda.device.target_error_flag and _targets._TargetWatch."""

    def __init__(self):
        self.device = 0
        self.on_done = None  # called when an event's .done is read (to interleave threads)
        fake = self

        class Device:
            def __init__(self, dev=None):
                self.id = fake.device if dev is None else dev

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class Event:
            def __init__(self, disable_timing=False):
                pass

            def record(self):
                pass

            def synchronize(self):
                pass

            @property
            def done(self):
                if fake.on_done is not None:
                    hook, fake.on_done = fake.on_done, None
                    hook()
                return True

        self.cuda = type("cuda", (), {"Device": Device, "Event": Event})
        self.int32 = np.int32
        self.zeros_hook = None

    def zeros(self, n, dtype):
        if self.zeros_hook is not None:
            hook, self.zeros_hook = self.zeros_hook, None
            hook()
        return np.zeros(n, dtype).view(_FakeFlag)

    def zeros_pinned(self, n, dtype):
        return np.zeros(n, dtype)


@pytest.fixture
def fake_cupy(monkeypatch):
    import sys

    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupyx", fake)
    return fake


def _in_thread(fn):
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as err:  # handed back to the caller
            out["error"] = err

    th = threading.Thread(target=run)
    th.start()
    th.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_bad_target_is_reported_to_its_own_thread(fake_cupy):
    from cce_cupy import _targets
    from cce_cupy.cuda import device

    watch = _targets._TargetWatch()

    def bad_call():  # a kernel of this thread saw a bad target
        device.target_error_flag()[0] = 1
        watch.after_launch(fake_cupy)

    _in_thread(bad_call)
    watch.after_launch(fake_cupy)  # a good call in this thread
    watch.poll(block=True)  # nothing to report here
    with pytest.raises(ValueError, match="outside"):
        _in_thread(lambda: (bad_call(), watch.poll(block=True)))


def test_poll_while_another_thread_adds_a_device(fake_cupy):
    from cce_cupy import _targets

    watch = _targets._TargetWatch()
    watch.after_launch(fake_cupy)

    def other_thread_launches_on_device_1():
        fake_cupy.device = 1
        _in_thread(lambda: watch.after_launch(fake_cupy))
        fake_cupy.device = 0

    fake_cupy.on_done = other_thread_launches_on_device_1  # runs in the middle of poll's loop
    watch.poll()  # "dictionary changed size during iteration" when the state is shared


def test_target_flag_creation_does_not_race(fake_cupy):
    from cce_cupy.cuda import device

    got = {}

    def other():
        got["first"] = device.target_error_flag()

    fake_cupy.zeros_hook = lambda: _in_thread(other)  # the other thread creates its flag meanwhile
    mine = device.target_error_flag()
    assert device.target_error_flag() is mine
    assert _in_thread(lambda: device.target_error_flag()) is not mine
    assert got["first"] is not mine


@pytest.mark.parametrize(
    "value, error, match",
    [
        ("4GiB", TypeError, r"memory_budget must be 'lean' or a number of bytes"),
        (4.0e9, TypeError, r"memory_budget must be 'lean' or a number of bytes"),
        (True, TypeError, r"memory_budget must be 'lean' or a number of bytes"),
        (0, ValueError, r"memory_budget must be a positive number of bytes"),
        (-1, ValueError, r"memory_budget must be a positive number of bytes"),
    ],
)
def test_memory_budget_is_validated(value, error, match):
    with pytest.raises(error, match=match):
        CCEOptions(memory_budget=value)


def test_memory_budget_excludes_filtering_and_is_ignored_by_numpy():
    with pytest.raises(ValueError, match=r"memory_budget .* filter_eps .* pass one of them"):
        CCEOptions(memory_budget=1 << 30, filter_eps="auto")
    assert CCEOptions(memory_budget=np.int64(1 << 30)).memory_budget == 1 << 30
    # The NumPy backend never keeps logits: a budget changes nothing there.
    e, c, t, _ = make_problem(20, 8, 50, seed=2)
    lean = cce.linear_cross_entropy_with_grad(e, c, t)
    budgeted = cce.linear_cross_entropy_with_grad(e, c, t, memory_budget=1 << 30)
    for a, b in zip(lean, budgeted):
        np.testing.assert_array_equal(a, b)
