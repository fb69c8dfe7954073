"""GPU path: `jax.experimental.buffer_callback` over the CuPy launchers of `cce_cupy.cuda` (forward, backward).

XLA hands the callback its device buffers and its CUDA stream. The callback wraps the buffers
zero-copy with `cupy.from_dlpack`, makes XLA's stream CuPy's current stream, and launches the
kernels into outputs XLA allocated. Nothing is allocated by CuPy and nothing synchronizes the host:
the kernels' scratch memory is an extra uint8 output of the callback, sized at trace time from
the static shapes (`forward_scratch_nbytes`, `backward_scratch_nbytes`), and dropped afterwards.

Out-of-range targets: the forward kernel writes NaN as the row's target term, so the loss is NaN
(and so is a "mean" or "sum"). Nothing is raised: raising would need a host sync. The kernels'
bad-target flag is an extra (1,) int32 output, cleared before every launch, and discarded.

Certified filter (filter_eps) when differentiated, on Hopper: the forward callback also collects
each row's candidate lists (cce_cupy.cuda.filtered.launch_lists_forward), which the backward
callback gets back as residuals (launch_backward_from_lists). The backward picks its path from
the certified share of its previous call (`_CertifiedHistory`), copied to the host asynchronously,
never synced.

vmap: `vmap_method` is forwarded to `buffer_callback`. "sequential" (the default) runs one callback
per batch element inside a loop; "expand_dims" runs one callback that loops over the batch in
Python (each batched input then carries leading batch axes, size 1 where unbatched). Both reuse
one scratch buffer per callback call.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from cce_cupy.cuda import backward as cuda_backward
from cce_cupy.cuda import budget as cuda_budget
from cce_cupy.cuda import device as cuda_device
from cce_cupy.cuda import filtered as cuda_filtered
from cce_cupy.cuda import forward as cuda_forward
from cce_cupy.cuda import plan
from cce_cupy.cuda.sources import HOPPER_DTYPES
from cce_cupy.options import CCEOptions, grad_dtype

# Default of `command_buffer_compatible` when the caller passes None. With True, XLA records the
# callback's launches into a CUDA graph once and replays them without calling Python again: the
# callback never allocates, never syncs, and reads no Python state that changes between calls
# (kernels are loaded at trace time, see `precompile`). CuPy refuses cuBLAS calls during capture,
# so a captured backward runs its two gradient GEMMs on our tiled kernels instead (slower on
# Hopper): hence off by default. Pass the argument to benchmark both settings.
COMMAND_BUFFER_COMPATIBLE = False

VMAP_METHODS = ("sequential", "sequential_unrolled", "expand_dims", "broadcast_all")


class _XlaStream:
    """A `__cuda_stream__` view of XLA's `cudaStream_t` for `cupy.cuda.Stream.from_external`."""

    __slots__ = ("handle",)

    def __init__(self, handle: int) -> None:
        self.handle = int(handle)

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


@contextlib.contextmanager
def _cupy_bridge(ctx, any_buffer):
    """Run on the buffer's device and on XLA's stream; yield the zero-copy wrapper of a Buffer."""
    import cupy

    with cupy.cuda.Device(any_buffer.__dlpack_device__()[1]):
        with cupy.cuda.Stream.from_external(_XlaStream(ctx.stream)):
            yield cupy.from_dlpack


def _pinned_counts() -> np.ndarray:
    """(2,) int32 host array in pinned memory (portable: any device may copy into it), so that a
    device-to-host copy into it is asynchronous."""
    import cupy

    return np.ndarray((2,), np.int32, buffer=cupy.cuda.alloc_pinned_memory(8))


class _Bridge:
    """What the callbacks call; the CPU tests swap in NumPy stand-ins to check the plumbing."""

    context: Callable[..., Any] = staticmethod(_cupy_bridge)
    launch_forward: Callable[..., None] = staticmethod(cuda_forward.launch_forward)
    launch_backward: Callable[..., None] = staticmethod(cuda_backward.launch_backward)
    launch_fused_budgeted: Callable[..., None] = staticmethod(cuda_budget.launch_fused_budgeted)
    launch_lists_forward: Callable[..., None] = staticmethod(cuda_filtered.launch_lists_forward)
    launch_backward_from_lists: Callable[..., None] = staticmethod(cuda_filtered.launch_backward_from_lists)
    pinned_counts: Callable[[], np.ndarray] = staticmethod(_pinned_counts)


