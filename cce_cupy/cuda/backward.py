"""The backward launcher: dE, dC (and dbias) by recompute, over row parts and vocabulary chunks
(plan.backward_blocking), on CuPy's current stream, into outputs the caller provides.
"""

from __future__ import annotations

import numpy as np

from cce_cupy.cuda import autotune, sparse
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
from cce_cupy.options import CCEOptions

# The list sums run only when at least this share of the rows with a gradient certified; below it
# every row takes the exact backward (which meets the certificate): the list sums, the gather and
# the second exact call cost more than the certified rows save. Measured on an H200: trained-LM
# states (N=4092, D=1024, V=65536) with 11% certified took 1.69x the exact call that way.
MIN_CERTIFIED_FRACTION = 0.5


def list_sums_pay(rows: int, uncertified: int) -> bool:
    """At least MIN_CERTIFIED_FRACTION of the `rows` with a gradient certified: the list sums are
    worth running. Every choice between them and the exact backward of all rows asks this (here,
    cuda.filter_history, and JAX's lists backward)."""
    return rows - uncertified >= MIN_CERTIFIED_FRACTION * rows


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
    accumulate: bool = False,
    stats: dict | None = None,
    lists_from_forward: bool = False,
):
    """dE, dC (and dbias) of the loss whose per-row coefficients are coef_p, coef_q; see CONTRACT.md.

    Exact gradients: a recompute kernel writes the logit gradient of one (row part, vocabulary
    chunk) at a time, and cuBLAS runs the two gradient GEMMs on it, unless `use_cublas` is False
    (CUDA-graph capture, where CuPy refuses cuBLAS calls: our tiled GEMMs run instead). Each
    gradient element is written by one kernel or GEMM in a fixed order: bitwise reproducible.
    accumulate: add dC (and dbias) to what the outputs hold instead of overwriting them (dE is
    always written); exact gradients only.

    Certified filtered gradients (filter_eps) on Hopper, where sparse_slots() allows: the sparse
    backward (cce_cupy.cuda.sparse) keeps each row's target and the columns with softmax >= eps as
    lists, certifies each row (docs/design.md, "Certified filtering") and sums dE and dC of the
    certified rows over the lists; the uncertified rows (those whose lists overflowed included)
    take the exact gradient. host_sync: read their count on the host and run the exact backward on
    just those rows (gathered; dC and dbias accumulated), or on all rows where fewer than
    MIN_CERTIFIED_FRACTION of them certified. False (JAX callbacks): the exact pass
    runs over all rows with the certified rows' coefficients zeroed, launched anyway and doing
    nothing unless the device count is nonzero. Elsewhere, and with deterministic=True, filtered
    gradients are exact (which meets the certificate). `stats`, if a dict and host_sync, gets
    "rows" (with a nonzero coefficient) and "fallback_rows" (uncertified) counts added.
    lists_from_forward: the lists are in `scratch` already, pruned (cce_cupy.cuda.filtered): only
    the certificate and what follows run (filtered, on Hopper, not accumulate; host_sync=False:
    its scratch laid out with device_fallback=True, as JAX's launch_backward_from_lists does).
    """
    import cupy

    n, d = e.shape
    v = c.shape[0]
    if n == 0 or v == 0:  # no rows: every gradient is zero
        de_out.fill(0)
        if not accumulate:
            dc_out.fill(0)
            if dbias_out is not None:
                dbias_out.fill(0)
        return
    hopper = use_hopper(e, c, ld=d)
    slots = sparse_slots(n, d, e.dtype, opts)
    certified = opts.filter_eps is not None
    if certified and not (slots and hopper and not accumulate and _aligned(de_out, dc_out, ld=d)):
        opts, certified = opts.replace(filter_eps=None, filter_tol=None), False  # exact: certified trivially
    if lists_from_forward and not certified:
        raise ValueError("lists_from_forward needs the certified filtered backward (Hopper, aligned, not accumulate)")
    if scratch is None:
        nbytes = backward_scratch_nbytes(n, v, d, e.dtype, opts, device_fallback=not host_sync)
        scratch = cupy.empty(nbytes, dtype=cupy.uint8)
    buf = scratch_buffers(scratch, n, v, d, e.dtype, opts, device_fallback=not host_sync)

    rows, vc_max, need_acc = backward_blocking(n, v, d, e.dtype, opts)
    # The forward of this shape picked (and cached) the cluster size; the recompute uses the same.
    cluster = autotune.hopper_cluster(gpu_name(), dtype_name(e.dtype), n, d, v) if hopper else 1
    args = (e, c, targets, bias, lse)

    def tiled_plan(eps, run_if):
        return _BackwardPlan(
            opts=opts,
            eps=eps,
            vc_max=vc_max,
            G=buf("G", e.dtype, (rows, vc_max)),
            flags=buf("flags", np.int32, (_cdiv(rows, TILE_M), _cdiv(vc_max, TILE_N))) if eps is not None else None,
            de_acc=buf("de_acc", np.float32, (rows, d)) if need_acc else None,
            hopper=hopper,
            use_cublas=use_cublas and run_if is None,
            cluster=cluster,
            run_if=run_if,
        )

    if not certified:
        tiled_plan(None, None).run(*args, coef_p, coef_q, de_out, dc_out, dbias_out, accumulate)
        return
    bufs = sparse_buffers(buf)
    if not lists_from_forward:
        sparse.build_lists(e, c, targets, bias, opts, lse, coef_p, coef_q, bufs, slots, cluster)
    sparse.certify(opts, coef_p, coef_q, bufs, n, v, slots)
    fallback = bufs["counts"][:1]
    if not host_sync:
        # The uncertified rows' exact gradients over all rows (the others' coefficients are 0, so the
        # filter flag skips tiles of certified rows only), gated on the device count; dE of the
        # certified rows and their dC, dbias come after, from the lists.
        plan = tiled_plan(0.0, fallback)
        plan.run(*args, bufs["fb_coef_p"], bufs["fb_coef_q"], de_out, dc_out, dbias_out, False)
        sparse.sum_lists(e, c, opts, coef_q, bufs, slots, de_out, dc_out, dbias_out, accumulate_if=fallback)
        return
    # The uncertified rows and the rows with a gradient, read in one host sync.
    counts = cupy.stack([fallback[0].astype(cupy.int64), cupy.count_nonzero((coef_p != 0) | (coef_q != 0))])
    k, active = (int(x) for x in counts.get())
    if stats is not None:
        stats["rows"] = stats.get("rows", 0) + active
        stats["fallback_rows"] = stats.get("fallback_rows", 0) + k
    exact = opts.replace(filter_eps=None, filter_tol=None)
    if not list_sums_pay(active, k):  # few rows certified: the exact backward for all
        del bufs, fallback, buf  # the lists are done with: the exact pass reuses their bytes
        reuse = _reusable(scratch, n, v, d, e.dtype, exact)
        launch_backward(
            e, c, targets, bias, exact, lse, coef_p, coef_q, de_out, dc_out, dbias_out, reuse, use_cublas=use_cublas
        )
        return
    sparse.sum_lists(e, c, opts, coef_q, bufs, slots, de_out, dc_out, dbias_out)
    if k:
        idx = cupy.sort(bufs["fallback_rows"][:k])  # a copy: the exact pass may overwrite the scratch
        del bufs, fallback, buf
        reuse = _reusable(scratch, k, v, d, e.dtype, exact)
        _exact_rows(idx, e, c, targets, bias, exact, lse, coef_p, coef_q, de_out, dc_out, dbias_out, use_cublas, reuse)


