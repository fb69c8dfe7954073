"""What a new user runs into first (issue 20): errors that name the fix for JAX users calling
cce_cupy directly, PyTorch CPU tensors, float64 input, jax_bindings without JAX, packaging."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_problem

import cce_cupy as cce

ROOT = Path(__file__).resolve().parent.parent


def _small(dtype="float32"):
    e, c, t, _ = make_problem(6, 8, 10, dtype, seed=3)
    return e, c, t


# ------------------------------------------------------------------------ JAX users
def test_jax_tracers_point_to_jax_bindings():
    jax = pytest.importorskip("jax")
    e, c, t = _small()
    ej, cj = jax.numpy.asarray(e), jax.numpy.asarray(c)
    transforms = {
        "jit": lambda f: jax.jit(f)(ej),
        "grad": lambda f: jax.grad(f)(ej),
        "vmap": lambda f: jax.vmap(f)(ej[None]),
    }
    for name, run in transforms.items():
        with pytest.raises(TypeError, match=r"e is a JAX tracer .*jax_bindings\.linear_cross_entropy"):
            run(lambda x: cce.linear_cross_entropy(x, cj, t))
    with pytest.raises(TypeError, match=r"logits is a JAX tracer"):
        jax.jit(lambda x: cce.cross_entropy(x, t))(ej[:, :5])


def test_traced_option_must_be_static():
    jax = pytest.importorskip("jax")
    import jax_bindings

    e, c, t = _small()
    ej, cj, tj = (jax.numpy.asarray(a) for a in (e, c, t))
    for fn in (cce.linear_cross_entropy, jax_bindings.linear_cross_entropy):
        with pytest.raises(TypeError, match=r"softcap is a JAX tracer: options must be static Python values"):
            jax.jit(lambda s, fn=fn: fn(ej, cj, tj, softcap=s))(30.0)


def test_jax_cpu_arrays_with_numpy_targets():
    jax = pytest.importorskip("jax")
    e, c, t = _small()
    ej, cj = jax.numpy.asarray(e), jax.numpy.asarray(c)
    loss = cce.linear_cross_entropy(ej, cj, t)  # NumPy targets beside JAX CPU arrays
    assert isinstance(loss, jax.Array) and loss.shape == ()
    np.testing.assert_allclose(np.asarray(loss), cce.linear_cross_entropy(e, c, t), rtol=1e-6)
    _, de, dc = cce.linear_cross_entropy_with_grad(e, cj, t)  # NumPy e, JAX c: results as JAX
    assert isinstance(de, jax.Array) and isinstance(dc, jax.Array)


def test_mixed_gpu_and_numpy_says_what_to_move():
    class FakeGPUArray:  # has __dlpack__ on a CUDA device: a GPU array, never converted here
        shape, dtype = (6, 8), np.dtype("float32")

        def __dlpack__(self, **kw):  # pragma: no cover
            raise RuntimeError("not a real array")

        def __dlpack_device__(self):
            return (2, 0)

    e, c, t = _small()
    with pytest.raises(TypeError, match=r"e is a .*FakeGPUArray but c is a numpy.ndarray.*move c to where e lives"):
        cce.linear_cross_entropy(FakeGPUArray(), c, t)


# ------------------------------------------------------------------------ PyTorch
class _TrackedTensor:
    """Stands in for a torch tensor recording autograd (has requires_grad=True)."""

    requires_grad = True

    def __init__(self, a):
        self._a = a
        self.shape, self.dtype = a.shape, a.dtype

    def __array__(self, dtype=None, copy=None):  # torch refuses: "Can't call numpy() on Tensor that requires grad"
        raise RuntimeError("Can't call numpy() on Tensor that requires grad")


def test_requires_grad_says_detach():
    e, c, t = _small()
    match = r"c \(.*_TrackedTensor\) requires grad: cce_cupy does not record autograd.*c\.detach\(\)"
    with pytest.raises(TypeError, match=match):
        cce.linear_cross_entropy(e, _TrackedTensor(c), t)


def test_torch_cpu_tensors():
    torch = pytest.importorskip("torch")
    e, c, t = _small()
    et, ct, tt = torch.from_numpy(e), torch.from_numpy(c), torch.from_numpy(t)
    loss = cce.linear_cross_entropy(et, ct, tt)
    assert isinstance(loss, torch.Tensor) and loss.shape == ()  # 0-d, like every other kind
    assert float(loss) == pytest.approx(float(cce.linear_cross_entropy(e, c, t)), rel=1e-6)
    with pytest.raises(TypeError, match=r"e \(torch.Tensor\) requires grad.*e\.detach\(\)"):
        cce.linear_cross_entropy(et.clone().requires_grad_(), ct, tt)

    eb, cb = et.to(torch.bfloat16), ct.to(torch.bfloat16)
    loss_b, de, dc = cce.linear_cross_entropy_with_grad(eb, cb, tt)
    assert loss_b.shape == () and de.dtype == dc.dtype == torch.bfloat16
    assert de.shape == et.shape and dc.shape == ct.shape
    ref_loss, ref_de, _ = cce.linear_cross_entropy_with_grad(*(_as_bf16_numpy(x) for x in (eb, cb)), t)
    assert float(loss_b) == float(ref_loss)
    np.testing.assert_array_equal(de.float().numpy(), ref_de.astype(np.float32))


def _as_bf16_numpy(x):
    import ml_dtypes

    return x.float().numpy().astype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------------ dtypes
def test_float64_says_how_to_cast():
    e, c, t = _small()
    with pytest.raises(TypeError, match=r"e has unsupported dtype float64.*e\.astype\('float32'\).*jax_bindings"):
        cce.linear_cross_entropy(e.astype(np.float64), c.astype(np.float64), t)
    with pytest.raises(TypeError, match=r"logits has unsupported dtype float64.*logits\.astype\('float32'\)"):
        cce.cross_entropy(np.zeros((6, 10)), t)


# ------------------------------------------------------------------------ packaging
def test_jax_bindings_without_jax_names_the_extra():
    code = "import sys; sys.modules['jax'] = None; import jax_bindings"  # None: `import jax` raises ImportError
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode != 0
    assert "jax_bindings needs JAX >= 0.9.0: pip install 'cce-cupy[jax]'" in proc.stderr, proc.stderr


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_extras():
    extras = _pyproject()["project"]["optional-dependencies"]
    # The test suite runs examples/plot_train.py (matplotlib) and imports optax.
    assert {"matplotlib", "optax", "pytest"} <= set(extras["test"])
    # CuPy's RawModule needs NVRTC: the [ctk] extra of cupy brings the CUDA toolkit wheels.
    assert "cupy-cuda13x[ctk]" in extras["cuda"] and "cupy-cuda12x[ctk]" in extras["cuda12"]
    assert "jax[cuda13]>=0.9.0" in extras["jax-cuda13"] and "jax[cuda12]>=0.9.0" in extras["jax-cuda12"]
    # One jax floor everywhere, the one the README states and .ci/run tests.
    floors = {re.sub(r"^jax(\[\w+\])?", "", r) for deps in extras.values() for r in deps if r.startswith("jax")}
    assert floors == {">=0.9.0"}, floors
    assert "jax >= 0.9.0" in (ROOT / "README.md").read_text()
    # Nothing in the packages imports optax: it belongs to the examples and tests, not to `jax`.
    assert "optax" not in extras["jax"]
    src = [p.read_text() for d in ("cce_cupy", "jax_bindings") for p in (ROOT / d).glob("*.py")]
    assert not any(re.search(r"^\s*(import|from) optax", s, re.M) for s in src)


def test_license_matches_pyproject():
    assert _pyproject()["project"]["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the cce-cupy authors" in text
