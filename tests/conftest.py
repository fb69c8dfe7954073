"""Shared fixtures: GPU auto-skip, data generators, a dense float64 reference, verbose comparison."""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest

from cce_cupy.cuda import plan
from cce_cupy.options import CCEOptions, z_loss_dlse

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
GPU_SKIP_REASON = "no CUDA device: run `pytest -m gpu` on a GPU machine"


@functools.cache
def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.fixture(autouse=True, scope="session")
def _private_autotune_cache(tmp_path_factory):
    """The tests' kernel tuning goes to a throw-away cache file, not the user's."""
    import os

    old = os.environ.get("CCE_CUPY_AUTOTUNE_CACHE")
    os.environ["CCE_CUPY_AUTOTUNE_CACHE"] = str(tmp_path_factory.mktemp("autotune") / "autotune.json")
    yield
    if old is None:
        os.environ.pop("CCE_CUPY_AUTOTUNE_CACHE", None)
    else:
        os.environ["CCE_CUPY_AUTOTUNE_CACHE"] = old


@pytest.fixture
def jax_x64():
    """float64 ground truth in JAX needs x64; restored afterwards so other tests see the default."""
    import jax

    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


@pytest.fixture(autouse=True)
def _fresh_filter_history():
    """Each test starts with no certified-filter history (cce_cupy.cuda.filter_history): a test on
    uncertifiable data must not turn the filter off for a later test of the same shapes."""
    from cce_cupy.cuda.filter_history import HISTORY

    HISTORY.clear()


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------- data
def make_problem(
    n,
    d,
    v,
    dtype="float32",
    *,
    peaked=False,
    bias=False,
    ignore_frac=0.2,
    idx_dtype=np.int64,
    ignore_index=-100,
    seed=0,
    batch_shape=None,
    target_cols=None,
):
    """(e, c, targets, bias) as NumPy arrays of `dtype`.

    Uniform: E ~ N(0, 1), C ~ N(0, 1) / sqrt(D), so logits are about N(0, 1). Peaked (trained-like):
    each valid row's target logit is raised by log(V) + 3 above the rest (p_target ~ 0.9), not by
    30+ units, which would make the true gradient ~1e-14 and relative errors meaningless.
    About `ignore_frac` of the targets are ignore_index; `target_cols` limits targets to [0, target_cols).
    """
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((n, d))
    c = rng.standard_normal((v, d)) / np.sqrt(d)
    t = rng.integers(0, target_cols or v, n)
    t[rng.random(n) < ignore_frac] = ignore_index
    if peaked and n:
        ok = t != ignore_index
        ct = c[t[ok]]
        e[ok] += (np.log(v) + 3.0) * ct / np.maximum((ct * ct).sum(1, keepdims=True), 1e-12)
    b = 0.1 * rng.standard_normal(v) if bias else None
    np_dt = DTYPES.get(dtype, dtype)
    e, c = e.astype(np_dt), c.astype(np_dt)
    b = None if b is None else b.astype(np_dt)
    t = t.astype(idx_dtype)
    if batch_shape is not None:
        e = e.reshape(*batch_shape, d)
        t = t.reshape(batch_shape)
    return e, c, t, b


def make_zipf_problem(n, d, v, dtype="float32", *, s=1.0, noise=1.0, target_s=None, seed=0):
    """Long-tailed rows: logits = log Zipf(s) prior + N(0, noise^2), targets drawn from the prior
    (from Zipf(target_s) when given: a larger target_s draws targets from the head, which lowers the
    loss without changing the rows). As (e, c, targets): C[:, 0] = log prior, E[:, 0] = 1, the other
    D - 1 dimensions the noise. At s = 1, noise = 1, V = 32768, about 37% of each row's softmax mass
    lies in entries below 2**-12."""
    rng = np.random.default_rng(seed)
    logp = _log_zipf(v, s)
    c = np.empty((v, d))
    c[:, 0] = logp
    c[:, 1:] = rng.standard_normal((v, d - 1)) / np.sqrt(d - 1)
    e = np.empty((n, d))
    e[:, 0] = 1.0
    e[:, 1:] = noise * rng.standard_normal((n, d - 1))
    t = rng.choice(v, size=n, p=np.exp(_log_zipf(v, s if target_s is None else target_s)))
    np_dt = DTYPES.get(dtype, dtype)
    return e.astype(np_dt), c.astype(np_dt), t.astype(np.int64)


def _log_zipf(v, s):
    logp = -s * np.log(np.arange(1, v + 1))
    return logp - np.log(np.exp(logp).sum())


