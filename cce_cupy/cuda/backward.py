"""The backward launcher: dE, dC (and dbias) by recompute, over row parts and vocabulary chunks
(plan.backward_blocking), on CuPy's current stream, into outputs the caller provides.
"""

from __future__ import annotations

import numpy as np

from cce_cupy.cuda import autotune
from cce_cupy.cuda.device import (
    _aligned,
    _gemm_rowmajor,
    _null,
    _ptr,
    gpu_name,
    hopper_operands,
    hopper_row_blocks,
    use_hopper,
)
from cce_cupy.cuda.loader import get_kernel
from cce_cupy.cuda.plan import (
    _backward_layout,
    _cdiv,
    backward_blocking,
    backward_scratch_nbytes,
    forward_splits,
    sparse_slots,
)
from cce_cupy.cuda.sources import (
    GEMM_SMEM_BYTES,
    HOPPER_SMEM_BYTES,
    HOPPER_THREADS,
    HOPPER_TILE_N,
    THREADS,
    TILE_M,
    TILE_N,
    GemmK,
    GemmMode,
    dtype_name,
    template_name,
)
from cce_cupy.cuda.sparse import _sparse_backward
from cce_cupy.options import CCEOptions, dtype_eps


def launch_backward(
    e,
    c,
    targets,
    bias,
    opts: CCEOptions,
    lse,
    coef_p,
    coef_q,
    de_out,
    dc_out,
    dbias_out=None,
    scratch=None,
    use_cublas: bool = True,
    host_sync: bool = True,
):
    """dE, dC (and dbias) of the loss whose per-row coefficients are coef_p, coef_q; see CONTRACT.md.

    Exact gradients: a recompute kernel writes the logit gradient of one (row part, vocabulary
    chunk) at a time, and cuBLAS runs the two gradient GEMMs on it, unless `use_cublas` is False
    (CUDA-graph capture, where CuPy refuses cuBLAS calls: our tiled GEMMs run instead). Each
    gradient element is written by one kernel or GEMM in a fixed order: bitwise reproducible.

    Filtered gradients (filter_eps) on Hopper, where sparse_slots() allows: the sparse backward
    (lce_grad_sparse_sm90, lce_sparse.cu) keeps only the gradient elements with
    |softmax - onehot| >= eps (and each row's target) as lists and sums dE and dC over them. A row
    with more such elements than its slots makes it give up; the tiled filtered backward (dense
    chunks, our GEMMs skipping the 128 x 128 tiles where every element is below eps) then runs
    instead. host_sync: find that out by reading the flag (CuPy API); False (JAX callbacks): the
    tiled kernels are launched anyway and do nothing unless the flag is set. Elsewhere, and with
    deterministic=True, filtered gradients always take the tiled path.
    """
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

    rows, vc_max, need_acc = backward_blocking(n, v, d, e.dtype, opts)
    eps = opts.resolved_filter_eps(dtype_eps(e.dtype))
    hopper = use_hopper(e, c, ld=d)
    # The forward of this shape picked (and cached) the cluster size; the recompute uses the same.
    cluster = autotune.hopper_cluster(gpu_name(), dtype_name(e.dtype), n, d, v) if hopper else 1
    run_if = None
    slots = sparse_slots(n, d, e.dtype, opts)
    if slots and hopper and _aligned(de_out, dc_out, ld=d):
        counts = buf("counts", np.int32, (1 + n + v,))
        lists = {name: buf(name, np.int32, (-1,)) for name in ("col_start", "entries", "by_col")}
        overflow = _sparse_backward(
            e,
            c,
            targets,
            bias,
            opts,
            eps,
            lse,
            coef_p,
            coef_q,
            de_out,
            dc_out,
            dbias_out,
            counts,
            lists,
            slots,
            cluster,
        )
        if not host_sync:
            run_if = overflow  # the tiled kernels below run only if the sparse lists overflowed
        elif not int(overflow.get()[0]):
            return
    plan = _BackwardPlan(
        opts=opts,
        eps=eps,
        vc_max=vc_max,
        G=buf("G", e.dtype, (rows, vc_max)),
        flags=buf("flags", np.int32, (_cdiv(rows, TILE_M), _cdiv(vc_max, TILE_N))) if eps is not None else None,
        de_acc=buf("de_acc", np.float32, (rows, d)) if need_acc else None,
        hopper=hopper,
        use_cublas=use_cublas and eps is None,
        cluster=cluster,
        run_if=run_if,
    )
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        plan.run_part(
            e[r0:r1],
            c,
            targets[r0:r1],
            bias,
            lse[r0:r1],
            coef_p[r0:r1],
            coef_q[r0:r1],
            de_out[r0:r1],
            dc_out,
            dbias_out,
            first_part=(r0 == 0),
        )


