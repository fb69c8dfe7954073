"""The sparse filtered backward on Hopper (lce_grad_sparse_sm90, lce_sparse.cu): per-row lists of
the non-negligible gradient elements, sorted by column, summed into dE and dC. Run by
cce_cupy.cuda.backward.launch_backward where plan.sparse_slots() allows.
"""

from __future__ import annotations

import numpy as np

from cce_cupy.cuda.device import _ptr, hopper_operands, hopper_row_blocks
from cce_cupy.cuda.loader import get_kernel
from cce_cupy.cuda.plan import _cdiv, forward_splits
from cce_cupy.cuda.sources import HOPPER_SMEM_BYTES, HOPPER_THREADS, HOPPER_TILE_N, template_name


def _sparse_backward(
    e, c, targets, bias, opts, eps, lse, coef_p, coef_q, de_out, dc_out, dbias_out, counts, lists, slots, cluster
):
    """The five steps of the sparse filtered backward (lce_hopper.cu, lce_sparse.cu); returns its
    overflow flag ((1,) int32 on the device: 1 if some row had more than `slots` elements, and
    then nothing was written)."""
    import cupy

    n, d = e.shape
    v = c.shape[0]
    overflow, row_count, col_count = counts[:1], counts[1 : 1 + n], counts[1 + n :]
    cupy.cuda.runtime.memsetAsync(counts.data.ptr, 0, counts.nbytes, cupy.cuda.get_current_stream().ptr)
    col_start, entries, by_col = lists["col_start"], lists["entries"], lists["by_col"]
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
            entries,
            row_count,
            overflow,
            np.int32(n),
            np.int32(v),
            np.int32(d),
            np.int32(per_split),
            np.int32(slots),
            np.float32(opts.softcap or 0.0),
            np.float32(np.log(eps)),
        ),
        shared_mem=HOPPER_SMEM_BYTES,
    )

    def sparse(name):
        return get_kernel("lce_sparse.cu", name)

    warp_rows = (_cdiv(n, 8),), (256,)  # one warp per row
    sparse("sparse_count_cols")(*warp_rows, (entries, row_count, col_count, overflow, np.int32(n), np.int32(slots)))
    sparse("sparse_scan_cols")((1,), (1024,), (col_count, col_start, overflow, np.int32(v)))
    sparse("sparse_scatter_cols")(
        *warp_rows, (entries, row_count, col_count, col_start, by_col, overflow, np.int32(n), np.int32(slots))
    )
    sparse(template_name("sparse_grad_rows", e.dtype, de_out.dtype))(
        (n,), (128,), (c, entries, row_count, overflow, de_out, np.int32(d), np.int32(slots))
    )
    sparse(template_name("sparse_grad_cols", e.dtype, dc_out.dtype, dbias_out is not None))(
        (v,), (128,), (e, by_col, col_start, overflow, dc_out, _ptr(dbias_out), np.int32(d))
    )
    return overflow
