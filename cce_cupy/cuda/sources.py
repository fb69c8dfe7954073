"""The CUDA sources, their template instances, and the compile options: one place for all three.

The loader (`cce_cupy.cuda.loader`, GPU only), the prebuilt-cubin build (`cce_cupy.cuda.prebuilt`)
and the CPU compile check (`tests/test_nvrtc_compile.py`) all read from here, so CI compiles
exactly what runs. Nothing here touches CUDA.
"""

from __future__ import annotations

import functools
import itertools
import re
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).parent.parent / "kernels"
KERNEL_FILES = ("lce_forward.cu", "lce_backward.cu", "reductions.cu", "lce_hopper.cu", "lce_sparse.cu")
# CuPy adds -ftz=true and --device-as-default-execution-space itself; the CPU check adds them too.
# No --use_fast_math: it turns tanhf (softcap) into the hardware approximation, ~1e-4 relative
# error in the logits; the kernels call __expf explicitly where the fast exponential is wanted.
COMPILE_OPTIONS = ("--std=c++17",)
# Files built for one architecture only (wgmma needs the arch-specific sm_90a target); the others
# are compiled by CuPy for the device at hand, and checked in CI for sm_80 and sm_90.
FILE_ARCH = {"lce_hopper.cu": "sm_90a"}
# Must match CCE_BM / CCE_BN in kernels/common.cuh.
TILE_M = 128
TILE_N = 128
THREADS = 256
# The Hopper kernels (lce_hopper.cu): H_THREADS threads (a producer warpgroup and two consumers), 128 x
# 256 tiles, H_SMEM_BYTES of dynamic shared memory (4 stages of a 128-row E tile and a 256-row C
# tile, 128 bytes a row).
HOPPER_TILE_N = 256
HOPPER_THREADS = 384
HOPPER_SMEM_BYTES = 4 * (128 + HOPPER_TILE_N) * 128 + 1024
HOPPER_DTYPES = ("float16", "bfloat16")  # and float32 for the forward with allow_tf32 (TF32 MMA)
# Row blocks per cluster of the Hopper kernels (their CLUSTER template parameter), the candidates of
# cce_cupy.cuda.autotune: each block loads 256 / CLUSTER rows of the C tile (its TMA box) and multicasts
# them; the grid's row-block count is a multiple of CLUSTER.
HOPPER_CLUSTERS = (1, 2)
# Dynamic shared memory per block of the tiled kernels: max(3 stages x 2 operands x 8 KiB,
# the 128 x 132 fp32 epilogue tile).
GEMM_SMEM_BYTES = max(3 * 2 * 128 * 32 * 2, 128 * 132 * 4)

# ce_logits_inplace_cluster: the cluster sizes built, and the most shared memory one block may hold
# of its row slice (so that two blocks fit on an SM when they can: 2 x 112 KiB of the 227 KiB).
CE_CLUSTER_SIZES = (1, 2, 4, 8)
CE_SLICE_BYTES_SHARED_SM = 112 * 1024
CE_SLICE_BYTES_MAX = 200 * 1024

_CXX_TYPES = {
    "float32": "float",
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "int32": "int",
    "int64": "long long",
}


def dtype_name(dtype) -> str:
    """'bfloat16', 'float32', ... for a dtype, a scalar type or a name."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def cxx_type(dtype) -> str:
    """C++ spelling of a NumPy/CuPy dtype (bfloat16 through ml_dtypes)."""
    name = dtype_name(dtype)
    try:
        return _CXX_TYPES[name]
    except KeyError:
        raise TypeError(f"no CUDA type for dtype {name}") from None


@functools.lru_cache(maxsize=4096)  # at every launch: its dtype lookups cost ~8 us of host time
def template_name(kernel: str, *args) -> str:
    """`lce_forward_partials<__nv_bfloat16, true, false, false>` from dtypes, bools and type names."""
    parts = []
    for a in args:
        if isinstance(a, bool):
            parts.append("true" if a else "false")
        elif isinstance(a, int):
            parts.append(str(a))
        elif isinstance(a, str):
            parts.append(_CXX_TYPES.get(a, a))
        else:
            parts.append(cxx_type(a))
    return f"{kernel}<{', '.join(parts)}>"


@functools.cache
def kernel_source(filename: str) -> str:
    """The file's text with `#include "common.cuh"` inlined (NVRTC then needs no include path)."""
    text = (KERNEL_DIR / filename).read_text()
    common = (KERNEL_DIR / "common.cuh").read_text().replace("#pragma once", "")
    return re.sub(r'#include "common\.cuh"', lambda _: common, text)


