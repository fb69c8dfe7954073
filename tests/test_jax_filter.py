"""JAX's certified filter with the candidate lists collected by the differentiated forward
(jax_bindings.gpu.forward_with_lists / backward_from_lists; cce_cupy.cuda.filtered).

CPU: the buffer_callback plumbing through NumPy stand-ins of the two launchers, which keep the
LISTS contract (lce_hopper.cu) and the prune + certificate rules (lce_sparse.cu) densely: which
path runs, the residuals' shapes and dtypes and that they come back unchanged, the path choice
from the previous call's counts (first call exact, gated after a mostly certified call, exact
again after an uncertified one), and the gradients against float64.
GPU (marker gpu, Hopper only): jit(grad) with filter_eps="auto" over several calls, both paths:
the certificate holds row by row against float64. Run on a GPU: pytest -m gpu -q -rs
tests/test_jax_filter.py, with XLA_PYTHON_CLIENT_PREALLOCATE=false.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    DTYPES,
    NumpyBridge,
    assert_rel_close,
    certificate_model,
    dense_reference,
    make_problem,
    make_sharp_problem,
    make_zipf_problem,
    to_f64,
)

from cce_cupy.cuda import filtered as cuda_filtered
from cce_cupy.cuda import plan
from cce_cupy.cuda.sources import HOPPER_TILE_N
from cce_cupy.options import CCEOptions, analytic_smoothing, certificate_margin, make_options
from jax_bindings import _dispatch, gpu, linear_cross_entropy
from jax_bindings import loss as jax_loss

pytestmark = pytest.mark.usefixtures("jax_x64")


# ------------------------------------------------------------------ NumPy stand-ins (CPU)
class _NoSync(np.ndarray):
    """A device buffer stand-in: reading it back to the host (a sync on a GPU) fails."""

    def get(self, *args, **kwargs):
        raise AssertionError("a callback read a device buffer back to the host (.get(): a host sync)")


class ListsBridge(NumpyBridge):
    """NumpyBridge plus stand-ins of the lists launchers (cce_cupy.cuda.filtered), with their
    contract: the forward's lists as lce_forward_partials_sm90 (STORE LISTS) writes them, the
    backward's counts as sparse_prune_lists + sparse_certify_rows decide them, its gradients exact
    (as both of its paths are, within the certificate). `paths` records the path each backward
    was told to take; `land_reports=False` holds the counts' copies back (a GPU behind the host)
    until land()."""

    def __init__(self):
        super().__init__()
        self.paths: list[str] = []
        self.row_grads: list[np.ndarray] = []
        self.reports: list[tuple[int, int]] = []
        self.land_reports = True
        self._pending: list = []
        self._kept = collections.deque()  # the forward's lists, to compare with the residuals

    def context(self, ctx, any_buffer):
        import contextlib

        return contextlib.nullcontext(lambda b: np.asarray(b).view(_NoSync))

    @staticmethod
    def pinned_counts():
        return np.zeros(2, np.int32)

    def land(self):
        for report, values in self._pending:
            report[:] = values
        self._pending.clear()

    def launch_lists_forward(
        self, e, c, targets, bias, opts, row_grad, lse, tgt, lists, scratch, bad_target=None, tune=True, mark=None
    ):
        assert not tune, "JAX callbacks must not tune (it synchronizes)"
        n, d = e.shape
        v = c.shape[0]
        slots = plan.sparse_slots(n, d, e.dtype, opts)
        splits, per_split = plan.forward_splits(n, v, HOPPER_TILE_N)
        assert lists.entries.shape == (n, slots) and lists.entries.dtype == np.int64
        assert lists.row_count.shape == (n,) and lists.row_count.dtype == np.int32
        assert lists.other_mass.shape == (splits, n) and lists.other_mass.dtype == np.float32
        assert row_grad.shape == (n,) and row_grad.dtype == np.float32
        assert scratch.nbytes >= cuda_filtered.lists_forward_scratch_nbytes(n, v, d, e.dtype)
        self.launch_forward(e, c, targets, bias, opts, lse, tgt, scratch, bad_target, tune)
        self.calls[-1] = "lists_forward"
        self.row_grads.append(np.array(row_grad))
        y = self._logits(e, c, bias, opts)
        ok = (row_grad != 0) & (targets >= 0) & (targets < v)
        tau = np.where(ok, y[np.arange(n), np.clip(targets, 0, v - 1)], np.inf)
        tau = tau + math.log(opts.resolved_filter_eps()) - cuda_filtered.THRESHOLD_MARGIN
        part_max = cuda_filtered.partial_max(scratch, n, v)
        pairs = lists.entries.view(np.int32).reshape(n, slots, 2)
        for s in range(splits):
            ys = y[:, s * per_split : (s + 1) * per_split]
            part_max[s] = ys.max(1)
            lists.other_mass[s] = np.where(ys < tau[:, None], np.exp(ys - ys.max(1, keepdims=True)), 0.0).sum(1)
        for i in range(n):
            cols = np.flatnonzero(y[i] >= tau[i])
            lists.row_count[i] = cols.size
            k = min(cols.size, slots)
            pairs[i, :k, 0] = cols[:k]
            pairs[i, :k, 1] = y[i, cols[:k]].astype(np.float32).view(np.int32)
        self._kept.append({"entries": lists.entries.copy(), "row_count": lists.row_count.copy(),
                           "other_mass": lists.other_mass.copy(), "part_max": part_max.copy()})  # fmt: skip

    def launch_backward_from_lists(
        self, e, c, targets, bias, opts, lse, coef_p, coef_q, active, lists, part_max, de, dc, dbias, scratch, gated,
        report,
    ):  # fmt: skip
        n, d = e.shape
        v = c.shape[0]
        assert scratch.nbytes >= cuda_filtered.backward_from_lists_scratch_nbytes(n, v, d, e.dtype, opts)
        kept = self._kept.popleft()
        for name, got in (*zip(("entries", "row_count", "other_mass"), lists), ("part_max", part_max)):
            assert got.shape == kept[name].shape and got.dtype == kept[name].dtype, name
            assert np.array_equal(got, kept[name]), f"residual {name} differs from what the forward wrote"
        assert active.shape == (1,) and active.dtype == np.int32
        assert active[0] == np.count_nonzero((coef_p != 0) | (coef_q != 0))
        self.paths.append("gated" if gated else "exact")
        self.launch_backward(e, c, targets, bias, opts, lse, coef_p, coef_q, de, dc, dbias, scratch, host_sync=False)
        self.calls[-1] = "lists_backward"
        values = (self._uncertified(v, opts, targets, lse, coef_p, coef_q, lists, part_max), int(active[0]))
        self.reports.append(values)
        self._pending.append((report, values))
        if self.land_reports:
            self.land()

    @staticmethod
    def _uncertified(v, opts, targets, lse, coef_p, coef_q, lists, part_max) -> int:
        """Rows that sparse_prune_lists + sparse_certify_rows leave uncertified, from the lists."""
        n, slots = lists.entries.shape
        pairs = lists.entries.view(np.int32).reshape(n, slots, 2)
        log_eps, tol = math.log(opts.resolved_filter_eps()), opts.resolved_filter_tol()
        ls, softcap = opts.label_smoothing, opts.softcap
        smooth_entry = ls / v if analytic_smoothing(opts) else 0.0
        smooth_bound = ls if ls > 0 and not analytic_smoothing(opts) else 0.0
        uncertified = 0
        for i in range(n):
            cp, cq, count, lse_i = float(coef_p[i]), float(coef_q[i]), int(lists.row_count[i]), float(lse[i])
            if cp == 0 and cq == 0:
                continue
            if not 1 <= count <= slots:
                uncertified += 1
                continue
            cols, y = pairs[i, :count, 0], pairs[i, :count, 1].view(np.float32).astype(np.float64)
            keep = (y >= lse_i + log_eps) | (cols == targets[i])
            dropped = (lists.other_mass[:, i] * np.exp(part_max[:, i] - lse_i)).sum() + np.exp(y[~keep] - lse_i).sum()
            g = cp * np.exp(y[keep] - lse_i) - cq * (
                np.where(cols[keep] == targets[i], 1 - ls, 0.0) + (ls / v if softcap else 0.0)
            )
            if softcap:
                g = g * (1 - (y[keep] / softcap) ** 2)
            lower = np.abs(g - smooth_entry * cq).sum()
            bound = abs(cp) * dropped + smooth_bound * abs(cq) * (v - keep.sum()) / v
            if not (keep.sum() >= 1 and (bound == 0 or bound * (1 + certificate_margin(v)) <= tol * lower)):
                uncertified += 1
        return uncertified


@pytest.fixture
def fresh_history(monkeypatch):
    """A history without any earlier test's calls (it is kept per options, device and shape)."""
    monkeypatch.setattr(gpu, "_CERTIFIED_HISTORY", gpu._CertifiedHistory())


