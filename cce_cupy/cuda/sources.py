"""The CUDA sources, their template instances, the compile options, and the tile constants and
enums the kernels share with the launchers (a generated preamble to every file): one place for all.

The loader (`cce_cupy.cuda.loader`, GPU only), the prebuilt-cubin build (`cce_cupy.cuda.prebuilt`)
and the CPU compile check (`tests/test_nvrtc_compile.py`) all read from here, so CI compiles
exactly what runs. Nothing here touches CUDA.
"""

from __future__ import annotations

import enum
import functools
import itertools
import re
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).parent.parent / "kernels"
KERNEL_FILES = ("lce_forward.cu", "lce_backward.cu", "reductions.cu", "lce_hopper.cu", "lce_sparse.cu", "lce_budget.cu")
# CuPy adds -ftz=true and --device-as-default-execution-space itself; the CPU check adds them too.
# No --use_fast_math: it turns tanhf (softcap) into the hardware approximation, ~1e-4 relative
# error in the logits; the kernels call __expf explicitly where the fast exponential is wanted.
COMPILE_OPTIONS = ("--std=c++17",)
# Files built for one architecture only (wgmma needs the arch-specific sm_90a target); the others
# are compiled by CuPy for the device at hand, and checked in CI for sm_80 and sm_90.
FILE_ARCH = {"lce_hopper.cu": "sm_90a"}
# The tile constants: defined here only. kernel_source() prepends them to every kernel file as
# #defines (the macro named in each comment; see preamble()), so the launchers' grids, blocks and
# shared memory and the kernels' loops read the same numbers. The kernels static_assert the values
# their warp layouts are written for.
# The tiled (sm_80) kernels: 128 x 128 output tiles, 32 of K a pipeline stage, 3 stages, 8 warps.
TILE_M = 128  # CCE_BM
TILE_N = 128  # CCE_BN
TILE_K = 32  # CCE_BK
STAGES = 3  # CCE_STAGES
THREADS = 256  # CCE_THREADS
# Their dynamic shared memory per block (CCE_SMEM_BYTES): the stages of both 16-bit operand tiles, or
# the fp32 epilogue tile of TILE_N + 4 floats a row (common.cuh's CCE_EPI_LD), whichever is larger.
GEMM_SMEM_BYTES = max(STAGES * 2 * TILE_M * TILE_K * 2, TILE_M * (TILE_N + 4) * 4)
# The Hopper kernels (lce_hopper.cu): 128 x 256 tiles, a producer warpgroup and two consumers, K
# stages of 128-byte rows (the TMA box's inner extent and the swizzle width), 4 stages.
HOPPER_TILE_M = 128  # H_BM
HOPPER_TILE_N = 256  # H_BN
HOPPER_PRODUCERS = 128  # H_PRODUCERS
HOPPER_THREADS = HOPPER_PRODUCERS + 256  # H_THREADS
HOPPER_ROW_BYTES = 128  # H_ROW_BYTES
HOPPER_STAGES = 4  # H_STAGES
# Each stage holds an E tile and a C tile; +1024: the dynamic shared memory base is only 16-byte
# aligned, the swizzle needs 1024 (H_SMEM_BYTES).
HOPPER_SMEM_BYTES = HOPPER_STAGES * (HOPPER_TILE_M + HOPPER_TILE_N) * HOPPER_ROW_BYTES + 1024
# The forward with SoftmaxStore.ROW also stages its stores in shared memory for TMA (H_STAGING_BYTES):
# per consumer warpgroup, half of its 64 x 256 tile in bf16: each warp's two 16-row x 128-byte boxes. What is
# left of the 227 KiB a block may have beside the 4 stages.
HOPPER_STAGING_BYTES = 2 * 2 * 64 * HOPPER_ROW_BYTES
HOPPER_DTYPES = ("float16", "bfloat16")  # and float32 for the forward with allow_tf32 (TF32 MMA)
# Row blocks per cluster of the Hopper kernels (their CLUSTER template parameter), the candidates of
# cce_cupy.cuda.autotune: each block loads HOPPER_TILE_N / CLUSTER rows of the C tile (its TMA box)
# and multicasts them; the grid's row-block count is a multiple of CLUSTER.
HOPPER_CLUSTERS = (1, 2)
# Their names in the kernels.
TILE_DEFINES = {
    "CCE_BM": TILE_M,
    "CCE_BN": TILE_N,
    "CCE_BK": TILE_K,
    "CCE_STAGES": STAGES,
    "CCE_THREADS": THREADS,
    "CCE_SMEM_BYTES": GEMM_SMEM_BYTES,
    "H_BM": HOPPER_TILE_M,
    "H_BN": HOPPER_TILE_N,
    "H_PRODUCERS": HOPPER_PRODUCERS,
    "H_THREADS": HOPPER_THREADS,
    "H_ROW_BYTES": HOPPER_ROW_BYTES,
    "H_STAGES": HOPPER_STAGES,
    "H_SMEM_BYTES": HOPPER_SMEM_BYTES,
    "H_STAGING_BYTES": HOPPER_STAGING_BYTES,
}


