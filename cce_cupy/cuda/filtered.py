"""The certified filter's forward + backward with the candidate lists collected by the forward
(lce_forward_partials_sm90, STORE = LISTS) instead of a recompute pass.

The certified backward (cce_cupy.cuda.backward, cce_cupy.cuda.sparse; docs/design.md "Certified
filtering") needs, per row, the list of kept columns K_i = {t_i} + {j : p_ij >= eps} and the mass
of the others. With the target logit c_i known before the forward (a gather-dot), the forward can
collect them: lse_i >= c_i, so every column of K_i has y_ij >= c_i + log eps, and a column below
that is certainly dropped. The forward appends the columns at or above it (a few a row where the
certificate can hold) and sums the others' mass; sparse_prune_lists then keeps K_i from them
against the final lse and adds the rest to the dropped mass. What the certificate and the sums see
is then what the recompute pass would have given, without that pass: a certified row costs no
work after the forward but its list sums, and on data where no row certifies, the call is the
exact backward plus the lists' small cost.

Two callers share the two steps (launch_lists_forward: thresholds + LISTS forward;
launch_prune_lists): CuPy's launch_fused_filtered, one call with a host sync (the count of
uncertified rows), and JAX (jax_bindings), whose differentiated forward keeps the lists as
residuals and whose backward (launch_backward_from_lists) picks its path without a host sync.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np

from cce_cupy.cuda import sparse
from cce_cupy.cuda.backward import launch_backward, scratch_buffers, sparse_buffers
from cce_cupy.cuda.budget import launch_target_logits
from cce_cupy.cuda.device import _aligned, use_hopper
from cce_cupy.cuda.forward import KeptSoftmax, launch_forward
from cce_cupy.cuda.loader import get_kernel
from cce_cupy.cuda.plan import _cdiv, backward_scratch_nbytes, forward_scratch_nbytes, forward_splits, sparse_slots
from cce_cupy.cuda.sources import HOPPER_TILE_N, SoftmaxStore, template_name
from cce_cupy.options import CCEOptions, row_loss_grads, softmax_coefficient

# Below c_i + log eps by this much, too, for the candidates: the gather-dot's c_i and the forward's
# own target logit are the same fp32 dot product summed in different orders (~1e-5 apart at |c| ~
# 20), and K_i must be inside the candidates.
THRESHOLD_MARGIN = 2.0**-6
_ALIGN = 256  # the thresholds start on this boundary after the forward's scratch


class ForwardLists(NamedTuple):
    """What the LISTS forward writes (lce_hopper.cu, "LISTS"): entries (N, slots) int64, each a
    (column, y as float bits) int2; row_count (N,) int32, above slots where a list overflowed;
    other_mass (splits, N) fp32, each split's mass of the other columns against its partial max."""

    entries: Any
    row_count: Any
    other_mass: Any


def filtered_applies(e, c, opts: CCEOptions) -> bool:
    """This path can run: filtering with list slots (plan.sparse_slots: not deterministic, 16-bit,
    D % 8 == 0) on the Hopper forward's inputs."""
    n, d = e.shape
    return opts.filter_eps is not None and sparse_slots(n, d, e.dtype, opts) > 0 and use_hopper(e, c, ld=d)


def list_splits(n: int, v: int) -> int:
    """The Hopper forward's vocabulary splits: other_mass and part_max are (splits, N)."""
    return forward_splits(n, v, HOPPER_TILE_N)[0]


def lists_forward_scratch_nbytes(n: int, v: int, d: int, dtype) -> int:
    """Bytes of launch_lists_forward's scratch: the forward's, then two (N,) fp32 for the thresholds."""
    return _thresholds_offset(n, v, d, dtype) + 2 * n * 4


def _thresholds_offset(n: int, v: int, d: int, dtype) -> int:
    return _cdiv(forward_scratch_nbytes(n, v, d, dtype), _ALIGN) * _ALIGN


def partial_max(scratch, n: int, v: int):
    """The view of launch_lists_forward's scratch that prune needs as part_max: the forward's
    partials' first slot, each split's max, (splits, N) fp32."""
    splits = list_splits(n, v)
    return scratch[: splits * n * 4].view(np.float32).reshape(splits, n)


