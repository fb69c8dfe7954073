"""The certified filtered backward on Hopper, its list kernels (lce_grad_sparse_sm90 in
lce_hopper.cu, lce_sparse.cu): per-row lists of candidate gradient elements, a per-row certificate
that sends every other row to the exact path, and the sums of dE and dC over the lists of the
certified rows. Run by cce_cupy.cuda.backward.launch_backward where plan.sparse_slots() allows; see
docs/design.md, "Certified filtering".
"""

from __future__ import annotations

import numpy as np

from cce_cupy.cuda.device import _ptr, hopper_operands, hopper_row_blocks
from cce_cupy.cuda.loader import get_kernel
from cce_cupy.cuda.plan import _cdiv, forward_splits
from cce_cupy.cuda.sources import HOPPER_SMEM_BYTES, HOPPER_THREADS, HOPPER_TILE_N, template_name
from cce_cupy.options import analytic_smoothing, certificate_margin

COLSUM_ROWS = 256  # rows a block of sparse_weighted_colsum sums


def zero_fill(a) -> None:
    """Zeroes a contiguous CuPy array on the current stream: a memset, no kernel (safe inside
    CUDA-graph capture and XLA's callbacks)."""
    import cupy

    cupy.cuda.runtime.memsetAsync(a.data.ptr, 0, a.nbytes, cupy.cuda.get_current_stream().ptr)


def _kernel(name):
    return get_kernel("lce_sparse.cu", name)


def build_lists(e, c, targets, bias, opts, lse, coef_p, coef_q, bufs, slots, cluster) -> None:
    """Step 1: the candidate lists and each row's dropped mass, by a recompute (lce_grad_sparse_sm90).
    (cce_cupy.cuda.filtered has the forward collect them instead.)"""
    n, d = e.shape
    v = c.shape[0]
    counts = bufs["counts"]
    row_count = counts[1 : 1 + n]
    zero_fill(counts)
    zero_fill(bufs["dropped"])
    eps = opts.resolved_filter_eps()
    splits, per_split = forward_splits(n, v, HOPPER_TILE_N)
    recompute = get_kernel(
        "lce_hopper.cu",
        template_name(
            "lce_grad_sparse_sm90", cluster, e.dtype, bias is not None, opts.softcap is not None, targets.dtype
        ),
    )
    recompute(
        (hopper_row_blocks(n, cluster), splits),
        (HOPPER_THREADS,),
        (
            *hopper_operands(e, c, cluster),
            _ptr(bias),
            targets,
            lse,
            coef_p,
            coef_q,
            bufs["entries"],
            row_count,
            bufs["dropped"],
            np.int32(n),
            np.int32(v),
            np.int32(d),
            np.int32(per_split),
            np.int32(slots),
            np.float32(opts.softcap or 0.0),
            np.float32(np.log(eps)),
            np.float32(opts.label_smoothing),
        ),
        shared_mem=HOPPER_SMEM_BYTES,
    )


def certify(opts, coef_p, coef_q, bufs, n: int, v: int, slots: int) -> None:
    """Step 2: the certificate (sparse_certify_rows). Afterwards bufs["counts"][0] is the number of
    uncertified rows, listed in bufs["fallback_rows"]; their coefficients are in
    bufs["fb_coef_p"/"fb_coef_q"] (0 for certified rows), and their row_count is -1 (the sums skip
    them). The uncertified-row count starts at 0 here."""
    counts = bufs["counts"]
    fallback, row_count = counts[:1], counts[1 : 1 + n]
    zero_fill(fallback)
    tol = opts.resolved_filter_tol()
    ls = opts.label_smoothing
    _kernel("sparse_certify_rows")(
        (_cdiv(n, 8),),
        (256,),
        (
            bufs["entries"],
            row_count,
            bufs["dropped"],
            coef_p,
            coef_q,
            fallback,
            bufs["fallback_rows"],
            bufs["fb_coef_p"],
            bufs["fb_coef_q"],
            bufs["cert_q"],
            np.int32(n),
            np.int32(v),
            np.int32(slots),
            np.float32(tol),
            np.float32(certificate_margin(v)),
            np.float32(ls / v if analytic_smoothing(opts) else 0.0),
            np.float32(ls if ls > 0.0 and not analytic_smoothing(opts) else 0.0),
        ),
    )


def _weighted_colsum(src, weights, out) -> None:
    """out[:D] = sum_i w_i src[i], out[D] = sum_i w_i (fp32; w_i = 1 when weights is None)."""
    rows, d = src.shape
    zero_fill(out)
    _kernel(template_name("sparse_weighted_colsum", src.dtype))(
        (_cdiv(d, 256), _cdiv(rows, COLSUM_ROWS)),
        (256,),
        (src, _ptr(weights), np.int32(rows), np.int32(d), np.int32(COLSUM_ROWS), out),
    )


def sum_lists(e, c, opts, coef_q, bufs, slots, de_out, dc_out, dbias_out, accumulate_if=None) -> None:
    """Steps 3-5: dE of the certified rows (uncertified rows are left alone), dC and dbias of them
    (overwritten, or added to while the device flag `accumulate_if` is set)."""
    n, d = e.shape
    v = c.shape[0]
    counts, entries, by_col, col_start = bufs["counts"], bufs["entries"], bufs["by_col"], bufs["col_start"]
    row_count, col_count = counts[1 : 1 + n], counts[1 + n :]
    smooth_c = smooth_w = None
    scale = np.float32(-opts.label_smoothing / v)
    if analytic_smoothing(opts):
        smooth_c, smooth_w = bufs["smooth"][: d + 1], bufs["smooth"][d + 1 :]
        _weighted_colsum(c, None, smooth_c)  # sum_j C[j]
        _weighted_colsum(e, bufs["cert_q"], smooth_w)  # sum_i coef_q[i] E[i] over certified rows
    warp_rows = (_cdiv(n, 8),), (256,)  # one warp per row
    _kernel("sparse_count_cols")(*warp_rows, (entries, row_count, col_count, np.int32(n), np.int32(slots)))
    _kernel("sparse_scan_cols")((1,), (1024,), (col_count, col_start, np.int32(v)))
    _kernel("sparse_scatter_cols")(
        *warp_rows, (entries, row_count, col_count, col_start, by_col, np.int32(n), np.int32(slots))
    )
    _kernel(template_name("sparse_grad_rows", e.dtype, de_out.dtype))(
        (n,), (128,), (c, entries, row_count, coef_q, _ptr(smooth_c), scale, de_out, np.int32(d), np.int32(slots))
    )
    _kernel(template_name("sparse_grad_cols", e.dtype, dc_out.dtype, dbias_out is not None))(
        (v,),
        (128,),
        (e, by_col, col_start, _ptr(smooth_w), scale, _ptr(accumulate_if), dc_out, _ptr(dbias_out), np.int32(d)),
    )