class GemmMode(enum.IntEnum):
    """lce_gemm's MODE template argument: what it does with its output tile (the C++ enum class of
    the same name is generated from this one, see preamble())."""

    WRITE = 0  # out = A @ B
    ACCUMULATE = 1  # out += A @ B: read, add in fp32, write back
    FOLD_CAST = 2  # out = cast(acc_f32 + A @ B): the last chunk of a 16-bit dE folds its fp32 accumulator


class GemmK(enum.IntEnum):
    """lce_gemm's k_of_g argument: which dimension of the logit-gradient chunk G its K runs along,
    so which way it reads G's live-tile flags (generated as a C++ enum class, like GemmMode)."""

    G_COLUMNS = 1  # dE = G @ C_chunk: K = the chunk's columns
    G_ROWS = 2  # dC = G^T @ E: K = G's rows


# Kernels that need thread-block clusters (sm_90 and later; lce_hopper.cu is sm_90a as a whole):
# they are defined, built and loaded only there.
CLUSTER_KERNELS = ("ce_logits_inplace_cluster",)

# ce_logits_inplace_cluster: the cluster sizes built, and the most shared memory one block may hold
# of its row slice (so that two blocks fit on an SM when they can: 2 x 112 KiB of the 227 KiB).
CE_CLUSTER_SIZES = (1, 2, 4, 8)
CE_SLICE_BYTES_SHARED_SM = 112 * 1024
CE_SLICE_BYTES_MAX = 200 * 1024


class SoftmaxStore(enum.IntEnum):
    """lce_forward_partials_sm90's STORE argument: what the forward also keeps of each row's softmax
    for the backward (a C++ enum class, like GemmMode): the memory-budgeted one (cce_cupy/cuda/budget.py)
    or the certified filtered one (cce_cupy/cuda/filtered.py)."""

    NONE = 0
    TILE = 1  # fp16, one scale per 256-column tile (read by lce_budget_grad)
    ROW = 2  # bf16, one shift per row (read by the GEMMs)
    LISTS = 3  # the candidate (column, logit) pairs of each row and its other mass (sparse_prune_lists)


# The STORE modes built per input type: ROW keeps the softmax in T, which needs bf16's range.
FORWARD_STORES = {
    "bfloat16": (SoftmaxStore.NONE, SoftmaxStore.TILE, SoftmaxStore.ROW, SoftmaxStore.LISTS),
    "float16": (SoftmaxStore.NONE, SoftmaxStore.TILE, SoftmaxStore.LISTS),
}
# lce_budget.cu's kernels templated like <T, HAS_BIAS, SOFTCAP, TI>.
BUDGET_KERNELS = (
    "lce_budget_grad",
    "lce_budget_shift",
    "lce_budget_rows",
)  # and lce_budget_recompute<T, HAS_BIAS, SOFTCAP>

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
    """`lce_gemm<__nv_bfloat16, float, true, GemmMode::WRITE>` from dtypes, bools, ints, type names
    and the enums of this module."""
    parts = []
    for a in args:
        if isinstance(a, enum.Enum):
            parts.append(f"{type(a).__name__}::{a.name}")
        elif isinstance(a, bool):
            parts.append("true" if a else "false")
        elif isinstance(a, int):
            parts.append(str(a))
        elif isinstance(a, str):
            parts.append(_CXX_TYPES.get(a, a))
        else:
            parts.append(cxx_type(a))
    return f"{kernel}<{', '.join(parts)}>"