def launch_lists_forward(
    e,
    c,
    targets,
    bias,
    opts: CCEOptions,
    row_grad,
    lse,
    tgt,
    lists: ForwardLists,
    scratch,
    bad_target=None,
    tune: bool = True,
    mark: Callable[[str], None] | None = None,
) -> None:
    """Loss terms (lse, tgt, as launch_forward's) and the candidate lists (written whole).

    Each row's threshold is its target logit (gather-dot) + log eps - THRESHOLD_MARGIN, +inf for a
    row whose row_grad is 0 (its list is not collected: a row that gets a gradient anyway is not
    certified and takes the exact path). row_grad: (N,) fp32, nonzero for the rows that may get a
    gradient. scratch: uint8 of lists_forward_scratch_nbytes; partial_max(scratch) afterwards.
    mark: called with "thresholds" between the gather-dot and the forward (stage timing).
    Requires filtered_applies.
    """
    n, d = e.shape
    v = c.shape[0]
    off = _thresholds_offset(n, v, d, e.dtype)
    thresholds = scratch[off : off + 2 * n * 4].view(np.float32)
    threshold, unused_z = thresholds[:n], thresholds[n:]
    sparse.zero_fill(lists.row_count)  # the forward appends from 0
    launch_target_logits(e, c, targets, bias, opts, row_grad, threshold, unused_z)
    threshold += np.float32(math.log(opts.resolved_filter_eps()) - THRESHOLD_MARGIN)
    if mark is not None:
        mark("thresholds")
    store = KeptSoftmax(
        SoftmaxStore.LISTS, lists.entries, scales=lists.other_mass, row_shift=threshold, unsafe=lists.row_count
    )
    launch_forward(e, c, targets, bias, opts, lse, tgt, scratch, bad_target, tune, store)


def launch_prune_lists(targets, opts: CCEOptions, v: int, lse, coef_p, coef_q, lists: ForwardLists, part_max, dropped):
    """sparse_prune_lists: the forward's lists finished in place against the lse into the lists of
    the certified backward (kept entries as gradients, row_count their number), and each row's
    dropped mass into dropped ((N,) fp32). part_max: partial_max of the forward's scratch."""
    n, slots = lists.entries.shape
    splits = lists.other_mass.shape[0]
    f32 = np.float32
    ls = opts.label_smoothing
    get_kernel("lce_sparse.cu", template_name("sparse_prune_lists", opts.softcap is not None, targets.dtype))(
        (_cdiv(n, 8),),
        (256,),
        (lists.entries, lists.row_count, dropped, lists.other_mass, part_max, np.int32(splits), lse, coef_p, coef_q,
         targets, np.int32(n), np.int32(slots), f32(math.log(opts.resolved_filter_eps())), f32(opts.softcap or 0.0),
         f32(1.0 - ls), f32(ls / v if opts.softcap is not None else 0.0)),
    )  # fmt: skip


def _list_buffers(bufs, n: int, slots: int, other_mass) -> ForwardLists:
    """The lists' places in the backward's scratch (sparse_buffers): entries and the row counts."""
    entries = bufs["entries"][: 2 * n * slots].view(np.int64).reshape(n, slots)
    return ForwardLists(entries, bufs["counts"][1 : 1 + n], other_mass)


def launch_fused_filtered(
    e,
    c,
    targets,
    bias,
    opts: CCEOptions,
    valid,
    grad_loss,
    lse,
    tgt,
    de,
    dc,
    dbias,
    stats=None,
    bad_target=None,
    events: list | None = None,
):
    """Loss terms (lse, tgt) and certified filtered gradients (de, dc, dbias written whole).

    valid: (N,) bool, the rows that are not ignored; grad_loss: the upstream gradient as for
    options.row_coefficients. stats: as launch_backward's. events: a list that gets (stage, CUDA
    event recorded at its end) pairs, for timing the stages (benchmarks/dev/filter_timing.py).
    Requires filtered_applies.
    """
    import cupy

    def mark(stage: str) -> None:
        if events is not None:
            events.append((stage, cupy.cuda.Event()))
            events[-1][1].record()

    mark("start")

    n, d = e.shape
    v = c.shape[0]
    if not _aligned(de, dc, ld=d):
        raise ValueError("launch_fused_filtered needs 16-byte aligned dE and dC")
    slots = sparse_slots(n, d, e.dtype, opts)
    # Large enough for the exact backward of all rows too, which then runs in these bytes once the
    # lists are done with (launch_backward): the call's peak is the larger of the two, not their sum.
    exact = opts.replace(filter_eps=None, filter_tol=None)
    nbytes = max(backward_scratch_nbytes(n, v, d, e.dtype, o, device_fallback=False) for o in (opts, exact))
    scratch = cupy.empty(nbytes, dtype=cupy.uint8)
    bufs = sparse_buffers(scratch_buffers(scratch, n, v, d, e.dtype, opts, device_fallback=False))
    bufs["counts"].fill(0)  # the column counts (the sums count from 0)
    lists = _list_buffers(bufs, n, slots, cupy.empty((list_splits(n, v), n), cupy.float32))

    # coef_q alone needs no lse: the rows with a gradient get thresholds.
    row_grad = row_loss_grads(cupy, opts, valid, grad_loss)
    row_grad = cupy.ascontiguousarray(cupy.broadcast_to(row_grad, (n,)), dtype=cupy.float32)
    fwd_scratch = cupy.empty(lists_forward_scratch_nbytes(n, v, d, e.dtype), dtype=cupy.uint8)
    launch_lists_forward(e, c, targets, bias, opts, row_grad, lse, tgt, lists, fwd_scratch, bad_target, True, mark)
    mark("forward")

    coef_q = row_grad  # row_coefficients' coef_q, formed above for the thresholds
    coef_p = softmax_coefficient(cupy, opts, coef_q, lse)
    launch_prune_lists(targets, opts, v, lse, coef_p, coef_q, lists, partial_max(fwd_scratch, n, v), bufs["dropped"])
    mark("prune")
    launch_backward(
        e, c, targets, bias, opts, lse, coef_p, coef_q, de, dc, dbias, scratch=scratch, stats=stats,
        lists_from_forward=True,
    )  # fmt: skip
    mark("backward")


