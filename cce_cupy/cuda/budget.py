"""The memory-budgeted forward + backward: exact gradients for three GEMMs' work instead of four.

The lean path (forward.py, backward.py) recomputes the logits in the backward. With a budget, rows
are taken in chunks as large as it allows; the Hopper forward of each chunk also keeps its softmax
(lce_hopper.cu, STORE), and the backward reads it instead of recomputing. Two ways, by `mode`:

"row" (bf16; not label smoothing together with softcap or bias):
    the forward keeps s = exp(y - c) (times softcap') in bf16, with one shift c per row (the
    target logit, from lce_budget_shift), and the GEMMs read s itself: the logit gradient is
    a_i s'_ij - coef_q_i ls / V, with per-row factors a_i, s' = s but at the target column
    (lce_budget_rows), so dE = a * (s' @ C) - ... (lce_budget_de), dC = s'^T @ (a E) onto the
    smoothing term (lce_budget_dc_fill), dbias = s'^T @ a. No pass over s besides the GEMMs.
"tile" (fp16, and the option pairs above):
    the forward keeps fp16 s = exp(y - m) with one m per (row, 256-column tile); lce_budget_grad
    turns it in place into the logit gradient G; cuBLAS runs dE = G @ C, dC = G^T @ E; dbias is
    G's column sums.

With every row in one chunk, the dC output is scratch until its GEMM: buffers read for the last time
before it live in its bytes (_one_chunk), down to the kept softmax alone under a budget of its bytes.
With more than one chunk and 16-bit gradients, dC accumulates in an fp32 (V, D) buffer (one
rounding at the end, as the lean path's): inside the scratch, or, where the caller makes the dC
output only after the chunks (`dc_later`, the CuPy API), beside it, and then the output's bytes,
not yet allocated during the chunks, count toward the budget's room. Everything runs on CuPy's
current stream without a host sync.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from cce_cupy.cuda.device import _gemm_rowmajor, _null, _ptr, use_hopper
from cce_cupy.cuda.forward import KeptSoftmax, launch_forward
from cce_cupy.cuda.loader import get_kernel
from cce_cupy.cuda.plan import _cdiv, _round_up, forward_scratch_nbytes
from cce_cupy.cuda.sources import HOPPER_TILE_N, TILE_M, SoftmaxStore, dtype_name, template_name
from cce_cupy.options import CCEOptions, grad_dtype

# Smaller chunks run the lean path instead: their GEMMs are too thin. Measured on an H200 (bf16,
# benchmarks/dev/budget_timing.py): gemma2 in 1536-row chunks 1.30x the three GEMMs (lean 1.49x);
# llama3 in 128-row chunks 3.9x.
MIN_CHUNK_ROWS = 1024
_MAX_GRID = 65535
_ALIGN = 256  # bytes between the scratch buffers
_SPLIT_ALIGN = 64  # columns of s where dC's GEMM splits (_one_chunk)
_ROW_THREADS = 128  # lce_budget_rows
_ELEMENTWISE_BLOCKS = 132 * 8  # grid-stride kernels (lce_budget_de, lce_budget_dc_fill)


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """How one call runs under a memory budget (all sizes in bytes)."""

    mode: str  # "row" or "tile" (see the module doc)
    rows: int  # per chunk
    lds: int  # row stride of the kept softmax, in elements (V rounded up to 8: 16-byte rows)
    dc_acc: bool  # an fp32 dC accumulator (several chunks, 16-bit gradients)
    offsets: tuple  # (name, (offset, size)) of each buffer in the scratch (a tuple: plans are hashable)
    nbytes: int  # the scratch buffer: everything the path allocates beyond its outputs (but acc_apart's)
    # dc_acc outside the scratch: the caller allocates the fp32 (V, D) accumulator, passes it as dc_out,
    # frees the scratch after the call and only then makes the dC output from it (budget_plan's dc_later)
    acc_apart: bool = False
    # One chunk only: buffers kept in the dC output's bytes, (name, (offset, size)) from its start,
    # each read for the last time before dC's GEMM writes over it. dc_split > 0 (row mode): x, a_f
    # and a_t among them, in dC's last rows, and dC's GEMM in two: rows [0, dc_split) before the dE
    # GEMM, the rest after lce_budget_de has read x (_row_mode).
    in_dc: tuple = ()
    dc_split: int = 0


def budget_mode(dtype, opts: CCEOptions, has_bias: bool) -> str:
    """ "row" where the GEMMs can read the kept softmax directly, else "tile" (module doc)."""
    smoothing_not_rank1 = opts.label_smoothing > 0 and (opts.softcap is not None or has_bias)
    return "row" if dtype_name(dtype) == "bfloat16" and not smoothing_not_rank1 else "tile"


def _buffers(mode: str, rows: int, n: int, v: int, d: int, dtype, opts: CCEOptions, dc_acc: bool) -> dict:
    """Bytes of each scratch buffer of a plan with `rows` rows a chunk (0: the fixed part only)."""
    lds = _round_up(v, 8)
    # The forward's partials follow its grid's splits, not the rows: a short last chunk can need more.
    chunk_rows = {r1 - r0 for r0, r1 in _chunks(n, rows)} if rows else set()
    forward = max((forward_scratch_nbytes(r, v, d, dtype) for r in chunk_rows), default=0)
    sizes = {"s": rows * lds * 2, "forward": forward}
    if mode == "tile":
        sizes["scales"] = rows * _cdiv(v, HOPPER_TILE_N) * 4
    else:
        # a E is kept in the dE output until dC's GEMM has read it; s C goes to an fp32 buffer, or
        # straight into an fp32 dE.
        sizes.update(shift=rows * 4, z_target=rows * 4, a_f=rows * 4, a_t=rows * 2, unsafe=rows * 4)
        sizes["x"] = rows * d * 4 if grad_dtype(dtype, opts) != np.float32 else 0
        if opts.label_smoothing:
            sizes.update(ones=v * 2, colsum=d * 4, rg_t=n * 2, w=d * 4)
    sizes["dc_acc"] = v * d * 4 if dc_acc else 0
    return sizes


def _layout(sizes: dict) -> tuple[tuple, int]:
    """Each buffer's (offset, size), one after another at _ALIGN-byte starts, and the bytes they span."""
    offsets, off, end = [], 0, 0
    for name, size in sizes.items():
        offsets.append((name, (off if size else 0, size)))
        if size:  # an empty buffer takes no room
            end = off + size
            off = _round_up(end, _ALIGN)
    return tuple(offsets), end