def _cxx_enum(cls: type[enum.IntEnum]) -> str:
    members = ", ".join(f"{m.name} = {m.value}" for m in cls)
    return f"enum class {cls.__name__} : int {{ {members} }};"


@functools.cache
def preamble() -> str:
    """What every kernel file is compiled with ahead of its own text: the tile constants as
    #defines and the enums shared with the launchers."""
    lines = ["// Generated by cce_cupy/cuda/sources.py: the tile constants and enums the launchers share."]
    lines += [f"#define {name} {value}" for name, value in TILE_DEFINES.items()]
    lines += [_cxx_enum(cls) for cls in (GemmMode, GemmK, SoftmaxStore)]
    return "\n".join(lines) + "\n"


def assemble(text: str) -> str:
    """A kernel file's text as compiled: the preamble, then the text with `#include "common.cuh"`
    inlined (NVRTC then needs no include path)."""
    common = (KERNEL_DIR / "common.cuh").read_text().replace("#pragma once", "")
    return preamble() + re.sub(r'#include "common\.cuh"', lambda _: common, text)


@functools.cache
def kernel_source(filename: str) -> str:
    """The text NVRTC compiles for one kernel file (see assemble)."""
    return assemble((KERNEL_DIR / filename).read_text())


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
    bwd = [template_name("lce_grad_logits", t, *f, i) for t in floats for f in itertools.product(b, b, b) for i in idx]
    for t in floats:
        for out, a_kmajor, mode in gemm_variants(t):
            bwd.append(template_name("lce_gemm", t, out, a_kmajor, mode))
    red = [template_name("lce_bias_grad", t, o, acc) for t in floats for o in {t, "float32"} for acc in b]
    red += [template_name("ce_logits", t, i, *f) for t in floats for i in idx for f in itertools.product(b, b, b)]
    red += [
        template_name("ce_logits_inplace_cluster", t, i, *f, cl)
        for t in floats
        for i in idx
        for f in itertools.product(b, b)
        for cl in CE_CLUSTER_SIZES
    ]
    # STORE: the memory-budgeted path's forward (FORWARD_STORES).
    hop = [
        template_name("lce_forward_partials_sm90", cl, t, *f, store)
        for cl in HOPPER_CLUSTERS
        for t in HOPPER_DTYPES + ("float32",)
        for f in itertools.product(b, b, b)
        for store in FORWARD_STORES.get(t, (SoftmaxStore.NONE,))
    ]
    hop += [
        template_name("lce_grad_logits_sm90", cl, t, *f, i)
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
    sparse += [template_name("sparse_prune_lists", sc, i) for sc in b for i in idx]  # after a LISTS forward
    sparse += [template_name("sparse_weighted_colsum", t) for t in HOPPER_DTYPES]
    sparse += [template_name("sparse_grad_rows", t, g) for t in HOPPER_DTYPES for g in (t, "float32")]
    sparse += [template_name("sparse_grad_cols", t, g, hb) for t in HOPPER_DTYPES for g in (t, "float32") for hb in b]
    # The budgeted backward's kernels read what the Hopper forward kept: 16-bit types only.
    budget = [
        template_name(k, t, *f, i)
        for k in BUDGET_KERNELS
        for t in HOPPER_DTYPES
        for f in itertools.product(b, b)
        for i in idx
    ]
    budget += [template_name("lce_budget_recompute", t, *f) for t in HOPPER_DTYPES for f in itertools.product(b, b)]
    budget += [template_name("lce_budget_de", g) for g in ("bfloat16", "float32")]  # STORE_ROW: bf16 only
    budget += [template_name("lce_budget_dc_fill", g) for g in ("bfloat16", "float32")]
    return {
        "lce_forward.cu": fwd,
        "lce_backward.cu": bwd,
        "reductions.cu": red,
        "lce_hopper.cu": hop,
        "lce_sparse.cu": sparse,
        "lce_budget.cu": budget,
    }


def compile_options(filename: str) -> tuple[str, ...]:
    """NVRTC options of one file: the common ones, plus its fixed architecture if it has one."""
    arch = FILE_ARCH.get(filename)
    return COMPILE_OPTIONS + ((f"-arch={arch}",) if arch else ())


def gemm_variants(dtype):
    """(out dtype, A K-major?, mode) triples of lce_gemm used by the backward for one input dtype."""
    t = dtype_name(dtype)
    outs = sorted({t, "float32"})
    # dC = G^T @ E (A = G^T is M-major): the first row part writes, the others add.
    dc = [(o, False, m) for o in outs for m in (GemmMode.WRITE, GemmMode.ACCUMULATE)]
    # dE = G @ C_chunk (A = G is K-major): the first chunk writes, the others add (16-bit: into fp32).
    de = [(o, True, GemmMode.WRITE) for o in outs] + [("float32", True, GemmMode.ACCUMULATE)]
    if t != "float32":
        de.append((t, True, GemmMode.FOLD_CAST))  # 16-bit dE's last chunk: fold the fp32 accumulator, cast
    return dc + de


def module_group(name_expression: str) -> str:
    """The module an instance is compiled in: its kernel name and first two template arguments.

    Several small modules per file instead of one: NVRTC runs one per module, so `precompile` can
    compile them in parallel processes (the sm_90a file alone takes ~5 minutes in one run)."""
    base, _, args = name_expression.partition("<")
    return base + "<" + ",".join(args.rstrip(">").split(",")[:2])


def runs_on(name_expression: str, arch: str) -> bool:
    """Whether an instance exists for `arch` ("sm_80", "sm_90", "sm_90a"): only the cluster kernels
    need sm_90 or later."""
    return name_expression.partition("<")[0] not in CLUSTER_KERNELS or int(arch[3:].rstrip("a")) >= 90


def module_groups(filename: str, arch: str | None = None) -> dict[str, list[str]]:
    """The file's instances by module_group: all of them, or those that exist for `arch`."""
    groups: dict[str, list[str]] = {}
    for name in all_instances()[filename]:
        if arch is None or runs_on(name, arch):
            groups.setdefault(module_group(name), []).append(name)
    return groups


def device_files(compute_capability: str) -> list[str]:
    """The kernel files a GPU of this compute capability ("90", "80") runs: all but those built for
    another architecture only (the sm_90a file elsewhere than on Hopper)."""
    cc = f"sm_{compute_capability}"
    return [f for f in KERNEL_FILES if FILE_ARCH.get(f, cc).rstrip("a") == cc]


def instances_for(filename: str, dtypes=None, arch: str | None = None) -> list[str]:
    """The file's instances (those that exist for `arch`, if given), or of those the ones whose C++
    type arguments are all among `dtypes` (plus float, the accumulation type): what calls with these
    input and target dtypes can launch."""
    names = [n for n in all_instances()[filename] if arch is None or runs_on(n, arch)]
    if dtypes is None:
        return names
    allowed = {cxx_type(t) for t in dtypes} | {"float"}
    all_types = set(_CXX_TYPES.values())

    def fits(name: str) -> bool:
        args = [a.strip() for a in name.partition("<")[2].rstrip(">").split(",")]
        return all(a in allowed for a in args if a in all_types)

    return [n for n in names if fits(n)]