@pytest.fixture
def lists_bridge(monkeypatch, fresh_history):
    """The callback path on CPU through ListsBridge, as if every local GPU were a Hopper."""
    bridge = ListsBridge()
    monkeypatch.setattr(_dispatch, "CPU_PATH", "callback")
    monkeypatch.setattr(gpu, "BRIDGE", bridge)
    monkeypatch.setattr(gpu, "_hopper_everywhere", lambda: True)
    return bridge


BF16 = DTYPES["bfloat16"]


def _sharp(n=48, d=128, v=1024, seed=0):
    """Sharp rows (most certify at filter_eps="auto"), ~20% ignored, bf16."""
    e, c, t = make_sharp_problem(n, d, v, "bfloat16", seed=seed)
    t[np.random.default_rng(seed + 1).random(n) < 0.2] = -100
    return e, c, t


def _flat(n=48, d=128, v=1024, seed=0):
    """make_problem's uniform rows (none certify), bf16."""
    return make_problem(n, d, v, "bfloat16", seed=seed)[:3]


def _grad_fn(**kw):
    """jit(value_and_grad) in e and c of the loss, filter_eps="auto" unless given; each call
    returns once it has run (the callbacks too: JAX dispatches asynchronously)."""
    kw.setdefault("filter_eps", "auto")
    f = jax.jit(jax.value_and_grad(lambda e_, c_, t_: linear_cross_entropy(e_, c_, t_, **kw), argnums=(0, 1)))
    return lambda *args: jax.block_until_ready(f(*args))