def make_lm_like_problem(n, d, v, dtype="float32", *, s=1.25, noise=1.5, peak=(10.0, 18.0), seed=0):
    """A trained LM's rows, as a proxy: a Zipf(s) unigram prior (the tail), N(0, noise^2) context
    noise, and one context token per row raised by a logit drawn uniformly from `peak` (the row's
    own prediction, anywhere in the vocabulary). Targets are drawn from each row's own softmax (a
    calibrated model: the loss is the rows' mean entropy). Same layout as make_zipf_problem; the
    peak is e . c_j = peak along c_j's last D - 1 dimensions. The defaults match, at V = 32768,
    what issue 14 measured on a trained LM (V = 65536): loss ~2.7 nats (measured 1.9-3.2), ~8% of
    each row's mass below 2**-12 (8-12%), ~135 entries above it (104-188)."""
    rng = np.random.default_rng(seed)
    e, c, _ = make_zipf_problem(n, d, v, np.float64, s=s, noise=noise, seed=seed)
    hot = rng.integers(0, v, n)
    ch = c[hot, 1:]
    e[:, 1:] += rng.uniform(*peak, n)[:, None] * ch / (ch * ch).sum(1, keepdims=True)
    z = e @ c.T
    p = np.exp(z - z.max(1, keepdims=True))
    cdf = np.cumsum(p, axis=1)
    t = (cdf < rng.random(n)[:, None] * cdf[:, -1:]).sum(1)
    np_dt = DTYPES.get(dtype, dtype)
    return e.astype(np_dt), c.astype(np_dt), np.minimum(t, v - 1).astype(np.int64)