def budget_plan(
    n: int, v: int, d: int, dtype, opts: CCEOptions, has_bias: bool = False, dc_later: bool = False
) -> BudgetPlan | None:
    """The chunking for `opts.memory_budget`, or None where the lean path runs instead: no budget,
    an empty problem, or a budget too small for all rows at once or MIN_CHUNK_ROWS a chunk.

    The budget bounds what the call holds beyond its inputs and outputs. dc_later: the caller makes
    the dC output only after the chunks (acc_apart), so a plan with an fp32 dC accumulator may hold,
    during the chunks, the accumulator and a scratch of up to budget + (dC output's bytes) -
    (accumulator's bytes); afterwards the accumulator alone (within the budget) beside the outputs."""
    if opts.memory_budget == "lean" or n == 0 or v == 0:
        return None
    # budget_mode stays outside the cache: tests force the tile mode through it
    return _plan(n, v, d, np.dtype(dtype), opts, budget_mode(dtype, opts, has_bias), dc_later)


@functools.lru_cache(maxsize=64)  # a call's plan is usually its last call's; ~0.05 ms of host time before the forward
def _plan(n: int, v: int, d: int, dtype: np.dtype, opts: CCEOptions, mode: str, dc_later: bool) -> BudgetPlan | None:
    budget = opts.memory_budget
    lds = _round_up(v, 8)
    whole = _one_chunk(n, v, d, dtype, opts, mode, budget)
    if whole is not None:
        return whole
    gdt = grad_dtype(dtype, opts)
    dc_acc = gdt != np.float32
    apart = dc_acc and dc_later
    room = budget
    if apart:
        if v * d * 4 > budget:  # the accumulator beside the outputs, after the chunks
            return None
        room = budget + v * d * gdt.itemsize - v * d * 4
    # Every buffer but the forward's grows linearly in rows: a first guess from those, then down a
    # tile of rows at a time until the whole layout fits (the forward's scratch is not linear).
    in_scratch = dc_acc and not apart
    fixed = _layout(_buffers(mode, 0, n, v, d, dtype, opts, in_scratch))[1] + forward_scratch_nbytes(n, v, d, dtype)
    sizes = _buffers(mode, TILE_M, n, v, d, dtype, opts, False)
    per_row = _cdiv(sum(size for name, size in sizes.items() if name != "forward"), TILE_M) + 1
    rows = (room - fixed - _ALIGN * len(sizes)) // per_row // TILE_M * TILE_M if room > fixed else 0
    rows = min(rows, n)
    while rows >= MIN_CHUNK_ROWS:
        offsets, nbytes = _layout(_buffers(mode, rows, n, v, d, dtype, opts, in_scratch))
        if nbytes <= room:
            return BudgetPlan(mode, rows, lds, dc_acc, offsets, nbytes, apart)
        rows -= TILE_M
    return None


