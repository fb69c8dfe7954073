"""The memory-budgeted forward + backward: exact gradients for three GEMMs' work instead of four.

The lean path (forward.py, backward.py) recomputes the logits in the backward. With a budget, rows
are taken in chunks as large as it allows, and each chunk runs:

    1. the Hopper forward with STORE: lse and target term as always, and the chunk's softmax kept
       as fp16 s = exp(y - m) with one m per (row, 256-column tile) (lce_hopper.cu);
    2. lce_budget_grad (lce_budget.cu): s -> the logit gradient G, in place, in the input dtype;
    3. cuBLAS: dE[chunk] = G @ C, and dC (+)= G^T @ E[chunk]; dbias (+)= column sums of G.

Bytes a row: 2 (fp16 s, later G) per column, 4 per 256-column tile (scales). With more than one
chunk and 16-bit gradients, dC accumulates in an fp32 (V, D) buffer inside the budget (one rounding
at the end, as the lean path's). Everything runs on CuPy's current stream, no host sync.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cce_cupy.cuda.device import _gemm_rowmajor, _null, _ptr, use_hopper
from cce_cupy.cuda.forward import launch_forward
from cce_cupy.cuda.loader import get_kernel
from cce_cupy.cuda.plan import _cdiv, _round_up, forward_scratch_nbytes
from cce_cupy.cuda.sources import HOPPER_TILE_N, TILE_M, template_name
from cce_cupy.options import CCEOptions, grad_dtype

_GRAD_THREADS = 256  # lce_budget_grad: a block streams whole rows
_MAX_GRID = 65535
_ALIGN = 256  # bytes between the scratch buffers


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """How one call runs under a memory budget (all sizes in bytes)."""

    rows: int  # per chunk
    lds: int  # row stride of the kept softmax, in elements (V rounded up to 8: 16-byte rows)
    ntiles: int  # scales per row
    dc_acc: bool  # an fp32 dC accumulator (several chunks, 16-bit gradients)
    offsets: tuple  # (name, (offset, size)) of each buffer in the scratch (a tuple: plans are hashable)
    nbytes: int  # the scratch buffer: everything the path allocates beyond its outputs


def budget_plan(n: int, v: int, d: int, dtype, opts: CCEOptions) -> BudgetPlan | None:
    """The chunking for `opts.memory_budget`, or None where the lean path runs instead: no budget,
    an empty problem, or a budget too small for one 128-row chunk."""
    budget = opts.memory_budget
    if budget == "lean" or n == 0 or v == 0:
        return None
    lds = _round_up(v, 8)
    ntiles = _cdiv(v, HOPPER_TILE_N)

    def layout(rows: int, dc_acc: bool) -> tuple[tuple, int]:
        sizes = {
            "s": rows * lds * 2,
            "scales": rows * ntiles * 4,
            "forward": forward_scratch_nbytes(rows, v, d, dtype),
            "dc_acc": v * d * 4 if dc_acc else 0,
        }
        offsets, off = [], 0
        for name, size in sizes.items():
            offsets.append((name, (off, size)))
            off = _round_up(off + size, _ALIGN)
        return tuple(offsets), off

    offsets, nbytes = layout(n, False)
    if nbytes <= budget:
        return BudgetPlan(n, lds, ntiles, False, offsets, nbytes)
    dc_acc = grad_dtype(dtype, opts) != np.float32
    per_row = lds * 2 + ntiles * 4
    fixed = (v * d * 4 if dc_acc else 0) + forward_scratch_nbytes(n, v, d, dtype) + 4 * _ALIGN
    rows = (budget - fixed) // per_row // TILE_M * TILE_M if budget > fixed else 0
    if rows < TILE_M:
        return None
    offsets, nbytes = layout(rows, dc_acc)
    return BudgetPlan(rows, lds, ntiles, dc_acc, offsets, nbytes)


def budget_applies(e, c, opts: CCEOptions) -> bool:
    """The budgeted path can run these inputs: a budget, no filtering, and the Hopper forward's
    inputs (bf16 / fp16, 16-byte aligned rows) on an sm_90 GPU."""
    return opts.memory_budget != "lean" and opts.filter_eps is None and use_hopper(e, c, ld=e.shape[1])


def launch_fused_budgeted(
    e,
    c,
    targets,
    bias,
    opts: CCEOptions,
    plan: BudgetPlan,
    row_grad,
    lse_out,
    tgt_out,
    de_out,
    dc_out,
    dbias_out,
    scratch,
    bad_target=None,
    tune: bool = True,
):
    """Loss terms (lse, target term) and gradients in one pass over row chunks; see the module doc.

    row_grad: fp32 (N,), each row's upstream loss gradient: coef_q of
    cce_cupy.options.row_coefficients, which does not depend on the lse (the kernel derives coef_p
    from it and the lse, z-loss included). scratch: uint8, plan.nbytes. Gradients are written
    whole (not accumulated into): dE, dC and dbias in grad_dtype. bad_target, tune: as launch_forward.
    """
    n, d = e.shape
    v = c.shape[0]

    offsets = dict(plan.offsets)

    def buf(name, dtype, shape):
        off, size = offsets[name]
        return scratch[off : off + size].view(dtype).reshape(shape)

    fwd_scratch = buf("forward", np.uint8, (-1,))
    dc_target = buf("dc_acc", np.float32, (v, d)) if plan.dc_acc else dc_out
    flags = (bias is not None, opts.softcap is not None, targets.dtype)
    grad_pass = get_kernel("lce_budget.cu", template_name("lce_budget_grad", e.dtype, *flags))
    for r0 in range(0, n, plan.rows):
        r1 = min(n, r0 + plan.rows)
        rows = r1 - r0
        s = buf("s", np.float16, (plan.rows, plan.lds))[:rows]
        scales = buf("scales", np.float32, (plan.rows, plan.ntiles))[:rows]
        e_chunk = e[r0:r1]
        launch_forward(
            e_chunk,
            c,
            targets[r0:r1],
            bias,
            opts,
            lse_out[r0:r1],
            tgt_out[r0:r1],
            scratch=fwd_scratch,
            bad_target=bad_target,
            tune=tune,
            store=(s, scales),
        )
        grad_pass(
            (min(rows, _MAX_GRID),),
            (_GRAD_THREADS,),
            (
                s,
                np.int64(plan.lds),
                scales,
                np.int32(plan.ntiles),
                lse_out[r0:r1],
                row_grad[r0:r1],
                np.float32(opts.z_loss),
                targets[r0:r1],
                e_chunk,
                c,
                _ptr(bias),
                np.int32(rows),
                np.int32(v),
                np.int32(d),
                np.float32(opts.softcap or 0.0),
                np.float32(opts.label_smoothing),
            ),
        )
        g = s.view(e.dtype)[:, :v]  # the same bytes, now the logit gradient
        _gemm_rowmajor(g, c, de_out[r0:r1], trans_a=False, accumulate=False)
        _gemm_rowmajor(g, e_chunk, dc_target, trans_a=True, accumulate=r0 > 0)
        if dbias_out is not None:
            bias_grad = get_kernel("reductions.cu", template_name("lce_bias_grad", e.dtype, dbias_out.dtype, r0 > 0))
            bias_grad(
                (_cdiv(v, 32),),
                (32, 32),
                (g, _null(), dbias_out, np.int32(rows), np.int32(v), np.int64(plan.lds), np.int32(0), _null()),
            )
    if plan.dc_acc:
        dc_out[...] = dc_target


__all__ = ["BudgetPlan", "budget_applies", "budget_plan", "launch_fused_budgeted"]