def _reusable(scratch, n: int, v: int, d: int, dtype, exact: CCEOptions):
    """`scratch` if it holds the exact backward's buffers for n rows, else None (it allocates its
    own). The filtered call's caller still holds its scratch, so a second allocation beside it would
    add the exact path's G chunk to the lists' bytes at the peak."""
    return scratch if scratch.nbytes >= backward_scratch_nbytes(n, v, d, dtype, exact) else None


def scratch_buffers(scratch, n: int, v: int, d: int, dtype, opts: CCEOptions, device_fallback: bool):
    """buf(name, dtype, shape): the views of the backward's scratch (plan._backward_layout)."""
    layout = _backward_layout(n, v, d, dtype, opts, device_fallback=device_fallback)

    def buf(name, dt, shape):
        off, size = layout[name]
        return scratch[off : off + size].view(dt).reshape(shape)

    return buf


def sparse_buffers(buf) -> dict:
    """The certified backward's buffers (flat), by name, from scratch_buffers' buf."""
    bufs = {name: buf(name, np.int32, (-1,)) for name in ("counts", "fallback_rows", "col_start", "entries", "by_col")}
    for name in ("dropped", "fb_coef_p", "fb_coef_q", "cert_q", "smooth"):
        bufs[name] = buf(name, np.float32, (-1,))
    return bufs


def _exact_rows(idx, e, c, targets, bias, exact, lse, coef_p, coef_q, de_out, dc_out, dbias_out, use_cublas, scratch):
    """The exact gradient (options `exact`) of rows `idx` (sorted, on the device): dE rows written,
    dC and dbias added. scratch: as launch_backward's."""
    import cupy

    de_rows = cupy.empty((idx.size, e.shape[1]), dtype=de_out.dtype)
    launch_backward(
        e[idx],
        c,
        targets[idx],
        bias,
        exact,
        lse[idx],
        coef_p[idx],
        coef_q[idx],
        de_rows,
        dc_out,
        dbias_out,
        scratch,
        use_cublas=use_cublas,
        accumulate=True,
    )
    de_out[idx] = de_rows


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
        # None, or a device flag: every kernel does nothing unless it is set (the certified path's
        # exact pass of its uncertified rows, under JAX).
        self.run_if = _ptr(run_if)

    def run(self, e, c, targets, bias, lse, coef_p, coef_q, de_out, dc_out, dbias_out, accumulate: bool) -> None:
        """All row parts; dC and dbias are added to (accumulate) or written by the first part."""
        n, rows = e.shape[0], self.G.shape[0]
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            self.run_part(
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
                first_part=(r0 == 0 and not accumulate),
            )

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