def _check_exact(e, c, t, loss, grads, o=CCEOptions(), tol=1e-2):
    """Loss (fp32) and 16-bit gradients against float64 on the same rounded inputs."""
    ref = dense_reference(e, c, t, None, o)
    assert_rel_close(loss, ref["loss"], 1e-5, "loss")
    assert_rel_close(grads[0], ref["de"], tol, "de")
    assert_rel_close(grads[1], ref["dc"], tol, "dc")


def test_differentiated_forward_collects_lists(lists_bridge):
    """Differentiated with filter_eps: the lists forward and the lists backward, one each; the
    thresholds' row_grad is the valid mask; gradients as float64's (the stand-ins are exact)."""
    e, c, t = _sharp()
    loss, grads = _grad_fn()(e, c, t)
    assert lists_bridge.calls == ["lists_forward", "lists_backward"]
    np.testing.assert_array_equal(lists_bridge.row_grads[0], (t != -100).astype(np.float32))
    _check_exact(e, c, t, loss, grads)


def test_residuals_shapes_and_dtypes(lists_bridge):
    """_lce_fwd's residuals: the lean ones and the lists, n x slots x 8 bytes of entries + small."""
    n, d, v = 40, 64, 3000
    e, c, t = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _flat(n, d, v))
    o = make_options(filter_eps="auto")
    cfg = jax_loss._Config(o, "kernel", "sequential", False, None, True)
    res = jax.eval_shape(lambda e_, c_, t_: jax_loss._lce_fwd(e_, c_, t_, None, cfg)[1], e, c, t)
    assert isinstance(res, jax_loss._KeptLists)
    slots = plan.sparse_slots(n, d, BF16, o)
    splits = plan.forward_splits(n, v, HOPPER_TILE_N)[0]
    assert slots > 0 and splits > 1
    assert (res.lse.shape, res.lse.dtype) == ((n,), jnp.float32)
    entries, row_count, other_mass, part_max = res.lists
    assert (entries.shape, entries.dtype) == ((n, slots, 2), jnp.int32)
    assert (row_count.shape, row_count.dtype) == ((n,), jnp.int32)
    for x in (other_mass, part_max):
        assert (x.shape, x.dtype) == ((splits, n), jnp.float32)
    assert entries.size * 4 == n * slots * 8


