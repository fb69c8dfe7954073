"""Kernel loading: each template instance of `cce_cupy.cuda.sources`, per device, from the prebuilt cubins
(`cce_cupy.cuda.prebuilt`) or compiled at run time by NVRTC through `cupy.RawModule`.

GPU only. The launchers call `get_kernel(file, instance)(grid, block, args, shared_mem=...)`;
`preload` loads ahead of time (JAX does at trace time, on every local GPU).
"""

from __future__ import annotations

import functools
import logging
import os
import threading

from cce_cupy.cuda.sources import (
    CE_SLICE_BYTES_MAX,
    GEMM_SMEM_BYTES,
    HOPPER_SMEM_BYTES,
    HOPPER_STAGING_BYTES,
    all_instances,
    compile_options,
    device_files,
    instances_for,
    kernel_source,
    module_group,
    module_groups,
)

# Kernels that need more than 48 KiB of dynamic shared memory, and how much at most.
_TILED_KERNELS = {
    "lce_forward_partials": GEMM_SMEM_BYTES,
    "lce_grad_logits": GEMM_SMEM_BYTES,
    "lce_gemm": GEMM_SMEM_BYTES,
    "lce_forward_partials_sm90": HOPPER_SMEM_BYTES + HOPPER_STAGING_BYTES,  # the most any STORE variant uses
    "lce_grad_logits_sm90": HOPPER_SMEM_BYTES,
    "lce_grad_sparse_sm90": HOPPER_SMEM_BYTES,
    "ce_logits_inplace_cluster": CE_SLICE_BYTES_MAX,
}

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

    from cce_cupy.cuda import prebuilt  # here, not at import: `python -m cce_cupy.cuda.prebuilt` runs it as __main__

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
        reason = f"the prebuilt {arch} cubin is missing or older than the source (python -m cce_cupy.cuda.prebuilt)"
    if (filename, reason) not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add((filename, reason))
        log.warning("cce_cupy: compiling %s at run time: %s", filename, reason)
    return None


def _runtime_module(filename: str, names):
    import cupy

    return cupy.RawModule(code=kernel_source(filename), options=compile_options(filename), name_expressions=list(names))


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
                fn.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem
            )
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
            cc = cupy.cuda.Device(dev).compute_capability
            for filename in device_files(cc):
                for name in instances_for(filename, dtypes, arch=f"sm_{cc}"):
                    get_kernel(filename, name).function(dev, whole_group=True)
                    count += 1
            cupy.cuda.device.get_cublas_handle()
    return count


def _compile_group(filename: str, group: str) -> None:
    names = module_groups(filename)[group]
    _runtime_module(filename, names).get_function(names[0])


def precompile(workers: int | None = None) -> int:
    """Compile every kernel module the current GPU can run into CuPy's disk cache, in parallel
    processes (`workers`, default one per CPU): for GPUs that the prebuilt cubins do not cover, or
    with CCE_CUPY_PREBUILT=0. Returns the instance count."""
    import concurrent.futures
    import multiprocessing

    import cupy

    cc = cupy.cuda.Device().compute_capability
    groups = {f: module_groups(f, arch=f"sm_{cc}") for f in device_files(cc)}
    jobs = [(f, g) for f, file_groups in groups.items() for g in file_groups]
    # spawn: the children must not inherit this process's CUDA context.
    with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count(), multiprocessing.get_context("spawn")) as ex:
        for fut in [ex.submit(_compile_group, f, g) for f, g in jobs]:
            fut.result()
    return sum(len(names) for file_groups in groups.values() for names in file_groups.values())


if __name__ == "__main__":
    import time

    t0 = time.time()
    print(f"precompiled {precompile()} kernel instances in {time.time() - t0:.0f} s")