BRIDGE = _Bridge()


def _gpu_devices() -> tuple[int, ...]:
    """CUDA ordinals of this process's JAX GPUs (the ids CuPy uses)."""
    return tuple(d.local_hardware_id for d in jax.local_devices() if d.platform == "gpu")


@functools.cache
def precompile(dtypes: tuple[str, ...] | None = None) -> int:
    """Load every kernel instance (or those for `dtypes`, input and target dtypes) on every local
    GPU, and create CuPy's cuBLAS handle on each; returns the instance count.

    Called at trace time, so no compilation, module load or handle creation happens inside a
    callback (or inside XLA's CUDA-graph capture). That matters most on several GPUs: the callbacks
    of each device run on their own thread, and a first-call load on one device (seconds, or
    minutes when a kernel must be compiled) can outlast XLA's 40-second rendezvous of the
    collective that the other devices already wait in. From the prebuilt cubins this takes well
    under a second.
    """
    from cce_cupy.cuda import loader

    return loader.preload(_gpu_devices(), dtypes)


def _warm(*arrays) -> None:
    if jax.default_backend() == "gpu":
        try:
            precompile(tuple(sorted({np.dtype(a.dtype).name for a in arrays})))
        except ImportError:  # no CuPy: the callback will say so when it runs
            pass


def _pick(x, idx: tuple[int, ...], core_ndim: int):
    """Batch element `idx` of a buffer with leading batch axes (size 1 where not batched)."""
    lead = x.shape[: x.ndim - core_ndim]
    assert len(lead) == len(idx), (x.shape, idx, core_ndim)
    return x[tuple(i if s > 1 else 0 for i, s in zip(idx, lead))]


def _elements(batch: tuple[int, ...], scratch, e, c, targets, bias):
    """The batch elements of one callback call (batch is () unless vmapped with expand_dims /
    broadcast_all): (idx, scratch, e, c, targets, bias) of each. Launches are stream-ordered, so
    one scratch (the first element's) serves them all."""
    scratch = scratch[(0,) * len(batch)]
    for idx in np.ndindex(*batch):
        b = None if bias is None else _pick(bias, idx, 1)
        yield idx, scratch, _pick(e, idx, 2), _pick(c, idx, 2), _pick(targets, idx, 1), b


@functools.lru_cache(maxsize=None)
def _forward_callback(opts: CCEOptions, has_bias: bool):
    def callback(ctx, out, *args) -> None:
        with BRIDGE.context(ctx, out[0]) as wrap:
            lse_out, tgt_out, scratch, bad = (wrap(b) for b in out)
            e, c, targets, *rest = (wrap(a) for a in args)
            bias = rest[0] if has_bias else None
            for idx, scratch_i, e_i, c_i, t_i, b_i in _elements(lse_out.shape[:-1], scratch, e, c, targets, bias):
                flag = bad[idx]
                flag.fill(0)
                BRIDGE.launch_forward(
                    e_i, c_i, t_i, b_i, opts, lse_out[idx], tgt_out[idx], scratch=scratch_i, bad_target=flag, tune=False
                )

    return callback


@functools.lru_cache(maxsize=None)
def _backward_callback(opts: CCEOptions, has_bias: bool, captured: bool):
    def callback(ctx, out, *args) -> None:
        with BRIDGE.context(ctx, out[0]) as wrap:
            de, dc, *rest_out = (wrap(b) for b in out)
            dbias, scratch = rest_out if has_bias else (None, rest_out[0])
            e, c, targets, *rest = (wrap(a) for a in args)
            bias, lse, coef_p, coef_q = rest if has_bias else [None, *rest]
            for idx, scratch_i, e_i, c_i, t_i, b_i in _elements(lse.shape[:-1], scratch, e, c, targets, bias):
                BRIDGE.launch_backward(
                    e_i,
                    c_i,
                    t_i,
                    b_i,
                    opts,
                    _pick(lse, idx, 1),
                    _pick(coef_p, idx, 1),
                    _pick(coef_q, idx, 1),
                    de[idx],
                    dc[idx],
                    None if dbias is None else dbias[idx],
                    scratch=scratch_i,
                    use_cublas=not captured,
                    host_sync=False,
                )

    return callback