class _BackwardPlan:
    """The kernels of one backward call, run over the row parts (see backward_blocking)."""

    def __init__(self, opts, eps, vc_max, G, flags, de_acc, hopper, use_cublas, cluster, run_if=None):
        self.opts, self.eps, self.vc_max, self.G, self.flags, self.de_acc, self.hopper = (
            opts,
            eps,
            vc_max,
            G,
            flags,
            de_acc,
            hopper,
        )
        self.use_cublas = use_cublas
        self.cluster = cluster  # of the Hopper recompute kernel
        # None, or a device flag: every kernel does nothing unless it is set (the sparse path's fallback).
        self.run_if = _ptr(run_if)

    def run_part(self, e, c, targets, bias, lse, coef_p, coef_q, de_out, dc_out, dbias_out, first_part):
        n, d = e.shape
        v = c.shape[0]
        opts, vc_max, flags = self.opts, self.vc_max, self.flags
        G = self.G[:n]
        use_filter = self.eps is not None
        if self.hopper:
            grad_logits = get_kernel(
                "lce_hopper.cu",
                template_name(
                    "lce_grad_logits_sm90",
                    self.cluster,
                    e.dtype,
                    bias is not None,
                    opts.softcap is not None,
                    use_filter,
                    targets.dtype,
                ),
            )
            grad_smem, grad_threads = HOPPER_SMEM_BYTES, HOPPER_THREADS
        else:
            grad_logits = get_kernel(
                "lce_backward.cu",
                template_name(
                    "lce_grad_logits",
                    e.dtype,
                    bias is not None,
                    opts.softcap is not None,
                    use_filter,
                    targets.dtype,
                ),
            )
            grad_smem, grad_threads = GEMM_SMEM_BYTES, THREADS
        g_aligned = _aligned(G, ld=vc_max)
        if self.hopper and not g_aligned:  # its 16-byte stores; the scratch layout guarantees this
            raise RuntimeError(f"backward scratch not 16-byte aligned (at {G.data.ptr:#x}); pass an aligned buffer")
        aligned_in = np.int32(_aligned(e, c, ld=d))
        aligned_g = np.int32(bool(aligned_in) and g_aligned)

        nchunks = _cdiv(v, vc_max)
        for k in range(nchunks):
            v0 = k * vc_max
            vc = min(vc_max, v - v0)
            flag_cols = _cdiv(vc, TILE_N)
            if self.hopper:
                # Several tiles a block, one grid wave where it can (the forward's split rule): a
                # block's pipeline fill and the last wave's idle SMs are paid once, not per tile.
                col_blocks, cols_per_block = forward_splits(n, vc, HOPPER_TILE_N)
                operands = hopper_operands(e, c, self.cluster)
                grid, tail = (hopper_row_blocks(n, self.cluster), col_blocks), (np.int32(cols_per_block),)
            else:
                operands, grid, tail = (e, c), (_cdiv(n, TILE_M), _cdiv(vc, TILE_N)), (aligned_in,)
            grad_logits(
                grid,
                (grad_threads,),
                (
                    *operands,
                    _ptr(bias),
                    targets,
                    lse,
                    coef_p,
                    coef_q,
                    G,
                    _ptr(flags),
                    np.int32(n),
                    np.int32(v),
                    np.int32(d),
                    np.int32(v0),
                    np.int32(vc),
                    np.int64(vc_max),
                    np.float32(opts.softcap or 0.0),
                    np.float32(opts.label_smoothing),
                    np.float32(self.eps or 0.0),
                    *tail,
                    self.run_if,
                ),
                shared_mem=grad_smem,
            )
            Gc = G[:, :vc]
            # dC[v0 : v0 + vc] (+)= G^T @ E: written by the first row part, accumulated by the others.
            dc_chunk = dc_out[v0 : v0 + vc]
            # dE (+)= G @ C[v0 : v0 + vc]: 16-bit gradients accumulate in fp32 and are cast at the end.
            if self.de_acc is None:
                de_target, de_accumulate, de_final = de_out, k > 0, None
            else:
                de_target, de_accumulate = self.de_acc[:n], k > 0
                de_final = de_out if k == nchunks - 1 else None
            if self.use_cublas:
                _gemm_rowmajor(Gc, e, dc_chunk, trans_a=True, accumulate=not first_part)
                _gemm_rowmajor(Gc, c[v0 : v0 + vc], de_target, trans_a=False, accumulate=de_accumulate)
                if de_final is not None:
                    de_final[...] = de_target
            else:
                self._gemms_tiled(
                    Gc,
                    e,
                    c[v0 : v0 + vc],
                    dc_chunk,
                    de_target,
                    de_accumulate,
                    de_final,
                    flag_cols,
                    first_part,
                    aligned_g,
                )
            if dbias_out is not None:
                bias_grad = get_kernel(
                    "reductions.cu", template_name("lce_bias_grad", e.dtype, dbias_out.dtype, not first_part)
                )
                bias_grad(
                    (_cdiv(vc, 32),),
                    (32, 32),
                    (G, _ptr(flags), dbias_out, np.int32(n), np.int32(vc), np.int64(vc_max), np.int32(v0), self.run_if),
                )

    def _gemms_tiled(
        self, Gc, e, c_chunk, dc_chunk, de_target, de_accumulate, de_final, flag_cols, first_part, aligned_g
    ):
        """dC and dE of one chunk with our tiled GEMMs (skipping the K-blocks of dead tiles when filtering)."""
        n, d = e.shape
        vc = c_chunk.shape[0]
        flag_ld = np.int64(flag_cols)
        ld_g = np.int64(self.vc_max)

        def gemm(out, a_kmajor: bool, mode: GemmMode):
            return get_kernel("lce_backward.cu", template_name("lce_gemm", e.dtype, out.dtype, a_kmajor, mode))

        # dC = G^T @ E   (M = vc, N = d, K = n); later row parts add to it
        gemm(dc_chunk, False, GemmMode.WRITE if first_part else GemmMode.ACCUMULATE)(
            (_cdiv(vc, TILE_M), _cdiv(d, TILE_N)),
            (THREADS,),
            (
                Gc,
                e,
                dc_chunk,
                _null(),
                _ptr(self.flags),
                flag_ld,
                np.int32(GemmK.G_ROWS),
                np.int32(vc),
                np.int32(d),
                np.int32(n),
                ld_g,
                np.int64(d),
                np.int64(d),
                aligned_g,
                self.run_if,
            ),
            shared_mem=GEMM_SMEM_BYTES,
        )
        # dE = G @ C_chunk   (M = n, N = d, K = vc); the last chunk of a 16-bit dE folds the
        # fp32 accumulator and casts
        if de_final is not None:
            target, mode, acc_in = de_final, GemmMode.FOLD_CAST, de_target
        else:
            target, mode, acc_in = de_target, (GemmMode.ACCUMULATE if de_accumulate else GemmMode.WRITE), _null()
        gemm(target, True, mode)(
            (_cdiv(n, TILE_M), _cdiv(d, TILE_N)),
            (THREADS,),
            (
                Gc,
                c_chunk,
                target,
                acc_in,
                _ptr(self.flags),
                flag_ld,
                np.int32(GemmK.G_COLUMNS),
                np.int32(n),
                np.int32(d),
                np.int32(vc),
                ld_g,
                np.int64(d),
                np.int64(d),
                aligned_g,
                self.run_if,
            ),
            shared_mem=GEMM_SMEM_BYTES,
        )


__all__ = ["launch_backward"]
