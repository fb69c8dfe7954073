"""The forward launcher: per-row lse and target term, on CuPy's current stream, into outputs the
caller provides (the CuPy API allocates them, the JAX bridge hands in XLA buffers and scratch).
Shapes and dtypes are checked by the API layers, not here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from cce_cupy.cuda import autotune
from cce_cupy.cuda.device import (
    _aligned,
    _ptr,
    gpu_name,
    hopper_operands,
    hopper_row_blocks,
    target_error_flag,
    tma_desc,
    use_hopper,
)
from cce_cupy.cuda.loader import get_kernel
from cce_cupy.cuda.plan import _cdiv, _forward_target_offset, forward_scratch_nbytes, forward_splits
from cce_cupy.cuda.sources import (
    GEMM_SMEM_BYTES,
    HOPPER_SMEM_BYTES,
    HOPPER_STAGING_BYTES,
    HOPPER_THREADS,
    HOPPER_TILE_N,
    THREADS,
    TILE_M,
    TILE_N,
    SoftmaxStore,
    dtype_name,
    template_name,
)
from cce_cupy.options import CCEOptions

# The kernel's tmap_s where it is unused (STORE other than ROW): 128 zero bytes.
_NO_TMA_MAP = np.zeros(1, dtype=np.dtype((np.void, 128)))
HOPPER_STAGING_ROWS = 16  # a consumer warp's rows: the TMA box of tmap_s is 16 x 64


class KeptSoftmax(NamedTuple):
    """What the Hopper forward also keeps for the memory-budgeted backward (lce_hopper.cu, STORE):
    mode TILE: s (N, lds) fp16 and scales (N, ceil(V / 256)) fp32; mode ROW: s (N, lds) in the input
    type (bf16), row_shift (N,) fp32 and unsafe (N,) int32 flags."""

    mode: SoftmaxStore
    s: Any
    scales: Any = None
    row_shift: Any = None
    unsafe: Any = None


def launch_forward(
    e,
    c,
    targets,
    bias,
    opts: CCEOptions,
    lse_out,
    tgt_out,
    scratch=None,
    bad_target=None,
    tune: bool = True,
    store=None,
):
    """Per-row lse and target term of softcap(e @ c.T + bias); see CONTRACT.md.

    tune: on Hopper, a shape class seen for the first time may be timed with each kernel variant
    (cce_cupy.cuda.autotune; it synchronizes once; tune() does it ahead). False (JAX callbacks): cached choice
    or default.
    store: None, or a KeptSoftmax for the memory-budgeted backward (cce_cupy.cuda.budget; Hopper
    only): each row's softmax is also written as the STORE contract of lce_forward_partials_sm90
    (lce_hopper.cu) says.
    """
    import cupy

    n, d = e.shape
    v = c.shape[0]
    if n == 0:
        return
    hopper = use_hopper(e, c, ld=d, tf32=opts.allow_tf32)
    if store is not None and not hopper:
        raise ValueError("store= needs the Hopper forward (16-bit inputs on an sm_90 GPU, 16-byte aligned rows)")
    st = store or KeptSoftmax(SoftmaxStore.NONE, None)
    splits, per_split = forward_splits(n, v, HOPPER_TILE_N if hopper else TILE_N)
    need = forward_scratch_nbytes(n, v, d, e.dtype)
    if scratch is None:
        scratch = cupy.empty(need, dtype=cupy.uint8)
    elif scratch.nbytes < need:  # the kernels would write past it
        raise ValueError(
            f"launch_forward: scratch has {scratch.nbytes} bytes; {n} rows need {need} (forward_scratch_nbytes)"
        )
    part = scratch[: 3 * splits * n * 4].view(cupy.float32)
    # The tiled forward hands the finish kernel its target logits; the Hopper one leaves null (gather-dot).
    y_off = _forward_target_offset(n, v)
    y_target = None if hopper else scratch[y_off : y_off + n * 4].view(cupy.float32)
    if bad_target is None:
        bad_target = target_error_flag()
    flags = (bias is not None, opts.softcap is not None, opts.label_smoothing > 0.0)
    softcap = np.float32(opts.softcap or 0.0)

    if hopper:
        # ROW writes s through TMA: a map of its first V columns (no store past them), 16 x 64 boxes.
        s_map = tma_desc(st.s[:, :v], HOPPER_STAGING_ROWS) if st.mode == SoftmaxStore.ROW else _NO_TMA_MAP

        def run_partials(cluster: int) -> None:
            name = template_name("lce_forward_partials_sm90", cluster, e.dtype, *flags, st.mode)
            partials = get_kernel("lce_hopper.cu", name)
            partials(
                (hopper_row_blocks(n, cluster), splits),
                (HOPPER_THREADS,),
                (
                    *hopper_operands(e, c, cluster),
                    s_map,
                    _ptr(bias),
                    part,
                    np.int32(n),
                    np.int32(v),
                    np.int32(d),
                    np.int32(per_split),
                    softcap,
                    _ptr(st.s),
                    np.int64(0 if st.s is None else st.s.shape[1]),
                    _ptr(st.scales),
                    np.int32(0 if st.scales is None else st.scales.shape[1]),
                    _ptr(st.row_shift),
                    _ptr(st.unsafe),
                ),
                shared_mem=HOPPER_SMEM_BYTES + (HOPPER_STAGING_BYTES if st.mode == SoftmaxStore.ROW else 0),
            )

        def time_candidate(cluster: int) -> float:
            return autotune.time_on_stream(lambda: run_partials(cluster))

        run_partials(
            autotune.hopper_cluster(gpu_name(), dtype_name(e.dtype), n, d, v, time_candidate if tune else None)
        )
    else:
        partials = get_kernel("lce_forward.cu", template_name("lce_forward_partials", e.dtype, *flags, targets.dtype))
        partials(
            (_cdiv(n, TILE_M), splits),
            (THREADS,),
            (
                e,
                c,
                _ptr(bias),
                targets,
                part,
                y_target,
                np.int32(n),
                np.int32(v),
                np.int32(d),
                np.int32(per_split),
                softcap,
                np.int32(_aligned(e, c, ld=d)),
            ),
            shared_mem=GEMM_SMEM_BYTES,
        )
    finish = get_kernel("lce_forward.cu", template_name("lce_forward_finish", e.dtype, *flags, targets.dtype))
    rows_per_block = THREADS // 32
    finish(
        (_cdiv(n, rows_per_block),),
        (THREADS,),
        (
            e,
            c,
            _ptr(bias),
            targets,
            part,
            _ptr(y_target),
            lse_out,
            tgt_out,
            bad_target,
            np.int32(n),
            np.int32(v),
            np.int32(d),
            np.int32(splits),
            softcap,
            np.float32(opts.label_smoothing),
            np.int64(opts.ignore_index),
            np.int32(hopper and e.dtype == np.float32),
        ),
    )


def tune(n: int, d: int, v: int, dtype="bfloat16") -> int:
    """Tune the Hopper kernels for one shape ahead of time (e.g. before a JAX training loop, whose
    callbacks never tune), on random inputs; returns the cluster size now cached (cce_cupy.cuda.autotune)."""
    import cupy
    import ml_dtypes

    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    e = cupy.random.standard_normal((n, d), dtype=cupy.float32).astype(dt)
    c = cupy.random.standard_normal((v, d), dtype=cupy.float32).astype(dt)
    t = cupy.zeros(n, cupy.int32)
    lse, tgt = cupy.empty(n, cupy.float32), cupy.empty(n, cupy.float32)
    launch_forward(e, c, t, None, CCEOptions(), lse, tgt)
    return autotune.hopper_cluster(gpu_name(), np.dtype(dt).name, n, d, v)


__all__ = ["KeptSoftmax", "launch_forward", "tune"]