@functools.lru_cache(maxsize=None)
def _fused_budgeted_callback(opts: CCEOptions, has_bias: bool, budget_plan):
    def callback(ctx, out, *args) -> None:
        with BRIDGE.context(ctx, out[0]) as wrap:
            lse_out, tgt_out, de, dc, *rest_out = (wrap(b) for b in out)
            dbias, scratch, bad = rest_out if has_bias else (None, *rest_out)
            e, c, targets, *rest = (wrap(a) for a in args)
            bias, row_grad = rest if has_bias else (None, *rest)
            for idx, scratch_i, e_i, c_i, t_i, b_i in _elements(lse_out.shape[:-1], scratch, e, c, targets, bias):
                flag = bad[idx]
                flag.fill(0)
                BRIDGE.launch_fused_budgeted(
                    e_i,
                    c_i,
                    t_i,
                    b_i,
                    opts,
                    budget_plan,
                    _pick(row_grad, idx, 1),
                    lse_out[idx],
                    tgt_out[idx],
                    de[idx],
                    dc[idx],
                    None if dbias is None else dbias[idx],
                    scratch_i,
                    bad_target=flag,
                    tune=False,
                )

    return callback


class _CertifiedHistory:
    """The counts of each lists backward's previous call, per (options, device, shape), from which
    the next call picks its path without a host sync.

    Each call ends by copying (uncertified rows, rows with a gradient) from the device into a small
    pinned host array, asynchronously on XLA's stream; the next call on that device reads it (a
    host read, no sync) before it launches anything. The value only picks the speed: both paths
    meet the certificate whatever it says. So a value read before its copy has landed (the host
    runs ahead of the GPU) is harmless: it is an older call's, or the start value, which picks
    the exact path; even a pair torn between two calls only costs speed.
    """

    NO_CALL = -1  # the start value of the second count: no call yet

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the callbacks of each device run on their own thread
        self._counts: dict[tuple, np.ndarray] = {}

    def counts(self, key: tuple) -> np.ndarray:
        """The pinned (2,) int32 array of `key` (see key()), created at the start value on first
        use: at trace time for this process's GPUs, so that no callback allocates it."""
        with self._lock:
            counts = self._counts.get(key)
            if counts is None:
                counts = BRIDGE.pinned_counts()
                counts[:] = (0, self.NO_CALL)
                self._counts[key] = counts
        return counts

    @staticmethod
    def key(opts: CCEOptions, has_bias: bool, device: int, n: int, d: int, v: int) -> tuple:
        return (opts, has_bias, device, n, d, v)

    @staticmethod
    def gated(counts: np.ndarray) -> bool:
        """The gated path (exact pass gated on the device count + list sums), where at least
        MIN_CERTIFIED_FRACTION of the rows with a gradient certified in the previous call; else
        (and before any call) the exact backward with cuBLAS."""
        uncertified, active = (int(x) for x in counts)
        return active != _CertifiedHistory.NO_CALL and cuda_backward.list_sums_pay(active, uncertified)


def _entries(pairs):
    """The lists' (N, slots, 2) int32 buffer (XLA's residual: int64 may be off in JAX) as the
    launchers' (N, slots) int64 entries, each a (column, y) int2."""
    return pairs.view(np.int64).reshape(pairs.shape[:-1])


