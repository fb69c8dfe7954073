"""CuPy launchers: grids, scratch layout and kernel choice for flattened, validated arrays.

Every launcher writes into outputs the caller provides and runs on CuPy's current stream, so the
same code serves the CuPy API (which allocates) and the JAX bridge (which hands in XLA buffers and
scratch, and sets the stream). Shapes and dtypes are checked by the API layers, not here.
"""

from __future__ import annotations

import numpy as np

from cce_cupy.kernel_sources import (
    GEMM_SMEM_BYTES,
    THREADS,
    TILE_M,
    TILE_N,
    dtype_name,
    get_kernel,
    template_name,
)
from cce_cupy.options import CCEOptions

# Forward: enough (row-block x vocab-split) blocks to fill the GPU several times over, from the
# shape alone (so JAX can size the scratch at trace time).
FORWARD_TARGET_BLOCKS = 1024
# Backward: the logit-gradient chunk (N x Vc) is kept under this many bytes.
GRAD_CHUNK_BYTES = 32 << 20
_ALIGN = 256  # scratch sub-buffers start on 256-byte boundaries


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _itemsize(dtype) -> int:
    return 2 if dtype_name(dtype) in ("float16", "bfloat16") else 4


def _null():
    return np.uint64(0)  # a null pointer kernel argument


def _ptr(a):
    return _null() if a is None else a


def _aligned(*arrays, ld: int) -> bool:
    """16-byte vector loads are legal: leading dimension and every base pointer allow them."""
    itemsize = arrays[0].dtype.itemsize
    return (ld * itemsize) % 16 == 0 and all(a.data.ptr % 16 == 0 for a in arrays)


def _dtype_eps(dtype) -> float:
    if dtype_name(dtype) == "bfloat16":
        return 2.0**-7
    return float(np.finfo(dtype).eps)


# ------------------------------------------------------------------------------------ forward
def forward_splits(n: int, v: int) -> tuple[int, int]:
    """(number of vocab splits, columns per split) for the forward grid."""
    row_blocks = max(1, _cdiv(n, TILE_M))
    col_tiles = max(1, _cdiv(v, TILE_N))
    splits = min(col_tiles, max(1, _cdiv(FORWARD_TARGET_BLOCKS, row_blocks)))
    per_split = _cdiv(col_tiles, splits) * TILE_N
    return _cdiv(v, per_split), per_split


def forward_scratch_nbytes(n: int, v: int, d: int, dtype) -> int:
    """Bytes of scratch `launch_forward` needs: 3 fp32 partials per (row, split)."""
    splits, _ = forward_splits(n, v)
    return max(_ALIGN, 3 * splits * n * 4)


def launch_forward(e, c, targets, bias, opts: CCEOptions, lse_out, tgt_out, scratch=None, bad_target=None):
    """Per-row lse and target term of softcap(e @ c.T + bias); see CONTRACT.md."""
    import cupy

    n, d = e.shape
    v = c.shape[0]
    if n == 0:
        return
    splits, per_split = forward_splits(n, v)
    if scratch is None:
        scratch = cupy.empty(forward_scratch_nbytes(n, v, d, e.dtype), dtype=cupy.uint8)
    part = scratch[: 3 * splits * n * 4].view(cupy.float32)
    if bad_target is None:
        bad_target = target_error_flag()
    flags = (bias is not None, opts.softcap is not None, opts.label_smoothing > 0.0)
    softcap = np.float32(opts.softcap or 0.0)

    partials = get_kernel("lce_forward.cu", template_name("lce_forward_partials", e.dtype, *flags))
    aligned = np.int32(_aligned(e, c, ld=d))
    partials(
        (_cdiv(n, TILE_M), splits), (THREADS,),
        (e, c, _ptr(bias), part, np.int32(n), np.int32(v), np.int32(d), np.int32(per_split), softcap, aligned),
        shared_mem=GEMM_SMEM_BYTES,
    )
    finish = get_kernel("lce_forward.cu", template_name("lce_forward_finish", e.dtype, *flags, targets.dtype))
    rows_per_block = THREADS // 32
    finish(
        (_cdiv(n, rows_per_block),), (THREADS,),
        (e, c, _ptr(bias), targets, part, lse_out, tgt_out, bad_target, np.int32(n), np.int32(v), np.int32(d),
         np.int32(splits), softcap, np.float32(opts.label_smoothing), np.int64(opts.ignore_index)),
    )