def make_sharp_problem(n, d, v, dtype="float32", *, top=22.0, second=20.0, seed=0):
    """Sharply peaked rows, a trained model's confident tokens: the target logit ~top and two
    distractors ~second above a N(0, ~1.5^2) background, which holds ~2e-4 of the mass at V = 32768,
    D = 256 (so the certificate can pass: it needs the dropped mass below 2**-8 of ||g_i||_1)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((v, d)) / np.sqrt(d)
    t = rng.integers(0, v, n)
    hot = rng.integers(0, v, (n, 2))

    def unit_logit(j):  # e . c_j = 1 along c_j
        return c[j] / (c[j] ** 2).sum(1, keepdims=True)

    e = (
        0.3 * rng.standard_normal((n, d))
        + top * unit_logit(t)
        + second * (unit_logit(hot[:, 0]) + unit_logit(hot[:, 1]))
    )
    np_dt = DTYPES.get(dtype, dtype)
    return e.astype(np_dt), c.astype(np_dt), t.astype(np.int64)


# ------------------------------------------------------------------- dense reference
def _tile_mask(mask):
    r, cdim = mask.shape
    rp, cp = -(-r // 128) * 128, -(-cdim // 128) * 128
    pad = np.zeros((rp, cp), bool)
    pad[:r, :cdim] = mask
    tiles = pad.reshape(rp // 128, 128, cp // 128, 128).any(axis=(1, 3))
    return np.kron(tiles, np.ones((128, 128), bool)).astype(bool)[:r, :cdim]


def dense_reference(e, c, t, bias, o: CCEOptions, grad_loss=1.0, grad_lse=None):
    """Float64 dense ground truth (SMALL shapes only: it materializes N x V), always exact (o's
    filter options are not applied; see certificate_model).

    e (..., D), t (...) unshifted (shift is applied here). Returns a dict: loss (reduced), loss_tok,
    z_loss (reduced), lse, tgt (per token, batch-shaped), de (like e), dc, db (or None), g (N x V,
    dloss/dz), and the certificate model's inputs p (softmax), onehot, coef_p, coef_q (N,).
    """
    d = e.shape[-1]
    e64 = np.asarray(e).astype(np.float64).reshape(-1, d)
    c64 = np.asarray(c).astype(np.float64)
    z = e64 @ c64.T
    if bias is not None:
        z = z + np.asarray(bias).astype(np.float64)
    out = logits_reference(z, t, o, grad_loss, grad_lse)
    gy = out["g"]
    out.update(de=(gy @ c64).reshape(e.shape), dc=gy.T @ e64, db=gy.sum(0) if bias is not None else None)
    return out


def logits_reference(z, t, o: CCEOptions, grad_loss=1.0, grad_lse=None):
    """Float64 ground truth of the loss on logits z (N x V) against t (batch-shaped, N elements in
    all, unshifted): the dict of dense_reference without de, dc, db; g is dloss/dz."""
    batch = t.shape
    t = np.asarray(t).astype(np.int64)
    if o.shift:
        t = np.concatenate([t[..., 1:], np.full(batch[:-1] + (1,), o.ignore_index)], axis=-1)
    t = t.reshape(-1)
    z = np.asarray(z).astype(np.float64)
    n, v = z.shape
    y = o.softcap * np.tanh(z / o.softcap) if o.softcap else z
    m = y.max(1, keepdims=True) if n else np.zeros((0, 1))
    lse = (m + np.log(np.exp(y - m).sum(1, keepdims=True)))[:, 0]
    valid = t != o.ignore_index
    ls = o.label_smoothing
    yt = y[np.arange(n), np.clip(t, 0, v - 1)] if n else np.zeros(0)
    tgt = np.where(valid, (1 - ls) * yt + (ls / v * y.sum(1) if ls else 0.0), 0.0)  # 0 * -inf is NaN
    zl_tok = np.where(valid, o.z_loss * lse**2, 0.0)
    loss_tok = np.where(valid, lse - tgt, 0.0) + zl_tok
    cnt = max(valid.sum(), 1)
    if o.reduction == "mean":
        loss, zl = loss_tok.sum() / cnt, zl_tok.sum() / cnt
        g = valid * (float(grad_loss) / cnt)
    elif o.reduction == "sum":
        loss, zl = loss_tok.sum(), zl_tok.sum()
        g = valid * float(grad_loss)
    else:
        loss, zl = loss_tok.reshape(batch), zl_tok.reshape(batch)
        g = valid * np.broadcast_to(np.asarray(grad_loss, np.float64), batch).reshape(-1)
    cp = g * (1 + 2 * o.z_loss * lse)
    if grad_lse is not None:
        cp = cp + np.asarray(grad_lse, np.float64).reshape(-1)
    p = np.exp(y - lse[:, None])
    onehot = np.zeros_like(y)
    onehot[np.arange(n)[valid], t[valid]] = 1.0
    q = (1 - ls) * onehot + ls / v
    gy = cp[:, None] * p - g[:, None] * q
    if o.softcap:
        gy = gy * (1 - (y / o.softcap) ** 2)
    return {
        "loss": loss,
        "loss_tok": loss_tok.reshape(batch),
        "z_loss": zl,
        "lse": lse.reshape(batch),
        "tgt": tgt.reshape(batch),
        "g": gy,
        "p": p,
        "onehot": onehot,
        "coef_p": cp,
        "coef_q": g,
    }


def certificate_model(ref, o: CCEOptions, v: int):
    """The certified filter's rule in float64, written apart from the NumPy backend's (docs/design.md,
    "Certified filtering"), on a dense_reference result. Returns a dict of (N,) arrays: certified,
    bound (L1 mass of the dropped gradient, at most), lower (the kept L1 mass), norm1 (||g_i||_1),
    and g_filtered (N x V)."""
    p, onehot, cp, cq, g = ref["p"], ref["onehot"] > 0, ref["coef_p"], ref["coef_q"], ref["g"]
    eps, tol = o.resolved_filter_eps(), o.resolved_filter_tol()
    keep = (p >= eps) | onehot
    ls = o.label_smoothing
    analytic = ls > 0 and o.softcap is None  # the smoothing constant stays on dropped columns
    dropped = np.where(keep, 0.0, p).sum(1)
    bound = np.abs(cp) * dropped
    if ls > 0 and not analytic:
        bound = bound + np.abs(cq) * ls * (v - keep.sum(1)) / v
    lower = np.where(keep, np.abs(g), 0.0).sum(1)
    certified = (bound == 0) | (bound <= tol * lower)
    fill = (-cq * ls / v)[:, None] if analytic else 0.0
    g_filtered = np.where(keep | ~certified[:, None], g, fill)
    return {
        "certified": certified,
        "bound": bound,
        "lower": lower,
        "norm1": np.abs(g).sum(1),
        "g_filtered": g_filtered,
    }


# ------------------------------------------------------------------------ comparison
def to_f64(x):
    try:
        import cupy

        if isinstance(x, cupy.ndarray):
            x = cupy.asnumpy(x)
    except ImportError:
        pass
    return np.asarray(x).astype(np.float64)


def rel_err(ours, ref) -> float:
    a, b = to_f64(ours), to_f64(ref)
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (den if den > 0 else 1.0))


def assert_rel_close(ours, ref, tol, name=""):
    """Relative-norm check; on failure report how many elements mismatch, the worst index, both values."""
    a, b = to_f64(ours), to_f64(ref)
    assert a.shape == b.shape, f"{name}: shape {a.shape} != reference {b.shape}"
    err = rel_err(a, b)
    if not (err <= tol):
        diff = np.abs(a - b)
        diff = np.where(np.isnan(diff), np.inf, diff)
        scale = max(np.abs(b).max() if b.size else 0.0, 1e-30)
        bad = int((diff > tol * scale).sum())
        w = np.unravel_index(int(np.argmax(diff)), a.shape) if a.size else ()
        raise AssertionError(
            f"{name}: rel-norm err {err:.3e} > {tol:.1e}; {bad}/{a.size} elements off by > tol*max|ref|; "
            f"worst at {w}: ours {a[w] if a.size else None!r} vs ref {b[w] if b.size else None!r}"
        )


# ------------------------------------------------------------ launchers on NumPy, for JAX on CPU
class NumpyBridge:
    """Dense NumPy stand-ins for the CuPy launchers, with their contract (docs/CONTRACT.md): they let
    the JAX buffer_callback path run on a CPU (jax_bindings.gpu.BRIDGE)."""

    def __init__(self):
        self.calls = []

    def context(self, ctx, any_buffer):
        import contextlib

        return contextlib.nullcontext(np.asarray)

    @staticmethod
    def _logits(e, c, bias, opts):
        z = e.astype(np.float64) @ c.astype(np.float64).T
        if bias is not None:
            z = z + bias
        return opts.softcap * np.tanh(z / opts.softcap) if opts.softcap else z

    def launch_forward(self, e, c, targets, bias, opts, lse_out, tgt_out, scratch=None, bad_target=None, tune=True):
        n, d = e.shape
        v = c.shape[0]
        assert scratch.nbytes >= plan.forward_scratch_nbytes(n, v, d, e.dtype)
        assert bad_target.shape == (1,) and bad_target[0] == 0
        self.calls.append("forward")
        y = self._logits(e, c, bias, opts)
        lse = np.log(np.exp(y - y.max(1, keepdims=True)).sum(1)) + y.max(1)
        ok = (targets >= 0) & (targets < v)
        ls = opts.label_smoothing
        tgt = (1 - ls) * y[np.arange(n), np.clip(targets, 0, v - 1)] + ls / v * y.sum(1)
        tgt = np.where(targets == opts.ignore_index, 0.0, np.where(ok, tgt, np.nan))
        lse_out[...] = lse
        tgt_out[...] = tgt

    def launch_backward(
        self,
        e,
        c,
        targets,
        bias,
        opts,
        lse,
        coef_p,
        coef_q,
        de_out,
        dc_out,
        dbias_out=None,
        scratch=None,
        use_cublas=True,
        host_sync=True,
    ):
        assert not host_sync, "JAX callbacks must not synchronize the host"
        n, d = e.shape
        v = c.shape[0]
        assert scratch.nbytes >= plan.backward_scratch_nbytes(n, v, d, e.dtype, opts)
        self.calls.append("backward")
        y = self._logits(e, c, bias, opts)
        p = np.exp(y - lse[:, None])
        onehot = (np.arange(v)[None, :] == targets[:, None]).astype(np.float64)
        ls = opts.label_smoothing
        dy = coef_p[:, None] * p - coef_q[:, None] * ((1 - ls) * onehot + ls / v)
        if opts.softcap:
            dy = dy * (1 - (y / opts.softcap) ** 2)
        de_out[...] = dy @ c
        dc_out[...] = dy.T @ e
        if dbias_out is not None:
            dbias_out[...] = dy.sum(0)

    def launch_fused_budgeted(
        self,
        e,
        c,
        targets,
        bias,
        opts,
        budget_plan,
        row_grad,
        lse_out,
        tgt_out,
        de_out,
        dc_out,
        dbias_out,
        scratch,
        bad_target=None,
        tune=True,
    ):
        assert not tune, "JAX callbacks must not tune (it synchronizes)"
        assert scratch.nbytes >= budget_plan.nbytes
        n_calls = len(self.calls)
        fwd_scratch = np.zeros(plan.forward_scratch_nbytes(*e.shape[:1], c.shape[0], e.shape[1], e.dtype), np.uint8)
        self.launch_forward(e, c, targets, bias, opts, lse_out, tgt_out, fwd_scratch, bad_target, tune)
        # The kernel's coefficients: coef_q = row_grad, coef_p = row_grad * (1 + 2 z_loss lse).
        coef_p = row_grad * (1.0 + z_loss_dlse(opts.z_loss, lse_out))
        bwd_scratch = np.zeros(
            plan.backward_scratch_nbytes(*e.shape[:1], c.shape[0], e.shape[1], e.dtype, opts), np.uint8
        )
        self.launch_backward(
            e,
            c,
            targets,
            bias,
            opts,
            lse_out,
            coef_p,
            row_grad,
            de_out,
            dc_out,
            dbias_out,
            bwd_scratch,
            host_sync=False,
        )
        del self.calls[n_calls:]
        self.calls.append("fused")