@functools.lru_cache(maxsize=None)
def _lists_forward_callback(opts: CCEOptions, has_bias: bool):
    def callback(ctx, out, *args) -> None:
        with BRIDGE.context(ctx, out[0]) as wrap:
            lse_out, tgt_out, entries, row_count, other_mass, part_max, scratch, bad = (wrap(b) for b in out)
            e, c, targets, *rest = (wrap(a) for a in args)
            bias, row_grad = rest if has_bias else (None, *rest)
            for idx, scratch_i, e_i, c_i, t_i, b_i in _elements(lse_out.shape[:-1], scratch, e, c, targets, bias):
                flag = bad[idx]
                flag.fill(0)
                BRIDGE.launch_lists_forward(
                    e_i,
                    c_i,
                    t_i,
                    b_i,
                    opts,
                    _pick(row_grad, idx, 1),
                    lse_out[idx],
                    tgt_out[idx],
                    cuda_filtered.ForwardLists(_entries(entries[idx]), row_count[idx], other_mass[idx]),
                    scratch_i,
                    bad_target=flag,
                    tune=False,
                )
                # A residual: the scratch is XLA's to reuse once this callback returns.
                part_max[idx][...] = cuda_filtered.partial_max(scratch_i, e_i.shape[0], c_i.shape[0])

    return callback


_CERTIFIED_HISTORY = _CertifiedHistory()


@functools.lru_cache(maxsize=None)
def _lists_backward_callback(opts: CCEOptions, has_bias: bool):
    def callback(ctx, out, *args) -> None:
        device = out[0].__dlpack_device__()[1]
        with BRIDGE.context(ctx, out[0]) as wrap:
            de, dc, *rest_out = (wrap(b) for b in out)
            dbias, scratch = rest_out if has_bias else (None, rest_out[0])
            e, c, targets, *rest = (wrap(a) for a in args)
            bias, rest = (rest[0], rest[1:]) if has_bias else (None, rest)
            lse, coef_p, coef_q, active, entries, row_count, other_mass, part_max = rest
            for idx, scratch_i, e_i, c_i, t_i, b_i in _elements(lse.shape[:-1], scratch, e, c, targets, bias):
                counts = _CERTIFIED_HISTORY.counts(
                    _CertifiedHistory.key(opts, has_bias, device, *e_i.shape, c_i.shape[0])
                )
                BRIDGE.launch_backward_from_lists(
                    e_i,
                    c_i,
                    t_i,
                    b_i,
                    opts,
                    _pick(lse, idx, 1),
                    _pick(coef_p, idx, 1),
                    _pick(coef_q, idx, 1),
                    _pick(active, idx, 1),
                    cuda_filtered.ForwardLists(
                        _entries(_pick(entries, idx, 3)), _pick(row_count, idx, 1), _pick(other_mass, idx, 2)
                    ),
                    _pick(part_max, idx, 2),
                    de[idx],
                    dc[idx],
                    None if dbias is None else dbias[idx],
                    scratch_i,
                    gated=_CERTIFIED_HISTORY.gated(counts),
                    report=counts,
                )

    return callback


def budget_plan(e, c, opts: CCEOptions, has_bias: bool):
    """The memory-budgeted path's plan (cce_cupy.cuda.budget) for these abstract arrays on this
    process's GPUs, or None where the lean path runs: no budget, no GPU, a GPU other than Hopper,
    inputs other than bf16 / fp16, rows not a multiple of 16 bytes, or a budget below one chunk.
    Decided at trace time, from shapes and dtypes (XLA's buffers are aligned)."""
    n, d = e.shape
    dtype = np.dtype(e.dtype)
    if dtype.name not in HOPPER_DTYPES or (d * dtype.itemsize) % 16 or not _hopper_everywhere():
        return None
    return cuda_budget.budget_plan(n, c.shape[0], d, dtype, opts, has_bias)


def _hopper_everywhere() -> bool:
    """Every local GPU is a Hopper (compute capability 9.0) and CuPy is installed."""
    devices = _gpu_devices()
    try:
        import cupy
    except ImportError:
        return False
    return bool(devices) and all(cupy.cuda.Device(i).compute_capability == "90" for i in devices)


def filter_list_slots(e, c, opts: CCEOptions) -> int:
    """List slots a row of the certified filter's forward-collected lists gets, or 0 where that
    path does not run: no filter_eps, no list slots (plan.sparse_slots: deterministic, inputs
    other than bf16 / fp16, D % 8), kernels other than the Hopper ones (CCE_CUPY_KERNELS), or a
    local GPU other than Hopper. Decided at trace time, from shapes and dtypes."""
    n, d = e.shape
    slots = plan.sparse_slots(n, d, np.dtype(e.dtype), opts)
    if not slots or cuda_device.KERNELS != "auto" or not _hopper_everywhere():
        return 0
    return slots