def _one_chunk(n: int, v: int, d: int, dtype: np.dtype, opts: CCEOptions, mode: str, budget: int) -> BudgetPlan | None:
    """The plan that takes every row at once, or None where it is over the budget.

    The dC output is allocated for such a call and written last, so buffers read for the last time
    before its GEMM live in its bytes: the forward's, and the row mode's shifts (not with label
    smoothing, whose dC fill comes before their last read). Where the rest is still over the budget,
    the row mode (16-bit gradients, no label smoothing) also puts x, a_f and a_t in dC's last rows,
    and splits dC's GEMM around the dE GEMM (_row_mode): what the call holds is then its kept
    softmax alone, for one more cuBLAS launch and a copy of a E (N x D)."""
    sizes = _buffers(mode, n, n, v, d, dtype, opts, False)
    row_bytes = d * grad_dtype(dtype, opts).itemsize
    dc_nbytes = v * row_bytes
    if mode == "tile":
        early = ("forward", "scales")
    else:
        early = ("forward",) if opts.label_smoothing else ("forward", "shift", "z_target", "unsafe")
    head, head_size = _layout({k: sizes[k] for k in early})
    if head_size > dc_nbytes:
        head, head_size, early = (), 0, ()
    offsets, nbytes = _layout({k: sz for k, sz in sizes.items() if k not in early})
    if nbytes <= budget:
        return BudgetPlan(mode, n, _round_up(v, 8), False, offsets, nbytes, in_dc=head)
    if mode != "row" or not sizes["x"] or opts.label_smoothing:
        return None
    # x, a_f, a_t at dC's end, above whole rows of it (the early buffers stay at its start: they
    # are dead before the first dC GEMM writes there); s's first D columns then hold a E (_row_mode).
    late = ("a_f", "a_t", "x")
    tail, tail_size = _layout({k: sizes[k] for k in late})
    base = (dc_nbytes - tail_size) // _ALIGN * _ALIGN
    # cuBLAS runs its fast kernels only on 16-byte aligned operands: the split, the second GEMM's
    # first column of s, a multiple of _SPLIT_ALIGN (an odd one ran dC's GEMM 2x slower)
    dc_split = max(base, 0) // row_bytes // _SPLIT_ALIGN * _SPLIT_ALIGN
    if dc_split < d or head_size > base:
        return None
    in_dc = head + tuple((k, (base + off, sz)) for k, (off, sz) in tail)
    offsets, nbytes = _layout({k: sz for k, sz in sizes.items() if k not in early + late})
    if nbytes <= budget:
        return BudgetPlan(mode, n, _round_up(v, 8), False, offsets, nbytes, in_dc=in_dc, dc_split=dc_split)
    return None