def backward_from_lists_scratch_nbytes(n: int, v: int, d: int, dtype, opts: CCEOptions) -> int:
    """Bytes of launch_backward_from_lists' scratch: the certified backward's with the gated exact
    pass (device_fallback), which also holds the exact backward of all rows."""
    return backward_scratch_nbytes(n, v, d, dtype, opts, device_fallback=True)


def launch_backward_from_lists(
    e,
    c,
    targets,
    bias,
    opts: CCEOptions,
    lse,
    coef_p,
    coef_q,
    active,
    lists: ForwardLists,
    part_max,
    de,
    dc,
    dbias,
    scratch,
    gated: bool,
    report,
) -> None:
    """Certified filtered gradients (de, dc, dbias written whole) from the lists of a
    launch_lists_forward call (JAX keeps them as residuals; they are read, not written), with no
    host sync.

    The lists are copied into the scratch (prune and the certificate rewrite them in place), pruned
    and certified. Then gated: the exact pass of the uncertified rows on our tiled GEMMs, gated on
    their device count, and the list sums of the certified rows (launch_backward, host_sync=False).
    Not gated: the exact backward of all rows with cuBLAS, which meets the certificate. Both are
    correct for any data; `gated` only picks the faster one, from an earlier call's counts.
    active: (1,) int32 on the device, the rows with a gradient (nonzero coef_p or coef_q).
    report: (2,) int32 host array in pinned memory that gets (uncertified rows, active),
    copied asynchronously on the current stream: read it only once the stream has passed.
    part_max: the partials' max of that forward (partial_max of its scratch). scratch: uint8 of
    backward_from_lists_scratch_nbytes. Requires filtered_applies.
    """
    import cupy

    n, d = e.shape
    v = c.shape[0]
    slots = lists.entries.shape[1]
    if slots != sparse_slots(n, d, e.dtype, opts) or not _aligned(de, dc, ld=d):
        raise ValueError("launch_backward_from_lists needs lists of sparse_slots() slots and 16-byte aligned dE, dC")
    bufs = sparse_buffers(scratch_buffers(scratch, n, v, d, e.dtype, opts, device_fallback=True))
    sparse.zero_fill(bufs["counts"])  # the column counts (the sums count from 0)
    own = _list_buffers(bufs, n, slots, lists.other_mass)
    stream = cupy.cuda.get_current_stream().ptr
    d2d, d2h = cupy.cuda.runtime.memcpyDeviceToDevice, cupy.cuda.runtime.memcpyDeviceToHost
    for dst, src in ((own.entries, lists.entries), (own.row_count, lists.row_count)):
        cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, d2d, stream)
    launch_prune_lists(targets, opts, v, lse, coef_p, coef_q, own, part_max, bufs["dropped"])
    uncertified = bufs["counts"][:1]

    def send_report() -> None:
        for i, src in enumerate((uncertified, active)):
            cupy.cuda.runtime.memcpyAsync(report.ctypes.data + 4 * i, src.data.ptr, 4, d2h, stream)

    if gated:
        # The certificate, the gated exact pass and the list sums; the count survives them (they
        # write the tiled buffers, the column counts and the outputs).
        launch_backward(
            e, c, targets, bias, opts, lse, coef_p, coef_q, de, dc, dbias, scratch=scratch, host_sync=False,
            lists_from_forward=True,
        )  # fmt: skip
        send_report()
        return
    sparse.certify(opts, coef_p, coef_q, bufs, n, v, slots)  # for the report only
    send_report()  # before the exact pass reuses the lists' bytes
    exact = opts.replace(filter_eps=None, filter_tol=None)
    launch_backward(e, c, targets, bias, exact, lse, coef_p, coef_q, de, dc, dbias, scratch=scratch)


__all__ = [
    "THRESHOLD_MARGIN",
    "ForwardLists",
    "backward_from_lists_scratch_nbytes",
    "filtered_applies",
    "launch_backward_from_lists",
    "launch_fused_filtered",
    "launch_lists_forward",
    "launch_prune_lists",
    "list_splits",
    "lists_forward_scratch_nbytes",
    "partial_max",
]
