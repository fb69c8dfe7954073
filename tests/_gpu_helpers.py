"""Helpers shared by the CUDA test files (test_cuda_*.py): the launcher runner with NaN-poisoned
outputs, the tolerances, the Hopper skip. Not a test module (no test_ prefix)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import to_f64

from cce_cupy.cuda import backward as cuda_backward
from cce_cupy.cuda import device
from cce_cupy.cuda import forward as cuda_forward
from cce_cupy.options import CCEOptions, grad_dtype, row_coefficients

TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}


def _cp():
    import cupy

    return cupy


def _device_inputs(e, c, t, b):
    """(e, c, t, bias) as CuPy arrays (bias None stays None)."""
    cp = _cp()
    return cp.asarray(e), cp.asarray(c), cp.asarray(t), None if b is None else cp.asarray(b)


def _poisoned_outputs(n: int, d: int, v: int, gdt, has_bias: bool):
    """(lse, tgt, de, dc, db) on the GPU, all NaN (db None without bias): unwritten elements show."""
    cp = _cp()
    nan = cp.nan
    db = cp.full((v,), nan, gdt) if has_bias else None
    return (
        cp.full(n, nan, cp.float32),
        cp.full(n, nan, cp.float32),
        cp.full((n, d), nan, gdt),
        cp.full((v, d), nan, gdt),
        db,
    )


def _run_launchers(e, c, t, b, o: CCEOptions, grad_loss, **backward_kw):
    """Forward + backward through the cce_cupy.cuda launchers with every output poisoned with NaN first."""
    cp = _cp()
    ge, gc, gt, gb = _device_inputs(e, c, t, b)
    n, d = e.shape
    v = c.shape[0]
    lse = cp.full(n, cp.nan, cp.float32)
    tgt = cp.full(n, cp.nan, cp.float32)
    cuda_forward.launch_forward(ge, gc, gt, gb, o, lse, tgt)
    cpp, cq = row_coefficients(cp, o, gt != o.ignore_index, lse, cp.asarray(grad_loss, dtype=cp.float32))
    gdt = grad_dtype(ge.dtype, o)
    de = cp.full((n, d), cp.nan, gdt)
    dc = cp.full((v, d), cp.nan, gdt)
    db = None if b is None else cp.full((v,), cp.nan, gdt)
    cuda_backward.launch_backward(ge, gc, gt, gb, o, lse, cpp, cq, de, dc, db, **backward_kw)
    cp.cuda.Device().synchronize()
    return {
        "lse": lse,
        "tgt": tgt,
        "de": de,
        "dc": dc,
        "db": db,
        "coef_p": cp.asnumpy(cpp).astype(np.float64),
        "coef_q": cp.asnumpy(cq).astype(np.float64),
    }


def _assert_no_nan(out):
    for k in ("lse", "tgt", "de", "dc", "db"):
        if out[k] is not None:
            a = to_f64(out[k])
            bad = np.argwhere(np.isnan(a))
            assert bad.size == 0, f"{k}: {len(bad)} elements never written (still NaN), first at {bad[0].tolist()}"


def _skip_unless_hopper(cp):
    if cp.cuda.Device().compute_capability != "90" or device.KERNELS != "auto":
        pytest.skip("the Hopper kernels (wgmma, sparse filtered backward) run only on compute capability 9.0")
