"""The API on CuPy (and torch through DLPack): batch/shift/options, edge sizes, the out-of-range
target flag, the dispatch to the launchers, allow_tf32. Run on a GPU: pytest -m gpu -q -rs."""

from __future__ import annotations

import numpy as np
import pytest
from _gpu_helpers import TOL, _cp, _skip_unless_hopper
from conftest import DTYPES, assert_rel_close, dense_reference, make_problem, rel_err

import cce_cupy as cce
from cce_cupy.cuda import backward as cuda_backward
from cce_cupy.cuda import device
from cce_cupy.cuda import forward as cuda_forward
from cce_cupy.cuda import logits as cuda_logits
from cce_cupy.cuda import sparse as cuda_sparse
from cce_cupy.options import CCEOptions

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_api_cupy_batch_shift_all_options(dtype):
    cp = _cp()
    e, c, t, b = make_problem(2 * 65, 40, 333, dtype, bias=True, peaked=True, batch_shape=(2, 65), seed=5)
    o = CCEOptions(
        shift=True,
        softcap=5.0,
        label_smoothing=0.05,
        z_loss=1e-3,
        return_lse=True,
        return_z_loss=True,
        grad_dtype="float32",
    )
    loss, de, dc, db, lse, zl = cce.linear_cross_entropy_with_grad(
        cp.asarray(e), cp.asarray(c), cp.asarray(t), cp.asarray(b), options=o
    )
    assert isinstance(loss, cp.ndarray) and de.shape == e.shape and de.dtype == np.float32
    truth = dense_reference(e, c, t, b, o)
    tol = TOL[dtype]
    for name, ours in (("loss", loss), ("de", de), ("dc", dc), ("db", db), ("lse", lse), ("z_loss", zl)):
        assert_rel_close(ours, truth[name], tol, name)


def test_api_n0_and_v1():
    cp = _cp()
    e, c, t, b = make_problem(0, 8, 10, bias=True)
    loss, de, dc, db = cce.linear_cross_entropy_with_grad(cp.asarray(e), cp.asarray(c), cp.asarray(t), cp.asarray(b))
    assert float(loss) == 0.0 and de.shape == (0, 8) and not cp.any(dc) and not cp.any(db)
    e, c, t, _ = make_problem(5, 8, 1, ignore_frac=0.0)
    loss, de, dc = cce.linear_cross_entropy_with_grad(cp.asarray(e), cp.asarray(c), cp.asarray(t))
    assert abs(float(loss)) < 1e-5 and float(cp.abs(de).max()) < 1e-5


@pytest.mark.parametrize("data", ["uniform", "peaked"])
def test_allow_tf32_forward(data, monkeypatch):
    """fp32 inputs with allow_tf32 on Hopper. A loss only evaluated runs the wgmma forward as TF32
    (checked by the kernel name): TF32 keeps 10 mantissa bits like fp16, so it is held to the
    16-bit tolerance. With gradients the forward is the exact fp32 one (no TF32 kernel), held to
    the fp32 tolerance."""
    cp = _cp()
    _skip_unless_hopper(cp)
    names = []
    for mod in (cuda_forward, cuda_backward, cuda_sparse, cuda_logits):  # every launcher's get_kernel
        real_get = mod.get_kernel
        monkeypatch.setattr(
            mod, "get_kernel", lambda f, name, real_get=real_get: (names.append(name), real_get(f, name))[1]
        )
    e, c, t, _ = make_problem(300, 136, 1000, "float32", peaked=(data == "peaked"), seed=14)
    ge, gc, gt = cp.asarray(e), cp.asarray(c), cp.asarray(t)
    o = CCEOptions(allow_tf32=True)
    truth = dense_reference(e, c, t, None, CCEOptions())
    loss = cce.linear_cross_entropy(ge, gc, gt, options=o)
    tf32 = [n for n in names if n.startswith("lce_forward_partials_sm90") and ", float," in n]
    assert tf32, names
    print(f"allow_tf32 {data}: loss rel err {rel_err(loss, truth['loss']):.2e}")
    assert_rel_close(loss, truth["loss"], TOL["float16"], "loss (TF32 forward)")
    names.clear()
    loss, de, dc = cce.linear_cross_entropy_with_grad(ge, gc, gt, options=o)
    assert not any(n.startswith("lce_forward_partials_sm90") for n in names), names
    assert_rel_close(loss, truth["loss"], TOL["float32"], "loss (differentiated: exact)")
    assert_rel_close(de, truth["de"], TOL["float32"], "dE")
    assert_rel_close(dc, truth["dc"], TOL["float32"], "dC")


