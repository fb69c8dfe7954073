"""Time variants of the Hopper forward kernel (lce_hopper.cu) on the device.

Each variant is a kernel source (the package's, and optionally a saved earlier version given with
--baseline, to compare kernel versions in one process) and a cluster size (the kernel's CLUSTER
template parameter). Both are compiled with the package's tile constants (the preamble of
cce_cupy.cuda.sources, which also gives the launch's threads, shared memory and TMA boxes). Each
variant's per-row logsumexp is checked against the first one's, then timed with CUDA events next to
cuBLAS E @ C^T. Usage:
python -m benchmarks.dev.hopper_variants [--shapes gemma2,llama3] [--baseline old/lce_hopper.cu]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cupy as cp
import ml_dtypes
import numpy as np

from benchmarks.dev.kernel_check import cuda_time
from benchmarks.providers import SHAPES
from cce_cupy.cuda import device, plan
from cce_cupy.cuda import sources as cuda_sources

CLUSTERS = (1, 2)


def build(source: str, cluster: int):
    """The bf16 forward-partials kernel of `source` (as compiled: preamble and common.cuh inlined),
    its dynamic shared memory, and the rows of its C box."""
    # Since the memory-budgeted path the kernel has a STORE argument and six more pointers/sizes
    # (null and 0 here); an older baseline has neither.
    store = "SoftmaxStore STORE" in source
    extra = (cuda_sources.SoftmaxStore.NONE,) if store else ()
    name = cuda_sources.template_name("lce_forward_partials_sm90", cluster, "bfloat16", False, False, False, *extra)
    mod = cp.RawModule(code=source, options=cuda_sources.compile_options("lce_hopper.cu"), name_expressions=[name])
    fn = mod.get_function(name)
    smem = cuda_sources.HOPPER_SMEM_BYTES
    fn.max_dynamic_shared_size_bytes = smem
    tail = (np.uint64(0), np.int64(0), np.uint64(0), np.int32(0), np.uint64(0), np.uint64(0)) if store else ()
    # Since the ROW store went through TMA, a third map (unused here: zeros) follows C's.
    maps = 3 if "tmap_s" in source else 2
    return fn, smem, cuda_sources.HOPPER_TILE_N // cluster, tail, maps


def lse_of(part, splits, n):
    p = part[: 3 * splits * n].reshape(3, splits, n)
    m = p[0].max(0)
    return m + cp.log((p[1] * cp.exp(p[0] - m)).sum(0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="gemma2,llama3")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", help="an earlier lce_hopper.cu to time first (the lse reference)")
    args = ap.parse_args()
    sources = {}
    if args.baseline:
        sources["baseline"] = cuda_sources.assemble(Path(args.baseline).read_text())
    sources["current"] = cuda_sources.kernel_source("lce_hopper.cu")
    kernels = {(label, cl): build(src, cl) for label, src in sources.items() for cl in CLUSTERS}
    for shape in args.shapes.split(","):
        n, d, v = SHAPES[shape]
        e = cp.random.standard_normal((n, d), dtype=cp.float32).astype(ml_dtypes.bfloat16)
        c = (cp.random.standard_normal((v, d), dtype=cp.float32) / np.sqrt(d)).astype(ml_dtypes.bfloat16)
        part = cp.empty(3 * 132 * 4 * n, cp.float32)
        logits = cp.empty((n, v), ml_dtypes.bfloat16)
        ms_gemm = cuda_time(lambda: cp.matmul(e, c.T, out=logits), args.repeats)
        logits = None  # 4 GB at gemma2
        ref = None
        tma_e = device.tma_desc(e, cuda_sources.HOPPER_TILE_M)
        for (label, cluster), (fn, smem, box_rows, tail, maps) in kernels.items():
            tma_c = device.tma_desc(c, box_rows)  # each block of a cluster loads its share of the C tile
            splits, per_split = plan.forward_splits(n, v, cuda_sources.HOPPER_TILE_N)
            call = lambda: fn(  # noqa: E731
                (device.hopper_row_blocks(n, cluster), splits),
                (cuda_sources.HOPPER_THREADS,),
                (
                    tma_e,
                    tma_c,
                    *((np.zeros(1, np.dtype((np.void, 128))),) if maps == 3 else ()),
                    np.uint64(0),
                    part,
                    np.int32(n),
                    np.int32(v),
                    np.int32(d),
                    np.int32(per_split),
                    np.float32(0),
                    *tail,
                ),
                shared_mem=smem,
            )
            part.fill(cp.nan)
            call()
            lse = lse_of(part, splits, n)
            if ref is None:
                ref = lse.copy()
            err = float(cp.abs(lse - ref).max())
            ms = cuda_time(call, args.repeats)
            print(
                json.dumps(
                    {
                        "shape": shape,
                        "variant": f"{label}_cluster{cluster}",
                        "ms": round(ms, 3),
                        "cublas_ms": round(ms_gemm, 3),
                        "tflops": round(2 * n * d * v / ms / 1e9, 1),
                        "x_cublas": round(ms / ms_gemm, 3),
                        "max_abs_lse_diff": err,
                        "finite": bool(cp.isfinite(lse).all()),
                    }
                ),
                flush=True,
            )
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