def test_path_follows_previous_call(lists_bridge):
    """First call exact; after a mostly certified call gated; after an uncertified one exact again:
    each call decides from the previous call's counts, never its own. The stand-in's counts are
    the float64 model's (certificate_model), and every call's gradients are right."""
    f = _grad_fn()
    sharp, flat = _sharp(seed=2), _flat(seed=3)
    o = CCEOptions(filter_eps="auto")
    expected = {}
    for name, (e, c, t) in (("sharp", sharp), ("flat", flat)):
        model = certificate_model(dense_reference(e, c, t, None, o), o, c.shape[0])
        active = t != -100
        expected[name] = (int((~model["certified"] & active).sum()), int(active.sum()))
    assert expected["sharp"][0] < 0.1 * expected["sharp"][1] and expected["flat"][0] == expected["flat"][1]
    order = ["sharp", "sharp", "flat", "flat", "sharp", "sharp"]
    for name in order:
        e, c, t = sharp if name == "sharp" else flat
        loss, grads = f(e, c, t)
        _check_exact(e, c, t, loss, grads)
    assert lists_bridge.paths == ["exact", "gated", "gated", "exact", "exact", "gated"]
    assert lists_bridge.reports == [expected[name] for name in order]


def test_path_choice_needs_no_landed_copy(lists_bridge):
    """The counts' copies have not landed (the host ahead of the GPU): the next calls read the
    start value, take the exact path, and are right; once landed, the latest call's counts decide."""
    lists_bridge.land_reports = False
    f = _grad_fn()
    e, c, t = _sharp(seed=4)
    for _ in range(2):
        loss, grads = f(e, c, t)
        _check_exact(e, c, t, loss, grads)
    assert lists_bridge.paths == ["exact", "exact"]
    lists_bridge.land()
    f(e, c, t)
    assert lists_bridge.paths == ["exact", "exact", "gated"]


@pytest.mark.parametrize(
    "start,uncertified,active,gated",
    [
        ("no call", 0, 0, False),
        ("all certified", 0, 10, True),
        ("half certified", 5, 10, True),
        ("below half", 6, 10, False),
        ("no gradient rows", 0, 0, True),
        ("torn pair", 11, 10, False),
    ],
)
def test_history_rule(start, uncertified, active, gated):
    counts = np.array([uncertified, active], np.int32)
    if start == "no call":
        counts[1] = gpu._CertifiedHistory.NO_CALL
    assert gpu._CertifiedHistory.gated(counts) == gated


def test_history_per_device_and_shape(lists_bridge):
    """Two shapes keep two histories: the second shape's first call is exact whatever the first's were."""
    f = _grad_fn()
    e, c, t = _sharp(seed=5)
    f(e, c, t)
    f(e, c, t)
    e2, c2, t2 = _sharp(n=32, seed=6)
    f(e2, c2, t2)
    assert lists_bridge.paths == ["exact", "gated", "exact"]