# ----------------------------------------------------------------------------------- backward
def grad_dtype(input_dtype, opts: CCEOptions):
    return np.dtype(np.float32) if opts.grad_dtype == "float32" else input_dtype


def backward_chunk(n: int, v: int, dtype) -> int:
    """Vocabulary columns per backward chunk: a multiple of the tile width, G chunk <= budget."""
    cols = GRAD_CHUNK_BYTES // max(1, n * _itemsize(dtype))
    return max(TILE_N, min(_round_up(v, TILE_N), cols // TILE_N * TILE_N))


def _backward_layout(n: int, v: int, d: int, dtype, opts: CCEOptions) -> dict[str, tuple[int, int]]:
    """Byte (offset, size) of each scratch buffer of the backward."""
    vc = backward_chunk(n, v, dtype)
    nchunks = _cdiv(v, vc)
    sizes = {
        "G": n * vc * _itemsize(dtype),
        "flags": _cdiv(n, TILE_M) * _cdiv(vc, TILE_N) * 4,
        # fp32 accumulator for dE when the gradient is 16-bit and several chunks add into it
        "de_acc": n * d * 4 if (opts.grad_dtype != "float32" and _itemsize(dtype) == 2 and nchunks > 1) else 0,
    }
    layout, off = {}, 0
    for name, size in sizes.items():
        layout[name] = (off, size)
        off = _round_up(off + size, _ALIGN)
    return layout


def backward_scratch_nbytes(n: int, v: int, d: int, dtype, opts: CCEOptions) -> int:
    off, size = list(_backward_layout(n, v, d, dtype, opts).values())[-1]
    return max(_ALIGN, off + size)


def launch_backward(e, c, targets, bias, opts: CCEOptions, lse, coef_p, coef_q, de_out, dc_out, dbias_out=None,
                    scratch=None):
    """dE, dC (and dbias) of the loss whose per-row coefficients are coef_p, coef_q; see CONTRACT.md."""
    import cupy

    n, d = e.shape
    v = c.shape[0]
    if n == 0 or v == 0:  # no rows: every gradient is zero
        de_out.fill(0)
        dc_out.fill(0)
        if dbias_out is not None:
            dbias_out.fill(0)
        return
    layout = _backward_layout(n, v, d, e.dtype, opts)
    if scratch is None:
        scratch = cupy.empty(backward_scratch_nbytes(n, v, d, e.dtype, opts), dtype=cupy.uint8)

    def buf(name, dtype, shape):
        off, size = layout[name]
        return scratch[off : off + size].view(dtype).reshape(shape)

    vc_max = backward_chunk(n, v, e.dtype)
    gt = e.dtype  # the chunk holds the gradient in the input type (fp32 stays fp32)
    G = buf("G", gt, (n, vc_max))
    eps = opts.resolved_filter_eps(_dtype_eps(e.dtype))
    use_filter = eps is not None
    flags = buf("flags", np.int32, (_cdiv(n, TILE_M), _cdiv(vc_max, TILE_N))) if use_filter else None
    de_acc = buf("de_acc", np.float32, (n, d)) if layout["de_acc"][1] else None

    grad_logits = get_kernel(
        "lce_backward.cu",
        template_name("lce_grad_logits", e.dtype, gt, bias is not None, opts.softcap is not None, use_filter,
                      targets.dtype),
    )
    aligned_in = np.int32(_aligned(e, c, ld=d))
    aligned_g = np.int32(bool(aligned_in) and _aligned(G, ld=vc_max))

    def gemm(out, a_kmajor: bool, mode: int):
        return get_kernel("lce_backward.cu", template_name("lce_gemm", e.dtype, out.dtype, a_kmajor, False, mode))

    nchunks = _cdiv(v, vc_max)
    for k in range(nchunks):
        v0 = k * vc_max
        vc = min(vc_max, v - v0)
        flag_cols = _cdiv(vc, TILE_N)
        grad_logits(
            (_cdiv(n, TILE_M), flag_cols), (THREADS,),
            (e, c, _ptr(bias), targets, lse, coef_p, coef_q, G, _ptr(flags), np.int32(n), np.int32(v), np.int32(d),
             np.int32(v0), np.int32(vc), np.int64(vc_max), np.float32(opts.softcap or 0.0),
             np.float32(opts.label_smoothing), np.float32(eps or 0.0), aligned_in),
            shared_mem=GEMM_SMEM_BYTES,
        )
        # The flag grid of this launch has rows of `flag_cols` entries.
        flag_ld = np.int64(flag_cols)
        # dC[v0 : v0 + vc] = G^T @ E   (M = vc, N = d, K = n)
        dc_chunk = dc_out[v0 : v0 + vc]
        gemm(dc_chunk, False, 0)(
            (_cdiv(vc, TILE_M), _cdiv(d, TILE_N)), (THREADS,),
            (G, e, dc_chunk, _null(), _ptr(flags), flag_ld, np.int32(2), np.int32(vc), np.int32(d), np.int32(n),
             np.int64(vc_max), np.int64(d), np.int64(d), aligned_g),
            shared_mem=GEMM_SMEM_BYTES,
        )
        # dE (+)= G @ C[v0 : v0 + vc]   (M = n, N = d, K = vc)
        if de_acc is None:  # fp32 output accumulates in place; a single chunk writes directly
            target, mode, acc_in = de_out, (0 if k == 0 else 1), _null()
        elif k < nchunks - 1:
            target, mode, acc_in = de_acc, (0 if k == 0 else 1), _null()
        else:
            target, mode, acc_in = de_out, 2, de_acc
        c_chunk = c[v0 : v0 + vc]
        gemm(target, True, mode)(
            (_cdiv(n, TILE_M), _cdiv(d, TILE_N)), (THREADS,),
            (G, c_chunk, target, acc_in, _ptr(flags), flag_ld, np.int32(1), np.int32(n), np.int32(d), np.int32(vc),
             np.int64(vc_max), np.int64(d), np.int64(d), aligned_g),
            shared_mem=GEMM_SMEM_BYTES,
        )
        if dbias_out is not None:
            bias_grad = get_kernel("reductions.cu", template_name("lce_bias_grad", gt, dbias_out.dtype, False))
            bias_grad(
                (_cdiv(vc, 32),), (32, 32),
                (G, _ptr(flags), dbias_out, np.int32(n), np.int32(vc), np.int64(vc_max), np.int32(v0)),
            )


# ------------------------------------------------------------------------- logits-level loss
def launch_cross_entropy(logits, targets, opts: CCEOptions, lse_out, tgt_out, row_grad=None, bad_target=None):
    """Loss terms of materialized logits; with row_grad, dloss/dlogits written in place."""
    n, v = logits.shape
    if n == 0:
        return
    if bad_target is None:
        bad_target = target_error_flag()
    kernel = get_kernel(
        "reductions.cu",
        template_name("ce_logits", logits.dtype, targets.dtype, opts.softcap is not None, opts.label_smoothing > 0.0,
                      row_grad is not None),
    )
    kernel(
        (n,), (THREADS,),
        (logits, targets, _ptr(row_grad), lse_out, tgt_out, bad_target, np.int32(n), np.int32(v),
         np.float32(opts.softcap or 0.0), np.float32(opts.label_smoothing), np.float32(opts.z_loss),
         np.int64(opts.ignore_index)),
    )


_TARGET_FLAGS: dict[int, object] = {}


def target_error_flag():
    """The current device's out-of-range-target flag ((1,) int32); kernels set it, never clear it."""
    import cupy

    dev = cupy.cuda.Device().id
    if dev not in _TARGET_FLAGS:
        _TARGET_FLAGS[dev] = cupy.zeros(1, dtype=cupy.int32)
    return _TARGET_FLAGS[dev]


def forward_flops(n: int, v: int, d: int) -> float:
    """Matmul FLOPs of the forward (the backward by recompute is 3x this)."""
    return 2.0 * n * v * d


__all__ = [
    "backward_scratch_nbytes",
    "forward_scratch_nbytes",
    "launch_backward",
    "launch_cross_entropy",
    "launch_forward",
    "target_error_flag",
]
