"""The logits-level cross_entropy kernels (ce_logits, the Hopper cluster kernel) against the float64
reference. Run on a GPU: pytest -m gpu -q -rs."""

from __future__ import annotations

import pytest
from _gpu_helpers import TOL, _cp
from conftest import DTYPES, assert_rel_close, logits_reference, make_problem

import cce_cupy as cce
from cce_cupy.cuda import device
from cce_cupy.cuda import logits as cuda_logits
from cce_cupy.options import CCEOptions

pytestmark = pytest.mark.gpu


LOGITS_SHAPES = {
    (77, 1003): {2: None, 4: None},
    (64, 1024): {2: 1, 4: 1},
    (6, 140000): {2: 4, 4: 8},
    (3, 520000): {2: 8, 4: None},
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "kw",
    [{}, {"softcap": 3.0, "label_smoothing": 0.1, "z_loss": 1e-2, "reduction": "sum"}, {"reduction": "none"}],
)
@pytest.mark.parametrize("shape", list(LOGITS_SHAPES))
def test_cross_entropy_logits_kernel(dtype, kw, shape):
    cp = _cp()
    o = CCEOptions(**kw)
    n, v = shape
    e, c, t, _ = make_problem(n, 24, v, peaked=True, seed=9)
    logits = (e @ c.T).astype(DTYPES[dtype])
    # fp16 gradients of a large vocabulary (~1/V each) fall below fp16's normal range (6e-5) and
    # keep only a few bits; fp16 training scales the loss for this reason, and so does this test.
    grad_loss = 1024.0 if dtype == "float16" else 1.0
    truth = logits_reference(logits, t, o, grad_loss=grad_loss)
    tol = TOL[dtype]
    gx, gt = cp.asarray(logits), cp.asarray(t)
    if cp.cuda.Device().compute_capability == "90" and device.KERNELS == "auto":
        assert cuda_logits.ce_cluster_size(gx) == LOGITS_SHAPES[shape][gx.itemsize], "not the kernel this case is for"
    lse = cp.full(n, cp.nan, cp.float32)
    tgt = cp.full(n, cp.nan, cp.float32)
    cuda_logits.launch_cross_entropy(gx, gt, o, lse, tgt)
    cp.cuda.Device().synchronize()
    assert not cp.isnan(lse).any() and not cp.isnan(tgt).any(), "lse/tgt not fully written"
    assert_rel_close(lse, truth["lse"], tol, "lse")
    assert_rel_close(tgt, truth["tgt"], tol, "tgt")
    assert cp.array_equal(gx, cp.asarray(logits)), "logits changed without row_grad"
    loss = cce.cross_entropy(gx, gt, options=o)
    assert_rel_close(loss, truth["loss"], tol, "loss")
    buf = cp.asarray(logits)
    loss2 = cce.cross_entropy(buf, gt, inplace_backward=True, grad_loss=grad_loss, options=o)
    assert_rel_close(loss2, truth["loss"], tol, "loss(inplace)")
    assert_rel_close(buf, truth["g"], max(tol, 1e-5), "dlogits(inplace)")