@pytest.mark.parametrize("case", ["grad_lse", "z_loss_none", "smoothing_softcap"])
def test_options_through_lists(lists_bridge, case):
    """Cotangents of lse (an ignored row with a gradient: no list, so uncertified and exact),
    z_loss with per-row loss cotangents, smoothing with softcap: gradients as float64's, counts as
    the float64 model's."""
    kw = {
        "grad_lse": {"return_lse": True},
        "z_loss_none": {"z_loss": 1e-3, "reduction": "none"},
        "smoothing_softcap": {"label_smoothing": 0.1, "softcap": 30.0},
    }[case]
    o = make_options(filter_eps="auto", **kw)
    e, c, t = _sharp(seed=7)
    rng = np.random.default_rng(8)
    n = e.shape[0]
    g_loss = rng.uniform(0.5, 2.0, n) if o.reduction == "none" else np.float64(0.7)
    g_lse = rng.standard_normal(n) * 0.1 if o.return_lse else None

    def f(e_, c_):
        return linear_cross_entropy(e_, c_, jnp.asarray(t), options=o)

    out, pull = jax.vjp(f, jnp.asarray(e), jnp.asarray(c))
    cts = (
        (jnp.asarray(g_loss, jnp.float32), jnp.asarray(g_lse, jnp.float32))
        if g_lse is not None
        else (jnp.asarray(g_loss, jnp.float32))
    )
    de, dc = jax.block_until_ready(pull(cts))
    assert lists_bridge.calls == ["lists_forward", "lists_backward"]
    ref = dense_reference(e, c, t, None, o.replace(filter_eps=None), g_loss, g_lse)
    assert_rel_close(de, ref["de"], 1e-2, "de")
    assert_rel_close(dc, ref["dc"], 1e-2, "dc")
    model = certificate_model(ref, o, c.shape[0])
    active = (ref["coef_p"] != 0) | (ref["coef_q"] != 0)
    # Ignored rows have no list (their threshold is +inf): one with a gradient is not certified.
    ignored = t == -100
    uncertified, reported_active = lists_bridge.reports[0]
    assert reported_active == active.sum()
    assert uncertified == ((~model["certified"] | ignored) & active).sum()
    if case == "grad_lse":
        assert (ignored & active).sum() >= 5 and uncertified < 0.5 * active.sum()


@pytest.mark.parametrize("vmap_method", ["sequential", "expand_dims"])
def test_vmap_through_lists(lists_bridge, vmap_method):
    """vmap of the differentiated loss: each batch element's lists reach its own backward."""
    es, cs, ts = zip(*(_sharp(n=24, seed=s) for s in (10, 11)))
    c = cs[0]
    e, t = np.stack(es), np.stack(ts)

    def f(e_, t_):
        return linear_cross_entropy(e_, jnp.asarray(c), t_, filter_eps="auto", vmap_method=vmap_method)

    loss, de = jax.block_until_ready(jax.jit(jax.vmap(jax.value_and_grad(f)))(jnp.asarray(e), jnp.asarray(t)))
    assert lists_bridge.calls.count("lists_forward") == lists_bridge.calls.count("lists_backward") == 2
    for i in range(2):
        ref = dense_reference(e[i], c, t[i], None, CCEOptions())
        assert_rel_close(loss[i], ref["loss"], 1e-5, "loss")
        assert_rel_close(de[i], ref["de"], 1e-2, "de")


