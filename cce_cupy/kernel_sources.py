"""The CUDA sources, their template instances, and the compile options: one place for all three.

The loader (`get_kernel`, GPU only) and the CPU compile check (`tests/test_nvrtc_compile.py`)
both read from here, so CI compiles exactly what runs.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).parent / "kernels"
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
# cce_cupy.autotune: each block loads 256 / CLUSTER rows of the C tile (its TMA box) and multicasts
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
    "float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "int32": "int", "int64": "long long",
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
    fwd = [template_name("lce_forward_partials", t, *f, i) for t in floats for f in itertools.product(b, b, b)
           for i in idx]
    fwd += [
        template_name("lce_forward_finish", t, *f, i) for t in floats for f in itertools.product(b, b, b) for i in idx
    ]
    bwd = [
        template_name("lce_grad_logits", t, grad_chunk_dtype(t), *f, i)
        for t in floats for f in itertools.product(b, b, b) for i in idx
    ]
    for t in floats:
        for out, a_kmajor, mode in gemm_variants(t):
            bwd.append(template_name("lce_gemm", t, out, a_kmajor, False, mode))
    red = [template_name("lce_bias_grad", grad_chunk_dtype(t), o, acc)
           for t in floats for o in {t, "float32"} for acc in b]
    red += [template_name("ce_logits", t, i, *f) for t in floats for i in idx for f in itertools.product(b, b, b)]
    red += [template_name("ce_logits_inplace_cluster", t, i, *f, cl)
            for t in floats for i in idx for f in itertools.product(b, b) for cl in CE_CLUSTER_SIZES]
    hop = [template_name("lce_forward_partials_sm90", cl, t, *f)
           for cl in HOPPER_CLUSTERS for t in HOPPER_DTYPES + ("float32",) for f in itertools.product(b, b, b)]
    hop += [
        template_name("lce_grad_logits_sm90", cl, t, grad_chunk_dtype(t), *f, i)
        for cl in HOPPER_CLUSTERS for t in HOPPER_DTYPES for f in itertools.product(b, b, b) for i in idx
    ]
    hop += [template_name("lce_grad_sparse_sm90", cl, t, *f, i)
            for cl in HOPPER_CLUSTERS for t in HOPPER_DTYPES for f in itertools.product(b, b) for i in idx]
    # The sparse backward runs after lce_grad_sparse_sm90, so only for the Hopper input types.
    sparse = ["sparse_count_cols", "sparse_scan_cols", "sparse_scatter_cols"]
    sparse += [template_name("sparse_grad_rows", t, g) for t in HOPPER_DTYPES for g in (t, "float32")]
    sparse += [template_name("sparse_grad_cols", t, g, hb) for t in HOPPER_DTYPES for g in (t, "float32") for hb in b]
    return {"lce_forward.cu": fwd, "lce_backward.cu": bwd, "reductions.cu": red, "lce_hopper.cu": hop,
            "lce_sparse.cu": sparse}


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


# Kernels that need more than 48 KiB of dynamic shared memory, and how much at most.
_TILED_KERNELS = {"lce_forward_partials": GEMM_SMEM_BYTES, "lce_grad_logits": GEMM_SMEM_BYTES,
                  "lce_gemm": GEMM_SMEM_BYTES, "lce_forward_partials_sm90": HOPPER_SMEM_BYTES,
                  "lce_grad_logits_sm90": HOPPER_SMEM_BYTES, "lce_grad_sparse_sm90": HOPPER_SMEM_BYTES,
                  "ce_logits_inplace_cluster": CE_SLICE_BYTES_MAX}

log = logging.getLogger("cce_cupy")
# Loaded modules and functions are per device (a CUDA function handle belongs to one context), so
# every cache below is keyed by device id; one lock serializes loads from several threads (JAX
# runs each device's callbacks on its own thread).
_LOAD_LOCK = threading.RLock()
_MODULES: dict[tuple[int, str, str], tuple[object, dict[str, str]]] = {}
_FALLBACK_LOGGED: set[tuple[str, str]] = set()


def use_prebuilt() -> bool:
    """CCE_CUPY_PREBUILT=0 compiles every kernel at run time (to compare, or to debug a kernel)."""
    value = os.environ.get("CCE_CUPY_PREBUILT", "1")
    if value not in ("0", "1"):
        raise ValueError(f"CCE_CUPY_PREBUILT must be '0' or '1', got {value!r}")
    return value == "1"


def _prebuilt_module(device: int, filename: str, group: str):
    """(cupy Module, {instance: mangled name}) of the prebuilt cubin for this device, or None."""
    import cupy

    from cce_cupy import prebuilt

    cc = cupy.cuda.Device(device).compute_capability
    arch = prebuilt.arch_for(filename, cc) if use_prebuilt() else None
    found = prebuilt.load_cubin(arch, filename, group) if arch else None
    if found is not None:
        module = cupy.cuda.function.Module()
        try:
            module.load(found[0])
            return module, found[1]
        except cupy.cuda.driver.CUDADriverError as err:  # e.g. a driver too old for the cubin
            reason = f"its {arch} cubin did not load ({err})"
    elif not use_prebuilt():
        reason = "CCE_CUPY_PREBUILT=0"
    elif arch is None:
        reason = f"no prebuilt cubin for compute capability {cc}"
    else:
        reason = f"the prebuilt {arch} cubin is missing or older than the source (python -m cce_cupy.prebuilt)"
    if (filename, reason) not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add((filename, reason))
        log.warning("cce_cupy: compiling %s at run time: %s", filename, reason)
    return None


def _runtime_module(filename: str, names):
    import cupy

    return cupy.RawModule(code=kernel_source(filename), options=compile_options(filename),
                          name_expressions=list(names))


def _load_function(device: int, filename: str, name_expression: str, whole_group: bool = False):
    """The cupy Function of one instance on one device: from the prebuilt cubin of its module, or
    compiled at run time and cached on disk by CuPy: that instance alone, or (`whole_group`, for
    `preload`) its whole module group in one NVRTC run."""
    import cupy

    with _LOAD_LOCK, cupy.cuda.Device(device):
        group = module_group(name_expression)
        key = (device, filename, group)
        if key not in _MODULES:
            _MODULES[key] = _prebuilt_module(device, filename, group) or (None, {})
        module, lowered = _MODULES[key]
        if module is None and whole_group:
            module = _runtime_module(filename, module_groups(filename)[group])
            _MODULES[key] = (module, None)
        if module is None:
            fn = _runtime_module(filename, [name_expression]).get_function(name_expression).kernel
        elif lowered is None:  # a group compiled at run time
            fn = module.get_function(name_expression).kernel
        else:
            fn = module.get_function(lowered[name_expression])
        smem = _TILED_KERNELS.get(name_expression.split("<")[0])
        if smem:
            cupy.cuda.driver.funcSetAttribute(
                fn.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
        return fn


class Kernel:
    """One template instance, callable like a cupy.RawKernel: `kernel(grid, block, args, shared_mem=0)`
    on CuPy's current device and stream. Loaded on a device at its first launch there (or by
    `preload`), with its dynamic shared memory limit set on that device."""

    __slots__ = ("filename", "name", "_by_device")

    def __init__(self, filename: str, name: str) -> None:
        self.filename, self.name = filename, name
        self._by_device: dict[int, object] = {}

    def function(self, device: int | None = None, whole_group: bool = False):
        import cupy

        device = cupy.cuda.runtime.getDevice() if device is None else device
        fn = self._by_device.get(device)
        if fn is None:
            fn = self._by_device[device] = _load_function(device, self.filename, self.name, whole_group)
        return fn

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        self.function()(grid, block, args, shared_mem=shared_mem)


@functools.cache
def get_kernel(filename: str, name_expression: str) -> Kernel:
    """One template instance of a kernel file (loaded per device at its first launch there)."""
    if name_expression not in all_instances()[filename]:
        raise KeyError(f"{name_expression} is not a listed instance of {filename}; add it to all_instances()")
    return Kernel(filename, name_expression)


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


def preload(devices=None, dtypes=None) -> int:
    """Load every kernel instance the given devices (default: the current one) can run, or only
    those for `dtypes` (input and target dtypes), plus CuPy's cuBLAS handle on each: afterwards no
    launch there loads or compiles anything. Returns the instance count loaded.

    With the prebuilt cubins this takes well under a second; without them (another GPU
    architecture, or an edited kernel) it compiles, so pass `dtypes` to compile only what runs.
    """
    import cupy

    if devices is None:
        devices = [cupy.cuda.runtime.getDevice()]
    count = 0
    for dev in devices:
        with cupy.cuda.Device(dev):
            for filename in device_files(cupy.cuda.Device(dev).compute_capability):
                for name in instances_for(filename, dtypes):
                    get_kernel(filename, name).function(dev, whole_group=True)
                    count += 1
            cupy.cuda.device.get_cublas_handle()
    return count


def _compile_group(filename: str, group: str) -> None:
    import cupy

    cupy.RawModule(code=kernel_source(filename), options=compile_options(filename),
                   name_expressions=module_groups(filename)[group]).get_function(module_groups(filename)[group][0])


def precompile(workers: int | None = None) -> int:
    """Compile every kernel module the current GPU can run into CuPy's disk cache, in parallel
    processes (`workers`, default one per CPU): for GPUs that the prebuilt cubins do not cover, or
    with CCE_CUPY_PREBUILT=0. Returns the instance count."""
    import concurrent.futures
    import multiprocessing

    import cupy

    files = device_files(cupy.cuda.Device().compute_capability)
    jobs = [(f, g) for f in files for g in module_groups(f)]
    # spawn: the children must not inherit this process's CUDA context.
    with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count(), multiprocessing.get_context("spawn")) as ex:
        for fut in [ex.submit(_compile_group, f, g) for f, g in jobs]:
            fut.result()
    return sum(len(all_instances()[f]) for f in files)


if __name__ == "__main__":
    import time

    t0 = time.time()
    print(f"precompiled {precompile()} kernel instances in {time.time() - t0:.0f} s")