def test_out_of_range_target_flag():
    cp = _cp()
    cce.check_targets()  # clear anything pending from earlier tests
    device.target_error_flag().fill(0)
    e, c, t, _ = make_problem(20, 16, 50, ignore_frac=0.0, seed=8)
    t[3] = 50
    ge, gc = cp.asarray(e), cp.asarray(c)
    loss = cce.linear_cross_entropy(ge, gc, cp.asarray(t), reduction="none")
    l3 = cp.asnumpy(loss)
    assert np.isnan(l3[3]) and np.isfinite(np.delete(l3, 3)).all(), l3
    with pytest.raises(ValueError, match="outside"):
        cce.check_targets()
    assert int(device.target_error_flag()[0]) == 0  # cleared after reporting
    cce.check_targets()  # nothing pending any more
    # reported at the start of the next call once the flag copy has landed
    cce.linear_cross_entropy(ge, gc, cp.asarray(t))
    cp.cuda.Device().synchronize()
    t_ok = cp.asarray(np.clip(t, 0, 49))
    with pytest.raises(ValueError, match="outside"):
        cce.linear_cross_entropy(ge, gc, t_ok)
    cce.linear_cross_entropy(ge, gc, t_ok)
    cce.check_targets()
    # negative targets too, through the logits kernel
    logits = cp.asarray((e @ c.T).astype(np.float32))
    t_neg = t_ok.copy()
    t_neg[0] = -1
    assert cp.isnan(cce.cross_entropy(logits, t_neg))
    with pytest.raises(ValueError, match="outside"):
        cce.check_targets()


# (N, V) of the logits-level tests, and the cluster size ce_logits_inplace_cluster gets on an H100


def test_dispatch_cupy_uses_launchers(monkeypatch):
    cp = _cp()
    calls = []
    real_fwd, real_bwd = cuda_forward.launch_forward, cuda_backward.launch_backward

    def spy_fwd(*a, **k):
        calls.append("fwd")
        return real_fwd(*a, **k)

    def spy_bwd(*a, **k):
        calls.append("bwd")
        return real_bwd(*a, **k)

    def no_reference(*a, **k):
        raise AssertionError("the NumPy reference ran for CuPy inputs")

    monkeypatch.setattr(cuda_forward, "launch_forward", spy_fwd)
    monkeypatch.setattr(cuda_backward, "launch_backward", spy_bwd)
    monkeypatch.setattr(cce.numpy_backend, "forward", no_reference)
    monkeypatch.setattr(cce.numpy_backend, "backward", no_reference)
    e, c, t, _ = make_problem(10, 8, 20)
    cce.linear_cross_entropy_with_grad(cp.asarray(e), cp.asarray(c), cp.asarray(t))
    assert calls == ["fwd", "bwd"]


def test_torch_through_dlpack():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    e, c, t, b = make_problem(64, 32, 300, bias=True, peaked=True, seed=10)
    te, tc, tt, tb = (torch.from_numpy(x).cuda() for x in (e, c, t, b))
    loss, de, dc, db = cce.linear_cross_entropy_with_grad(te, tc, tt, tb)
    assert isinstance(loss, torch.Tensor) and isinstance(de, torch.Tensor) and de.is_cuda
    truth = dense_reference(e, c, t, b, CCEOptions())
    assert_rel_close(loss.cpu().numpy(), truth["loss"], 1e-5, "loss")
    assert_rel_close(de.cpu().numpy(), truth["de"], 1e-5, "de")
    assert_rel_close(dc.cpu().numpy(), truth["dc"], 1e-5, "dc")
    # bf16 torch tensors and in-place logits gradient through the DLPack view
    tl = torch.from_numpy((e @ c.T).astype(np.float32)).cuda().to(torch.bfloat16)
    logits = tl.float().cpu().numpy()  # before the call overwrites tl with the gradient
    loss = cce.cross_entropy(tl, tt, inplace_backward=True)
    ref = dense_reference(logits, np.eye(300), t, None, CCEOptions())
    assert_rel_close(loss.cpu().numpy(), ref["loss"], 1e-2, "loss(bf16 torch)")
    assert_rel_close(tl.float().cpu().numpy(), ref["g"], 1e-2, "dlogits(bf16 torch, in place)")
    with pytest.raises(TypeError, match="one kind"):
        cce.linear_cross_entropy(te, torch.from_numpy(c), tt)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_api_shift_alone_vs_numpy_backend(dtype):
    """shift=True alone (issue 13): CuPy against the NumPy backend on the same (B, T, D) inputs.
    The data is peaked at the unshifted targets, so ignoring shift would be far off (loss ~0.16
    instead of ~9.7); ~20% of the targets are ignore_index."""
    cp = _cp()
    e, c, t, _ = make_problem(2 * 64, 128, 1000, dtype, peaked=True, batch_shape=(2, 64), seed=15)
    ref = cce.linear_cross_entropy_with_grad(e, c, t, shift=True)
    ours = cce.linear_cross_entropy_with_grad(cp.asarray(e), cp.asarray(c), cp.asarray(t), shift=True)
    assert isinstance(ours[0], cp.ndarray) and ours[1].shape == e.shape and ours[1].dtype == e.dtype
    tol = TOL[dtype]
    for name, a, r in zip(("loss", "de", "dc"), ours, ref):
        assert_rel_close(a, r, tol, name)