@pytest.mark.parametrize(
    "case", ["primal", "no_filter", "float32", "deterministic", "cmdbuf", "reference", "d_not_multiple_of_8"]
)
def test_other_cases_keep_the_lean_path(lists_bridge, case):
    """Only the differentiated filtered call on 16-bit inputs with list slots, not captured, with
    the kernel backward, takes the lists; the primal and every other case keep the lean path."""
    e, c, t = _sharp(d=124 if case == "d_not_multiple_of_8" else 128)
    kw = {"filter_eps": None if case == "no_filter" else "auto"}
    if case == "float32":
        e, c = e.astype(np.float32), c.astype(np.float32)
    kw.update(
        {"deterministic": {"deterministic": True}, "cmdbuf": {"command_buffer_compatible": True},
         "reference": {"backward_impl": "reference"}}.get(case, {})
    )  # fmt: skip
    if case == "primal":
        jax.block_until_ready(jax.jit(lambda e_, c_: linear_cross_entropy(e_, c_, jnp.asarray(t), **kw))(e, c))
        assert lists_bridge.calls == ["forward"]
        return
    _grad_fn(**kw)(e, c, t)
    assert lists_bridge.calls == (["forward"] if case == "reference" else ["forward", "backward"])


def test_reference_branch_of_the_lists_path(monkeypatch):
    """Traced for the lists (every local GPU a Hopper) but run on the CPU: platform_dependent's
    pure-JAX branches (empty lists, the exact backward) give float64's gradients."""
    monkeypatch.setattr(gpu, "_hopper_everywhere", lambda: True)
    e, c, t = _sharp()
    o = make_options(filter_eps="auto")
    cfg = jax_loss._Config(o, "kernel", "sequential", False, None, True)
    res = jax.eval_shape(lambda e_, c_: jax_loss._lce_fwd(e_, c_, jnp.asarray(t), None, cfg)[1], e, c)
    assert isinstance(res, jax_loss._KeptLists)
    loss, grads = _grad_fn()(e, c, t)
    _check_exact(e, c, t, loss, grads)


def test_not_hopper_keeps_the_lean_path(lists_bridge, monkeypatch):
    monkeypatch.setattr(gpu, "_hopper_everywhere", lambda: False)
    e, c, t = _sharp()
    _grad_fn()(e, c, t)
    assert lists_bridge.calls == ["forward", "backward"]


# ---------------------------------------------------------------------------------- GPU
def _jax_on_hopper() -> bool:
    try:
        if jax.devices()[0].platform != "gpu":
            return False
        import cupy

        from cce_cupy.cuda import device

        return cupy.cuda.Device().compute_capability == "90" and device.KERNELS == "auto"
    except Exception:
        return False


hopper = pytest.mark.skipif(not _jax_on_hopper(), reason="JAX's default device is not a Hopper GPU")
OUT_ROUNDING = 2.0**-8  # two roundings of a 16-bit output element (2**-9 each), relative


class _PathSpy:
    """Counts the launches of the JAX lists path on the GPU and records each backward's path."""

    def __init__(self, monkeypatch):
        self.calls, self.paths = [], []
        real_fwd, real_bwd, real_plain = (
            gpu.BRIDGE.launch_lists_forward,
            gpu.BRIDGE.launch_backward_from_lists,
            gpu.BRIDGE.launch_backward,
        )

        def fwd(*a, **k):
            self.calls.append("lists_forward")
            return real_fwd(*a, **k)

        def bwd(*a, **k):
            self.calls.append("lists_backward")
            self.paths.append("gated" if k["gated"] else "exact")
            return real_bwd(*a, **k)

        def plain(*a, **k):
            self.calls.append("backward")
            return real_plain(*a, **k)

        monkeypatch.setattr(gpu.BRIDGE, "launch_lists_forward", fwd)
        monkeypatch.setattr(gpu.BRIDGE, "launch_backward_from_lists", bwd)
        monkeypatch.setattr(gpu.BRIDGE, "launch_backward", plain)