def budget_applies(e, c, opts: CCEOptions) -> bool:
    """The budgeted path can run these inputs: a budget (CCEOptions refuses one with filter_eps),
    and the Hopper forward's inputs (bf16 / fp16, 16-byte aligned rows) on an sm_90 GPU."""
    return opts.memory_budget != "lean" and use_hopper(e, c, ld=e.shape[1])


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
    cce_cupy.options.row_coefficients, which does not depend on the lse (the kernels derive coef_p
    from it and the lse, z-loss included); or a function that returns it, called once the first
    chunk's forward is launched, so that the host forms it while the GPU runs the forward (on an
    idle GPU, host time before the forward is GPU time). scratch: uint8, plan.nbytes. Gradients are written
    whole (not accumulated into): dE, dC and dbias in grad_dtype, but dc_out is the fp32 (V, D)
    accumulator itself with plan.acc_apart (the caller casts it). bad_target, tune: as launch_forward.
    """
    offsets, in_dc = dict(plan.offsets), dict(plan.in_dc)
    if in_dc and (not dc_out.flags.c_contiguous or dc_out.data.ptr % 16):
        raise ValueError(
            "launch_fused_budgeted: dc_out must be C-contiguous and 16-byte aligned (buffers of the plan are in it)"
        )
    dc_bytes = dc_out.reshape(-1).view(np.uint8) if in_dc else None

    def buf(name, dtype, shape):
        base, (off, size) = (dc_bytes, in_dc[name]) if name in in_dc else (scratch, offsets[name])
        return base[off : off + size].view(dtype).reshape(shape)

    run = _row_mode if plan.mode == "row" else _tile_mode
    v, d = c.shape
    in_scratch = plan.dc_acc and not plan.acc_apart
    dc_target = buf("dc_acc", np.float32, (v, d)) if in_scratch else dc_out
    run(
        e, c, targets, bias, opts, plan, row_grad, lse_out, tgt_out, de_out, dc_target, dbias_out, buf, bad_target, tune
    )
    if in_scratch:
        dc_out[...] = dc_target


def launch_target_logits(
    e, c, targets, bias, opts: CCEOptions, row_grad, shift_out, z_target_out, unsafe_out=None
) -> None:
    """Each row's target logit y_t (softcapped, with bias) into shift_out and its logit before
    softcap into z_target_out, by a gather-dot (lce_budget_shift); +inf in shift_out for a row with
    target ignore_index or outside [0, V), or, where row_grad is given, without gradient (row_grad
    0). unsafe_out (int32, optional): zeroed (the ROW forward's start value). All (N,) fp32 but e,
    c, targets and unsafe_out."""
    n, d = e.shape
    v = c.shape[0]
    flags = (bias is not None, opts.softcap is not None, targets.dtype)
    get_kernel("lce_budget.cu", template_name("lce_budget_shift", e.dtype, *flags))(
        (_cdiv(n, 8),),
        (256,),
        (e, c, _ptr(bias), targets, _ptr(row_grad), np.int64(opts.ignore_index), shift_out, z_target_out,
         _ptr(unsafe_out), np.int32(n), np.int32(v), np.int32(d), np.float32(opts.softcap or 0.0)),
    )  # fmt: skip


def _made(row_grad):
    """launch_fused_budgeted's row_grad: the array, made now where a function was given."""
    return row_grad() if callable(row_grad) else row_grad


def _smoothing_terms(e, c, opts, row_grad, dc, buf):
    """Label smoothing's rank-1 terms of the row mode: colsum = sum_j C_j (returned, (1, D) fp32,
    for dE), and dC set to -(ls / V) w, w = sum_i coef_q_i E_i, for its GEMMs to accumulate onto."""
    n, d = e.shape
    v = c.shape[0]
    ones = buf("ones", e.dtype, (1, v))
    ones.fill(1)
    colsum = buf("colsum", np.float32, (1, d))
    _gemm_rowmajor(ones, c, colsum, trans_a=False, accumulate=False)
    rg_t = buf("rg_t", e.dtype, (1, n))
    rg_t[0] = row_grad
    w = buf("w", np.float32, (1, d))
    _gemm_rowmajor(rg_t, e, w, trans_a=False, accumulate=False)
    fill = get_kernel("lce_budget.cu", template_name("lce_budget_dc_fill", dc.dtype))
    fill((_ELEMENTWISE_BLOCKS,), (256,), (dc, w, np.float32(opts.label_smoothing / v), np.int32(v), np.int32(d)))
    return colsum


def _chunks(n: int, rows: int):
    """(first, end) row of each chunk of `rows` rows over n (the last one may be shorter)."""
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows)


