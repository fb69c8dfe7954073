"""Compile the CUDA sources with NVRTC on a machine without a GPU (CI), as CuPy would at run time.

`cupy.cuda.compiler` queries the device, so this goes through `cuda.bindings.nvrtc` directly with
the options CuPy adds (-ftz=true, --device-as-default-execution-space, its CCCL and CUDA include
paths) on top of `sources.COMPILE_OPTIONS`.
"""

from __future__ import annotations

from cce_cupy.cuda.sources import compile_options, kernel_source


def cupy_runtime_options(filename: str, arch: str) -> list[str]:
    """The options CuPy's RawModule passes to NVRTC for `filename` on a GPU of `arch` (e.g. "sm_90").

    A file with its own -arch in compile_options keeps it (CuPy then adds none)."""
    import cuda.pathfinder
    from cupy._core.core import _get_cccl_include_options

    opts = list(compile_options(filename)) + ["-ftz=true", "--device-as-default-execution-space"]
    if not any(o.startswith("-arch") for o in opts):
        opts.append(f"-arch={arch}")
    opts += list(_get_cccl_include_options())
    cudart = cuda.pathfinder.find_nvidia_header_directory("cudart")
    if cudart:
        opts.append(f"-I{cudart}")
    return opts


def compile_source(filename: str, name_expressions: list[str], arch: str) -> tuple[bytes, str, dict[str, str]]:
    """Compile one file with the given instances; returns (cubin, log, {instance: mangled name}).
    Raises on error."""
    from cuda.bindings import nvrtc

    def check(result):
        err, *rest = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC call failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    src = kernel_source(filename).encode()
    prog = check(nvrtc.nvrtcCreateProgram(src, filename.encode(), 0, [], []))
    try:
        for name in name_expressions:
            check(nvrtc.nvrtcAddNameExpression(prog, name.encode()))
        opts = [o.encode() for o in cupy_runtime_options(filename, arch)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log_size = check(nvrtc.nvrtcGetProgramLogSize(prog))
        log = b" " * log_size
        check(nvrtc.nvrtcGetProgramLog(prog, log))
        log_text = log.decode(errors="replace").rstrip("\x00 \n")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{filename} failed to compile for {arch}:\n{log_text}")
        lowered = {}  # every instance must have been emitted
        for name in name_expressions:
            lowered[name] = check(nvrtc.nvrtcGetLoweredName(prog, name.encode())).decode()
        size = check(nvrtc.nvrtcGetCUBINSize(prog))
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin))
        return cubin, log_text, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
