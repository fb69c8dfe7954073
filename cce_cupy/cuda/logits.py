"""The logits-level loss launcher (cross_entropy of materialized logits), on CuPy's current stream."""

from __future__ import annotations

import numpy as np

from cce_cupy.cuda import device
from cce_cupy.cuda.device import _ptr, target_error_flag
from cce_cupy.cuda.loader import get_kernel
from cce_cupy.cuda.plan import _cdiv
from cce_cupy.cuda.sources import (
    CE_CLUSTER_SIZES,
    CE_SLICE_BYTES_MAX,
    CE_SLICE_BYTES_SHARED_SM,
    THREADS,
    template_name,
)
from cce_cupy.options import CCEOptions


def launch_cross_entropy(logits, targets, opts: CCEOptions, lse_out, tgt_out, row_grad=None, bad_target=None):
    """Loss terms of materialized logits; with row_grad, dloss/dlogits written in place.

    In place on Hopper the row is read once (ce_logits_inplace_cluster holds it in the shared
    memory of a thread-block cluster); elsewhere ce_logits reads it a second time to write it.
    """
    n, v = logits.shape
    if n == 0:
        return
    if bad_target is None:
        bad_target = target_error_flag()
    flags = (opts.softcap is not None, opts.label_smoothing > 0.0)
    cluster = ce_cluster_size(logits) if row_grad is not None else None
    if cluster is None:
        kernel = get_kernel(
            "reductions.cu", template_name("ce_logits", logits.dtype, targets.dtype, *flags, row_grad is not None)
        )
        grid, smem = (n,), 0
    else:
        kernel = get_kernel(
            "reductions.cu", template_name("ce_logits_inplace_cluster", logits.dtype, targets.dtype, *flags, cluster)
        )
        grid, smem = (n * cluster,), _ce_slice_bytes(v, logits.itemsize, cluster)
    kernel(
        grid,
        (THREADS,),
        (
            logits,
            targets,
            _ptr(row_grad),
            lse_out,
            tgt_out,
            bad_target,
            np.int32(n),
            np.int32(v),
            np.float32(opts.softcap or 0.0),
            np.float32(opts.label_smoothing),
            np.float32(opts.z_loss),
            np.int64(opts.ignore_index),
        ),
        shared_mem=smem,
    )


def ce_cluster_size(logits) -> int | None:
    """Blocks per row of ce_logits_inplace_cluster for these logits, or None where it does not apply.

    It needs a Hopper GPU (clusters), rows that start on 16 bytes, and a row that fits the shared
    memory of at most 8 blocks. The smallest cluster whose slices let two blocks share an SM wins;
    failing that, the smallest whose slices fit at all.
    """
    import cupy

    n, v = logits.shape
    if device.KERNELS != "auto" or cupy.cuda.Device().compute_capability != "90":
        return None
    if (v * logits.itemsize) % 16 or logits.data.ptr % 16:
        return None
    for limit in (CE_SLICE_BYTES_SHARED_SM, CE_SLICE_BYTES_MAX):
        for cl in CE_CLUSTER_SIZES:
            if _ce_slice_bytes(v, logits.itemsize, cl) <= limit:
                return cl
    return None


def _ce_slice_bytes(v: int, itemsize: int, cluster: int) -> int:
    """Shared memory of one ce_logits_inplace_cluster block: its ceil(V / VEC / cluster) vectors."""
    return _cdiv(v * itemsize, 16 * cluster) * 16


__all__ = ["ce_cluster_size", "launch_cross_entropy"]