def _tile_mode(e, c, targets, bias, opts, plan, row_grad, lse, tgt, de, dc, dbias, buf, bad_target, tune):
    n, d = e.shape
    v = c.shape[0]
    ntiles = _cdiv(v, HOPPER_TILE_N)
    fwd_scratch = buf("forward", np.uint8, (-1,))
    flags = (bias is not None, opts.softcap is not None, targets.dtype)
    grad_pass = get_kernel("lce_budget.cu", template_name("lce_budget_grad", e.dtype, *flags))
    for r0, r1 in _chunks(n, plan.rows):
        rows = r1 - r0
        s = buf("s", np.float16, (plan.rows, plan.lds))[:rows]
        scales = buf("scales", np.float32, (plan.rows, ntiles))[:rows]
        e_chunk = e[r0:r1]
        store = KeptSoftmax(SoftmaxStore.TILE, s, scales=scales)
        launch_forward(
            e_chunk, c, targets[r0:r1], bias, opts, lse[r0:r1], tgt[r0:r1], fwd_scratch, bad_target, tune, store
        )
        row_grad = _made(row_grad)
        grad_pass(
            (min(rows, _MAX_GRID),),
            (256,),
            (
                s,
                np.int64(plan.lds),
                scales,
                np.int32(ntiles),
                lse[r0:r1],
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
        _gemm_rowmajor(g, c, de[r0:r1], trans_a=False, accumulate=False)
        _gemm_rowmajor(g, e_chunk, dc, trans_a=True, accumulate=r0 > 0)
        if dbias is not None:
            bias_grad = get_kernel("reductions.cu", template_name("lce_bias_grad", e.dtype, dbias.dtype, r0 > 0))
            bias_grad(
                (_cdiv(v, 32),),
                (32, 32),
                (g, _null(), dbias, np.int32(rows), np.int32(v), np.int64(plan.lds), np.int32(0), _null()),
            )


def _row_mode(e, c, targets, bias, opts, plan, row_grad, lse, tgt, de, dc, dbias, buf, bad_target, tune):
    n, d = e.shape
    v = c.shape[0]
    f32 = np.float32
    has_bias, softcap = bias is not None, opts.softcap is not None
    fwd_scratch = buf("forward", np.uint8, (-1,))
    colsum = None
    for r0, r1 in _chunks(n, plan.rows):
        rows = r1 - r0
        whole = rows == n  # one chunk (the usual case): no views of the row ranges to make
        e_chunk, t_chunk, lse_chunk = (x if whole else x[r0:r1] for x in (e, targets, lse))
        # Only what the forward needs comes before it: on an idle GPU, host time spent here is GPU time.
        s = buf("s", e.dtype, (plan.rows, plan.lds))[:rows]
        shift, z_target, unsafe = (
            buf(k, dt, (plan.rows,))[:rows] for k, dt in (("shift", f32), ("z_target", f32), ("unsafe", np.int32))
        )
        # A row_grad still to be made is not waited for: rows without gradient then keep their s (cost only).
        known = None if callable(row_grad) else row_grad if whole else row_grad[r0:r1]
        launch_target_logits(e_chunk, c, t_chunk, bias, opts, known, shift, z_target, unsafe)
        store = KeptSoftmax(SoftmaxStore.ROW, s, row_shift=shift, unsafe=unsafe)
        launch_forward(
            e_chunk,
            c,
            t_chunk,
            bias,
            opts,
            lse_chunk,
            tgt if whole else tgt[r0:r1],
            fwd_scratch,
            bad_target,
            tune,
            store,
        )
        if r0 == 0:
            row_grad = _made(row_grad)
            if opts.label_smoothing:
                colsum = _smoothing_terms(e, c, opts, row_grad, dc, buf)
        rg_chunk = row_grad if whole else row_grad[r0:r1]
        a_f = buf("a_f", f32, (plan.rows,))[:rows]
        a_t = buf("a_t", e.dtype, (plan.rows, 1))[:rows]
        de_chunk = de if whole else de[r0:r1]
        # a E (rows, D) in the dE output's bytes (their first half when dE is fp32), read by the dC
        # GEMM before s C is written: into an fp32 buffer, or into an fp32 dE itself.
        e_scaled = de_chunk.reshape(-1).view(e.dtype)[: rows * d].reshape(rows, d)
        x = de_chunk if de.dtype == f32 else buf("x", f32, (plan.rows, d))[:rows]
        grid = (min(rows, _MAX_GRID),)
        recompute = get_kernel("lce_budget.cu", template_name("lce_budget_recompute", e.dtype, has_bias, softcap))
        recompute(
            grid,
            (256,),
            (
                unsafe,
                s,
                np.int64(plan.lds),
                shift,
                lse_chunk,
                e_chunk,
                c,
                _ptr(bias),
                np.int32(rows),
                np.int32(v),
                np.int32(d),
                f32(opts.softcap or 0.0),
            ),
        )
        rows_kernel = get_kernel(
            "lce_budget.cu", template_name("lce_budget_rows", e.dtype, has_bias, softcap, targets.dtype)
        )
        rows_kernel(
            grid,
            (_ROW_THREADS,),
            (
                s,
                np.int64(plan.lds),
                lse_chunk,
                rg_chunk,
                f32(opts.z_loss),
                t_chunk,
                shift,
                z_target,
                e_chunk,
                e_scaled,
                a_t,
                a_f,
                np.int32(rows),
                np.int32(v),
                np.int32(d),
                f32(opts.softcap or 0.0),
                f32(opts.label_smoothing),
            ),
        )
        sv = s[:, :v]
        split = plan.dc_split  # > 0: x, a_f, a_t in dC's rows [split, V)
        first = slice(0, split or v)
        _gemm_rowmajor(sv[:, first], e_scaled, dc[first], trans_a=True, accumulate=r0 > 0 or colsum is not None)
        if dbias is not None:
            _gemm_rowmajor(sv, a_t, dbias.reshape(v, 1), trans_a=True, accumulate=r0 > 0)
        _gemm_rowmajor(sv, c, x, trans_a=False, accumulate=False)
        if split:
            # dE is written over a E next, and dC's last rows (x's bytes) only after that: a E moves
            # to s's first D columns, which nothing reads any more.
            e_kept = s[:, :d]
            e_kept.view(np.uint16)[...] = e_scaled.view(np.uint16)
        de_kernel = get_kernel("lce_budget.cu", template_name("lce_budget_de", de.dtype))
        de_kernel(  # in place where x is dE (each element read, then written, by one thread)
            (_ELEMENTWISE_BLOCKS,),
            (256,),
            (x, a_f, rg_chunk, _ptr(colsum), f32(opts.label_smoothing / v), de_chunk, np.int32(rows), np.int32(d)),
        )
        if split:
            _gemm_rowmajor(sv[:, split:], e_kept, dc[split:], trans_a=True, accumulate=False)


__all__ = [
    "BudgetPlan",
    "budget_applies",
    "budget_mode",
    "budget_plan",
    "launch_fused_budgeted",
    "launch_target_logits",
]