def fused_budgeted(e, c, targets, bias, row_grad, opts: CCEOptions, plan, *, vmap_method: str):
    """(lse, tgt, dE, dC, dbias) of the memory-budgeted path: the loss terms and the gradients for
    the per-row loss gradients `row_grad` (coef_q of cce_cupy.options.row_coefficients), in one
    callback. dbias is None without bias. Never captured into a CUDA graph (it runs cuBLAS)."""
    _warm(e, targets)
    n = e.shape[0]
    result = [jax.ShapeDtypeStruct((n,), jnp.float32)] * 2  # lse, tgt
    result += _grad_results(e, c, bias, opts)
    result.append(jax.ShapeDtypeStruct((plan.nbytes,), jnp.uint8))  # scratch: the kept softmax
    result.append(jax.ShapeDtypeStruct((1,), jnp.int32))  # bad-target flag
    call = buffer_callback(
        _fused_budgeted_callback(opts, bias is not None, plan),
        tuple(result),
        vmap_method=vmap_method,
        command_buffer_compatible=False,
    )
    args = (e, c, targets) + (() if bias is None else (bias,))
    outs = call(*args, row_grad.astype(jnp.float32))
    return outs[0], outs[1], outs[2], outs[3], (outs[4] if bias is not None else None)


def forward(e, c, targets, bias, opts: CCEOptions, *, vmap_method: str, command_buffer_compatible: bool):
    """(lse, tgt), float32 (N,), of flattened e (N, D), c (V, D), shifted targets (N,), bias."""
    _warm(e, targets)
    n, d = e.shape
    v = c.shape[0]
    nbytes = plan.forward_scratch_nbytes(n, v, d, np.dtype(e.dtype))
    result = (
        jax.ShapeDtypeStruct((n,), jnp.float32),  # lse
        jax.ShapeDtypeStruct((n,), jnp.float32),  # tgt
        jax.ShapeDtypeStruct((nbytes,), jnp.uint8),  # scratch
        jax.ShapeDtypeStruct((1,), jnp.int32),  # bad-target flag
    )
    call = buffer_callback(
        _forward_callback(opts, bias is not None),
        result,
        vmap_method=vmap_method,
        command_buffer_compatible=command_buffer_compatible,
    )
    args = (e, c, targets) if bias is None else (e, c, targets, bias)
    lse, tgt, _, _ = call(*args)
    return lse, tgt


def _grad_results(e, c, bias, opts: CCEOptions) -> list:
    """The callbacks' gradient outputs: dE (N, D), dC (V, D) and, with bias, dbias (V,), in
    `cce_cupy.options.grad_dtype(e.dtype, opts)`."""
    gdt = grad_dtype(np.dtype(e.dtype), opts)
    (n, d), v = e.shape, c.shape[0]
    shapes = [(n, d), (v, d)] + ([(v,)] if bias is not None else [])
    return [jax.ShapeDtypeStruct(shape, gdt) for shape in shapes]


def backward(
    e, c, targets, bias, opts: CCEOptions, lse, coef_p, coef_q, *, vmap_method: str, command_buffer_compatible: bool
):
    """(dE, dC, dbias) in `cce_cupy.options.grad_dtype(e.dtype, opts)`; dbias is None without bias."""
    _warm(e, targets)
    n, d = e.shape
    v = c.shape[0]
    nbytes = plan.backward_scratch_nbytes(n, v, d, np.dtype(e.dtype), opts)
    result = _grad_results(e, c, bias, opts) + [jax.ShapeDtypeStruct((nbytes,), jnp.uint8)]
    call = buffer_callback(
        _backward_callback(opts, bias is not None, command_buffer_compatible),
        tuple(result),
        vmap_method=vmap_method,
        command_buffer_compatible=command_buffer_compatible,
    )
    f32 = jnp.float32
    args = (e, c, targets) + (() if bias is None else (bias,))
    outs = call(*args, lse.astype(f32), coef_p.astype(f32), coef_q.astype(f32))
    return outs[0], outs[1], (outs[2] if bias is not None else None)


