"""The certified filter's forward + backward in one call, with the candidate lists collected by the
forward (lce_forward_partials_sm90, STORE = LISTS) instead of a recompute pass.

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

CuPy only, with a host sync (the count of uncertified rows); JAX callbacks use the recompute pass.
"""

from __future__ import annotations

import math

import numpy as np

from cce_cupy.cuda.backward import launch_backward, scratch_buffers, sparse_buffers
from cce_cupy.cuda.budget import launch_target_logits
from cce_cupy.cuda.device import _aligned, use_hopper
from cce_cupy.cuda.forward import KeptSoftmax, launch_forward
from cce_cupy.cuda.loader import get_kernel
from cce_cupy.cuda.plan import _cdiv, backward_scratch_nbytes, forward_scratch_nbytes, forward_splits, sparse_slots
from cce_cupy.cuda.sources import HOPPER_TILE_N, SoftmaxStore, template_name
from cce_cupy.options import CCEOptions, row_coefficients, row_loss_grads

# Below c_i + log eps by this much, too, for the candidates: the gather-dot's c_i and the forward's
# own target logit are the same fp32 dot product summed in different orders (~1e-5 apart at |c| ~
# 20), and K_i must be inside the candidates.
THRESHOLD_MARGIN = 2.0**-6


def filtered_applies(e, c, opts: CCEOptions) -> bool:
    """This path can run: filtering with list slots (plan.sparse_slots: not deterministic, 16-bit,
    D % 8 == 0) on the Hopper forward's inputs."""
    n, d = e.shape
    return opts.filter_eps is not None and sparse_slots(n, d, e.dtype, opts) > 0 and use_hopper(e, c, ld=d)


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
    f32 = np.float32
    slots = sparse_slots(n, d, e.dtype, opts)
    # Large enough for the exact backward of all rows too, which then runs in these bytes once the
    # lists are done with (launch_backward): the call's peak is the larger of the two, not their sum.
    exact = opts.replace(filter_eps=None, filter_tol=None)
    nbytes = max(backward_scratch_nbytes(n, v, d, e.dtype, o, device_fallback=False) for o in (opts, exact))
    scratch = cupy.empty(nbytes, dtype=cupy.uint8)
    bufs = sparse_buffers(scratch_buffers(scratch, n, v, d, e.dtype, opts, device_fallback=False))
    bufs["counts"].fill(0)  # row counts (the forward appends from 0) and column counts (the sums)
    row_count = bufs["counts"][1 : 1 + n]
    entries = bufs["entries"][: 2 * n * slots]

    # Each row's threshold: its target logit (gather-dot, +inf for a row without gradient) + log eps.
    row_grad = row_loss_grads(cupy, opts, valid, grad_loss)  # coef_q: needs no lse
    row_grad = cupy.ascontiguousarray(cupy.broadcast_to(row_grad, (n,)), dtype=cupy.float32)
    threshold = cupy.empty(n, cupy.float32)
    launch_target_logits(e, c, targets, bias, opts, row_grad, threshold, cupy.empty(n, cupy.float32))
    log_eps = math.log(opts.resolved_filter_eps())
    threshold += f32(log_eps - THRESHOLD_MARGIN)
    mark("thresholds")

    splits = forward_splits(n, v, HOPPER_TILE_N)[0]
    fwd_scratch = cupy.empty(forward_scratch_nbytes(n, v, d, e.dtype), dtype=cupy.uint8)
    other_mass = cupy.empty((splits, n), cupy.float32)
    store = KeptSoftmax(
        SoftmaxStore.LISTS, entries.view(cupy.int64).reshape(n, slots), scales=other_mass, row_shift=threshold,
        unsafe=row_count,
    )  # fmt: skip
    launch_forward(e, c, targets, bias, opts, lse, tgt, fwd_scratch, bad_target, True, store)
    mark("forward")

    coef_p, coef_q = row_coefficients(cupy, opts, valid, lse, grad_loss)
    coef_p = cupy.ascontiguousarray(cupy.broadcast_to(coef_p, (n,)), dtype=cupy.float32)
    coef_q = cupy.ascontiguousarray(cupy.broadcast_to(coef_q, (n,)), dtype=cupy.float32)
    part_max = fwd_scratch[: splits * n * 4].view(cupy.float32)  # the partials' first slot
    ls = opts.label_smoothing
    get_kernel("lce_sparse.cu", template_name("sparse_prune_lists", opts.softcap is not None, targets.dtype))(
        (_cdiv(n, 8),),
        (256,),
        (entries, row_count, bufs["dropped"], other_mass, part_max, np.int32(splits), lse, coef_p, coef_q, targets,
         np.int32(n), np.int32(slots), f32(log_eps), f32(opts.softcap or 0.0), f32(1.0 - ls),
         f32(ls / v if opts.softcap is not None else 0.0)),
    )  # fmt: skip
    mark("prune")
    launch_backward(
        e, c, targets, bias, opts, lse, coef_p, coef_q, de, dc, dbias, scratch=scratch, stats=stats,
        lists_from_forward=True,
    )  # fmt: skip
    mark("backward")


__all__ = ["THRESHOLD_MARGIN", "filtered_applies", "launch_fused_filtered"]
