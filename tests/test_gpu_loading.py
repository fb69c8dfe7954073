"""Kernel loading on the GPU: the prebuilt cubins, loading per device, nothing loaded in a callback.

- Every prebuilt cubin of this GPU's architectures loads, and every instance resolves in it.
- A prebuilt kernel computes what the same kernel compiled at run time computes.
- A kernel first launched on a second GPU gets its own function and shared-memory limit there (the
  2-GPU deadlock: the limit was set on the first device only, so the second device's launch
  failed inside its JAX callback while the first waited in the collective).
- After tracing, a JAX call loads and compiles nothing inside its callbacks.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cce_cupy.cuda import loader, prebuilt, sources
from cce_cupy.options import CCEOptions, grad_dtype

pytestmark = pytest.mark.gpu


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _device_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def _fresh_loader(monkeypatch, prebuilt_on: bool) -> None:
    """Forget every loaded kernel, then load from the prebuilt cubins or compile at run time."""
    monkeypatch.setenv("CCE_CUPY_PREBUILT", "1" if prebuilt_on else "0")
    loader.get_kernel.cache_clear()
    loader._MODULES.clear()


def test_every_prebuilt_cubin_loads():
    import cupy

    cc = cupy.cuda.Device().compute_capability
    checked = 0
    for arch, filename, group in prebuilt.all_modules():
        if prebuilt.arch_for(filename, cc) != arch:
            continue
        found = prebuilt.load_cubin(arch, filename, group)
        assert found is not None, f"{arch}/{filename}/{group}: no up-to-date prebuilt cubin"
        cubin, lowered = found
        module = cupy.cuda.function.Module()
        module.load(cubin)
        assert sorted(lowered) == sorted(sources.module_groups(filename)[group])
        for name, mangled in lowered.items():
            fn = module.get_function(mangled)
            binary = cupy.cuda.driver.funcGetAttribute(cupy.cuda.driver.CU_FUNC_ATTRIBUTE_BINARY_VERSION, fn.ptr)
            assert binary == int(arch[3:5]), (name, binary)
            checked += 1
    assert checked > 100, f"only {checked} instances checked for compute capability {cc}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_prebuilt_matches_runtime_compiled(monkeypatch, dtype):
    """Forward and backward from the prebuilt cubins against the kernels NVRTC compiles here."""
    import cupy

    from cce_cupy.cuda import backward as cuda_backward
    from cce_cupy.cuda import forward as cuda_forward

    rng = np.random.default_rng(3)
    n, d, v = 300, 256, 2000
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    e = cupy.asarray(rng.standard_normal((n, d)).astype(dt))
    c = cupy.asarray((rng.standard_normal((v, d)) / 16).astype(dt))
    t = cupy.asarray(rng.integers(0, v, n).astype(np.int32))
    opts = CCEOptions(softcap=20.0)

    def run():
        lse, tgt = cupy.full(n, np.nan, cupy.float32), cupy.full(n, np.nan, cupy.float32)
        cuda_forward.launch_forward(e, c, t, None, opts, lse, tgt, tune=False)
        gdt = grad_dtype(e.dtype, opts)
        de, dc = cupy.full((n, d), np.nan, gdt), cupy.full((v, d), np.nan, gdt)
        ones = cupy.ones(n, cupy.float32)
        cuda_backward.launch_backward(e, c, t, None, opts, lse, ones, -ones, de, dc)
        return [cupy.asnumpy(x).astype(np.float64) for x in (lse, tgt, de, dc)]

    _fresh_loader(monkeypatch, True)
    ours = run()
    _fresh_loader(monkeypatch, False)
    runtime = run()
    _fresh_loader(monkeypatch, True)
    for name, a, b in zip(("lse", "tgt", "dE", "dC"), ours, runtime):
        assert np.isfinite(a).all(), f"{name}: unwritten elements"
        # The same source and options; only the NVRTC version may differ (instruction selection).
        assert _rel(a, b) <= 1e-6, (name, _rel(a, b))


@pytest.mark.skipif(_device_count() < 2, reason="needs 2 GPUs")
def test_second_device_gets_its_own_kernels():
    """The same call on GPU 0, then GPU 1: the Hopper kernels need > 48 KiB of shared memory, a
    limit set per device. Before the per-device loader, GPU 1's launch failed."""
    import cupy

    import cce_cupy as cce

    rng = np.random.default_rng(4)
    n, d, v = 512, 512, 4096
    e = (rng.standard_normal((n, d))).astype(ml_dtypes.bfloat16)
    c = (rng.standard_normal((v, d)) / 22).astype(ml_dtypes.bfloat16)
    t = rng.integers(0, v, n).astype(np.int32)
    out = []
    for dev in (0, 1):
        with cupy.cuda.Device(dev):
            loss, de, dc = cce.linear_cross_entropy_with_grad(cupy.asarray(e), cupy.asarray(c), cupy.asarray(t))
            out.append([cupy.asnumpy(x).astype(np.float64) for x in (loss, de, dc)])
    for a, b in zip(*out):
        assert np.array_equal(a, b)  # same GPU model, same kernels, deterministic


def test_jax_call_loads_nothing_in_callbacks(monkeypatch):
    import jax
    import jax.numpy as jnp

    from jax_bindings import gpu, linear_cross_entropy

    gpu.precompile.cache_clear()  # an earlier test may have reset the loader under its memo
    rng = np.random.default_rng(5)
    e = jnp.asarray(rng.standard_normal((256, 256)), jnp.bfloat16)
    c = jnp.asarray(rng.standard_normal((1000, 256)) / 16, jnp.bfloat16)
    t = jnp.asarray(rng.integers(0, 1000, 256), jnp.int32)
    f = jax.jit(jax.value_and_grad(lambda a, b: linear_cross_entropy(a, b, t), argnums=(0, 1)))
    compiled = f.lower(e, c).compile()  # tracing preloads every kernel on every local GPU

    def no_load(*args, **kwargs):
        raise AssertionError(f"kernel loaded inside a callback: {args}")

    monkeypatch.setattr(loader, "_load_function", no_load)
    loss, (de, dc) = jax.block_until_ready(compiled(e, c))
    assert np.isfinite(float(loss)) and bool(jnp.isfinite(de.astype(jnp.float32)).all())