def forward_with_lists(e, c, targets, bias, row_grad, opts: CCEOptions, slots: int, *, vmap_method: str):
    """(lse, tgt, lists) of the differentiated forward with the certified filter: the forward also
    collects each row's candidate columns (cce_cupy.cuda.filtered.launch_lists_forward) for the
    backward, lists = (entries (N, slots, 2) int32, row_count (N,) int32, other_mass (splits, N)
    float32, part_max (splits, N) float32). row_grad: (N,) float32, 1 for the rows that may get a
    gradient (not ignored), 0 for the others. Never captured into a CUDA graph (its backward runs
    cuBLAS and reads host state)."""
    _warm(e, targets)
    n, d = e.shape
    v = c.shape[0]
    splits = cuda_filtered.list_splits(n, v)
    f32 = jnp.float32
    result = (
        jax.ShapeDtypeStruct((n,), f32),  # lse
        jax.ShapeDtypeStruct((n,), f32),  # tgt
        jax.ShapeDtypeStruct((n, slots, 2), jnp.int32),  # entries: (column, y as float bits) pairs
        jax.ShapeDtypeStruct((n,), jnp.int32),  # row_count
        jax.ShapeDtypeStruct((splits, n), f32),  # other_mass
        jax.ShapeDtypeStruct((splits, n), f32),  # part_max
        jax.ShapeDtypeStruct((cuda_filtered.lists_forward_scratch_nbytes(n, v, d, np.dtype(e.dtype)),), jnp.uint8),
        jax.ShapeDtypeStruct((1,), jnp.int32),  # bad-target flag
    )
    call = buffer_callback(
        _lists_forward_callback(opts, bias is not None),
        result,
        vmap_method=vmap_method,
        command_buffer_compatible=False,
    )
    args = (e, c, targets) + (() if bias is None else (bias,))
    lse, tgt, *lists, _, _ = call(*args, row_grad.astype(f32))
    return lse, tgt, tuple(lists)


def backward_from_lists(e, c, targets, bias, opts: CCEOptions, lse, coef_p, coef_q, lists, *, vmap_method: str):
    """(dE, dC, dbias) of the certified filter from forward_with_lists' lists, in
    `cce_cupy.options.grad_dtype(e.dtype, opts)`; dbias is None without bias. Never captured."""
    _warm(e, targets)
    n, d = e.shape
    v = c.shape[0]
    nbytes = cuda_filtered.backward_from_lists_scratch_nbytes(n, v, d, np.dtype(e.dtype), opts)
    result = _grad_results(e, c, bias, opts) + [jax.ShapeDtypeStruct((nbytes,), jnp.uint8)]
    for device in _gpu_devices():
        _CERTIFIED_HISTORY.counts(_CertifiedHistory.key(opts, bias is not None, device, n, d, v))
    call = buffer_callback(
        _lists_backward_callback(opts, bias is not None),
        tuple(result),
        vmap_method=vmap_method,
        command_buffer_compatible=False,
    )
    f32 = jnp.float32
    coef_p, coef_q = (jnp.broadcast_to(x, (n,)).astype(f32) for x in (coef_p, coef_q))
    # The rows with a gradient, for the certified share that picks the next call's path.
    active = jnp.count_nonzero((coef_p != 0) | (coef_q != 0)).astype(jnp.int32).reshape(1)
    args = (e, c, targets) + (() if bias is None else (bias,))
    outs = call(*args, lse.astype(f32), coef_p, coef_q, active, *lists)
    return outs[0], outs[1], (outs[2] if bias is not None else None)


__all__ = [
    "BRIDGE",
    "COMMAND_BUFFER_COMPATIBLE",
    "VMAP_METHODS",
    "backward",
    "backward_from_lists",
    "budget_plan",
    "filter_list_slots",
    "forward",
    "forward_with_lists",
    "fused_budgeted",
    "precompile",
]