def _vjp_on_gpu(e, c, t, o: CCEOptions, g_loss=1.0, g_lse=None):
    """jit(vjp) of the loss on the GPU with cotangents g_loss (and g_lse with return_lse):
    (loss, lse or None, de, dc) as float64 NumPy, after the call has finished."""

    @jax.jit
    def step(e_, c_, g, gl):
        out, pull = jax.vjp(lambda a, b: linear_cross_entropy(a, b, jnp.asarray(t), options=o), e_, c_)
        return out, pull((g, gl) if o.return_lse else g)

    gl = None if g_lse is None else jnp.asarray(g_lse, jnp.float32)
    out, (de, dc) = jax.block_until_ready(step(jnp.asarray(e), jnp.asarray(c), jnp.asarray(g_loss, jnp.float32), gl))
    loss, lse = out if o.return_lse else (out, None)
    return to_f64(loss), (None if lse is None else to_f64(lse)), to_f64(de), to_f64(dc)


def _check_certificate(e, c, t, o: CCEOptions, filt, exact, g_loss=1.0, g_lse=None):
    """The certificate row by row (dE) and summed over rows (dC) against float64: a filtered row's
    error exceeds the exact call's by at most tol ||g_i||_1 max_j ||C_j|| (test_cuda_filter's rule).
    Returns the float64 model."""
    plain = o.replace(filter_eps=None, filter_tol=None)
    ref = dense_reference(e, c, t, None, plain, g_loss, g_lse)
    model = certificate_model(ref, o, c.shape[0])
    tol = o.resolved_filter_tol() * (1 + certificate_margin(c.shape[0]))
    e64, c64 = to_f64(e), to_f64(c)
    norm1 = model["norm1"]

    def err_rows(x):
        return np.linalg.norm(x - ref["de"], axis=1)

    limit = err_rows(exact[2]) + tol * norm1 * np.linalg.norm(c64, axis=1).max()
    limit += OUT_ROUNDING * np.linalg.norm(ref["de"], axis=1)
    over = np.flatnonzero(~(err_rows(filt[2]) <= limit + 1e-30))
    assert over.size == 0, (
        f"dE: {over.size} rows over the certificate; row {over[0]}: err {err_rows(filt[2])[over[0]]:.3e} > "
        f"{limit[over[0]]:.3e} (model certified {model['certified'][over[0]]})"
    )
    dc_limit = (
        np.linalg.norm(exact[3] - ref["dc"])
        + tol * np.sum(norm1 * np.linalg.norm(e64, axis=1))
        + OUT_ROUNDING * np.linalg.norm(ref["dc"])
    )
    dc_err = np.linalg.norm(filt[3] - ref["dc"])
    assert dc_err <= dc_limit, f"dC: err {dc_err:.3e} > {dc_limit:.3e}"
    # The lists forward's lse is the plain forward's bit for bit (lce_hopper.cu, raise_max), so the
    # filter leaves the loss as the exact call's. Against float64 the loss carries fp32's rounding
    # of lse - y_t: ~1.2e-5 relative on sharp rows (lse ~ 22, loss ~ 0.54), within 16-bit inputs'
    # tolerance, not fp32's.
    assert filt[0].tobytes() == exact[0].tobytes(), f"loss {filt[0]!r} differs from the exact call's {exact[0]!r}"
    assert_rel_close(filt[0], ref["loss"], 1e-2, "loss")
    return model


def _gpu_data(kind: str, seed: int = 0):
    """Sharp or Zipf rows of one shape (N = 512, D = 256, V = 32768: one history), bf16."""
    if kind == "sharp":
        return make_sharp_problem(512, 256, 32768, "bfloat16", seed=seed)
    return make_zipf_problem(512, 256, 32768, "bfloat16", seed=seed)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("data", ["sharp", "zipf"])
def test_gpu_certificate_over_calls(data, monkeypatch, fresh_history):
    """jit(grad) with filter_eps="auto", three calls on the same data: sharp rows (most certify)
    go exact, gated, gated; Zipf rows (none certify) exact every time. Each call's gradients meet
    the certificate row by row against float64."""
    e, c, t = _gpu_data(data)
    o = CCEOptions(filter_eps="auto")
    exact = _vjp_on_gpu(e, c, t, CCEOptions())
    spy = _PathSpy(monkeypatch)
    for _ in range(3):
        model = _check_certificate(e, c, t, o, _vjp_on_gpu(e, c, t, o), exact)
    assert spy.calls == ["lists_forward", "lists_backward"] * 3
    if data == "sharp":
        assert model["certified"].mean() > 0.9
        assert spy.paths == ["exact", "gated", "gated"]
    else:
        assert not model["certified"].any()
        assert spy.paths == ["exact", "exact", "exact"]