@functools.cache
def all_instances() -> dict[str, list[str]]:
    """Every template instance the launchers can ask for, per file (for the compile check)."""
    floats = ("float32", "float16", "bfloat16")
    idx = ("int32", "int64")
    b = (False, True)
    fwd = [
        template_name("lce_forward_partials", t, *f, i) for t in floats for f in itertools.product(b, b, b) for i in idx
    ]
    fwd += [
        template_name("lce_forward_finish", t, *f, i) for t in floats for f in itertools.product(b, b, b) for i in idx
    ]
    bwd = [
        template_name("lce_grad_logits", t, grad_chunk_dtype(t), *f, i)
        for t in floats
        for f in itertools.product(b, b, b)
        for i in idx
    ]
    for t in floats:
        for out, a_kmajor, mode in gemm_variants(t):
            bwd.append(template_name("lce_gemm", t, out, a_kmajor, False, mode))
    red = [
        template_name("lce_bias_grad", grad_chunk_dtype(t), o, acc) for t in floats for o in {t, "float32"} for acc in b
    ]
    red += [template_name("ce_logits", t, i, *f) for t in floats for i in idx for f in itertools.product(b, b, b)]
    red += [
        template_name("ce_logits_inplace_cluster", t, i, *f, cl)
        for t in floats
        for i in idx
        for f in itertools.product(b, b)
        for cl in CE_CLUSTER_SIZES
    ]
    hop = [
        template_name("lce_forward_partials_sm90", cl, t, *f)
        for cl in HOPPER_CLUSTERS
        for t in HOPPER_DTYPES + ("float32",)
        for f in itertools.product(b, b, b)
    ]
    hop += [
        template_name("lce_grad_logits_sm90", cl, t, grad_chunk_dtype(t), *f, i)
        for cl in HOPPER_CLUSTERS
        for t in HOPPER_DTYPES
        for f in itertools.product(b, b, b)
        for i in idx
    ]
    hop += [
        template_name("lce_grad_sparse_sm90", cl, t, *f, i)
        for cl in HOPPER_CLUSTERS
        for t in HOPPER_DTYPES
        for f in itertools.product(b, b)
        for i in idx
    ]
    # The sparse backward runs after lce_grad_sparse_sm90, so only for the Hopper input types.
    sparse = ["sparse_certify_rows", "sparse_count_cols", "sparse_scan_cols", "sparse_scatter_cols"]
    sparse += [template_name("sparse_weighted_colsum", t) for t in HOPPER_DTYPES]
    sparse += [template_name("sparse_grad_rows", t, g) for t in HOPPER_DTYPES for g in (t, "float32")]
    sparse += [template_name("sparse_grad_cols", t, g, hb) for t in HOPPER_DTYPES for g in (t, "float32") for hb in b]
    return {
        "lce_forward.cu": fwd,
        "lce_backward.cu": bwd,
        "reductions.cu": red,
        "lce_hopper.cu": hop,
        "lce_sparse.cu": sparse,
    }


def compile_options(filename: str) -> tuple[str, ...]:
    """NVRTC options of one file: the common ones, plus its fixed architecture if it has one."""
    arch = FILE_ARCH.get(filename)
    return COMPILE_OPTIONS + ((f"-arch={arch}",) if arch else ())


def grad_chunk_dtype(dtype) -> str:
    """The element type of the logit-gradient chunk: the input type, fp32 stays fp32."""
    return dtype_name(dtype)


def gemm_variants(dtype):
    """(out dtype, A K-major?, mode) triples of lce_gemm used by the backward for one input dtype."""
    t = dtype_name(dtype)
    outs = sorted({t, "float32"})
    dc = [(o, False, m) for o in outs for m in (0, 1)]  # dC = G^T @ E: first row part writes, others add
    de = [(o, True, 0) for o in outs] + [("float32", True, 1)]  # dE first chunk / accumulate
    if t != "float32":
        de.append((t, True, 2))  # last chunk: fold the fp32 accumulator, cast
    return dc + de


def module_group(name_expression: str) -> str:
    """The module an instance is compiled in: its kernel name and first two template arguments.

    Several small modules per file instead of one: NVRTC runs one per module, so `precompile` can
    compile them in parallel processes (the sm_90a file alone takes ~5 minutes in one run)."""
    base, _, args = name_expression.partition("<")
    return base + "<" + ",".join(args.rstrip(">").split(",")[:2])


def module_groups(filename: str) -> dict[str, list[str]]:
    """The file's instances by module_group."""
    groups: dict[str, list[str]] = {}
    for name in all_instances()[filename]:
        groups.setdefault(module_group(name), []).append(name)
    return groups


def device_files(compute_capability: str) -> list[str]:
    """The kernel files a GPU of this compute capability ("90", "80") runs: all but those built for
    another architecture only (the sm_90a file elsewhere than on Hopper)."""
    cc = f"sm_{compute_capability}"
    return [f for f in KERNEL_FILES if FILE_ARCH.get(f, cc).rstrip("a") == cc]


def instances_for(filename: str, dtypes=None) -> list[str]:
    """The file's instances, or those whose C++ type arguments are all among `dtypes` (plus float,
    the accumulation type): what calls with these input and target dtypes can launch."""
    names = all_instances()[filename]
    if dtypes is None:
        return names
    allowed = {cxx_type(t) for t in dtypes} | {"float"}
    all_types = set(_CXX_TYPES.values())

    def fits(name: str) -> bool:
        args = [a.strip() for a in name.partition("<")[2].rstrip(">").split(",")]
        return all(a in allowed for a in args if a in all_types)

    return [n for n in names if fits(n)]