@pytest.mark.gpu
@hopper
def test_gpu_stale_choice_is_still_certified(monkeypatch, fresh_history):
    """The path each call takes comes from the previous call's data: sharp, then Zipf (gated on
    uncertified rows: the gated exact pass does the work), then sharp (exact on certifiable rows).
    Each call meets the certificate, and the Zipf call's gradients are the exact call's within
    the 16-bit tolerance."""
    o = CCEOptions(filter_eps="auto")
    spy = _PathSpy(monkeypatch)
    for i, data in enumerate(["sharp", "sharp", "zipf", "sharp"]):
        e, c, t = _gpu_data(data, seed=i)
        exact = _vjp_on_gpu(e, c, t, CCEOptions())
        filt = _vjp_on_gpu(e, c, t, o)
        _check_certificate(e, c, t, o, filt, exact)
        if data == "zipf":
            assert_rel_close(filt[2], exact[2], 1e-2, "de (zipf, gated)")
            assert_rel_close(filt[3], exact[3], 1e-2, "dc (zipf, gated)")
    assert spy.paths == ["exact", "gated", "gated", "exact"]


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("data", ["zipf", "flat"])
def test_gpu_uncertified_equals_exact(data, monkeypatch, fresh_history):
    """Where no row certifies, every call's gradients are the exact JAX call's within the 16-bit
    tolerance (the first exact with cuBLAS, then exact again)."""
    if data == "zipf":
        e, c, t = _gpu_data("zipf", seed=3)
    else:
        e, c, t = make_problem(512, 256, 8192, "bfloat16", seed=3)[:3]
    o = CCEOptions(filter_eps="auto")
    exact = _vjp_on_gpu(e, c, t, CCEOptions())
    spy = _PathSpy(monkeypatch)
    for _ in range(2):
        filt = _vjp_on_gpu(e, c, t, o)
        for k, name in ((0, "loss"), (2, "de"), (3, "dc")):
            assert_rel_close(filt[k], exact[k], 1e-2 if k else 1e-5, name)
    assert spy.paths == ["exact", "exact"]


@pytest.mark.gpu
@hopper
def test_gpu_lse_and_z_loss_with_filter(monkeypatch, fresh_history):
    """return_lse with a cotangent on every row (ignored rows too: no list, so the exact path takes
    them) and z_loss, with the filter: lse and loss as float64's, the certificate holds, on the
    first and later calls."""
    e, c, t = make_sharp_problem(512, 256, 32768, "bfloat16", seed=9)
    t[np.random.default_rng(9).random(t.size) < 0.15] = -100
    o = CCEOptions(filter_eps="auto", return_lse=True, z_loss=1e-4)
    g_lse = np.random.default_rng(10).standard_normal(t.size) * 0.1
    exact = _vjp_on_gpu(e, c, t, o.replace(filter_eps=None), 0.7, g_lse)
    spy = _PathSpy(monkeypatch)
    ref = dense_reference(e, c, t, None, o.replace(filter_eps=None), 0.7, g_lse)
    for _ in range(3):
        filt = _vjp_on_gpu(e, c, t, o, 0.7, g_lse)
        assert_rel_close(filt[1], ref["lse"], 1e-5, "lse")
        model = _check_certificate(e, c, t, o, filt, exact, 0.7, g_lse)
    # Every row has a gradient; the ignored ones have no list, so they are not certified.
    certified = (model["certified"] & (t != -100)).mean()
    assert 0.6 < certified < 0.95, certified  # the GPU decides within 2% of the model: both paths follow
    assert spy.paths == ["exact", "gated", "gated"]
