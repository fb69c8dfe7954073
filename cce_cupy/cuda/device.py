"""Device-side helpers of the CUDA launchers: the kernel family (Hopper detection), TMA descriptors,
the Hopper kernels' operands and grid, the GPU's name, the cuBLAS GEMM, and the per-thread device
flag of out-of-range targets.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from cce_cupy.cuda.plan import _cdiv, _round_up
from cce_cupy.cuda.sources import HOPPER_DTYPES, HOPPER_ROW_BYTES, HOPPER_TILE_M, HOPPER_TILE_N, dtype_name

KERNEL_FAMILIES = ("auto", "sm80")


def kernels_from_env() -> str:
    """The kernel family CCE_CUPY_KERNELS names: "auto" (also when unset or empty): the wgmma kernels
    on compute capability 9.0 for 16-bit inputs where their alignment holds; "sm80": always the
    mma.sync / FFMA kernels (the fallback, and the way to test it on a Hopper GPU)."""
    value = os.environ.get("CCE_CUPY_KERNELS", "").strip()
    if not value:
        return "auto"
    if value not in KERNEL_FAMILIES:
        raise ValueError(
            f"CCE_CUPY_KERNELS must be one of {', '.join(KERNEL_FAMILIES)} (or unset: auto), got {value!r}"
        )
    return value


KERNELS = kernels_from_env()


def _null():
    return np.uint64(0)  # a null pointer kernel argument


def _ptr(a):
    return _null() if a is None else a


def _aligned(*arrays, ld: int) -> bool:
    """16-byte vector loads are legal: leading dimension and every base pointer allow them."""
    itemsize = arrays[0].dtype.itemsize
    return (ld * itemsize) % 16 == 0 and all(a.data.ptr % 16 == 0 for a in arrays)


_TMA_CACHE: dict[tuple, np.ndarray] = {}


def tma_desc(a, box_rows: int) -> np.ndarray:
    """TMA tensor map of a row-major (rows, D) CuPy array (16-bit, or fp32 for TF32), box of
    box_rows x 128 bytes (64 or 32 elements), 128-byte swizzle, zero fill out of bounds: the 128
    bytes of a CUtensorMap as a one-element NumPy array, which CuPy passes by value (the kernels'
    __grid_constant__ TmaDesc parameter).
    Cached by address and shape: encoding costs a driver call."""
    import ctypes

    from cuda.bindings import driver

    rows, d = a.shape
    key = (a.data.ptr, rows, d, a.strides[0], a.dtype.name, box_rows)
    desc = _TMA_CACHE.get(key)
    if desc is not None:
        return desc
    dtypes = {
        "bfloat16": driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        "float16": driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        "float32": driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
    }
    err, tmap = driver.cuTensorMapEncodeTiled(
        dtypes[a.dtype.name],
        2,
        a.data.ptr,
        [driver.cuuint64_t(d), driver.cuuint64_t(max(rows, 1))],
        [driver.cuuint64_t(a.strides[0])],
        [driver.cuuint32_t(HOPPER_ROW_BYTES // a.itemsize), driver.cuuint32_t(box_rows)],
        [driver.cuuint32_t(1), driver.cuuint32_t(1)],
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err}) for a {a.dtype.name} array of shape {a.shape}")
    desc = np.frombuffer(ctypes.string_at(tmap.getPtr(), 128), dtype=np.dtype((np.void, 128))).copy()
    if len(_TMA_CACHE) > 256:  # addresses of freed arrays accumulate; keep the cache small
        _TMA_CACHE.clear()
    _TMA_CACHE[key] = desc
    return desc


def use_hopper(*arrays, ld: int, tf32: bool = False) -> bool:
    """The wgmma kernels apply: Hopper GPU, 16-bit inputs (or fp32 ones with `tf32`: the forward
    under allow_tf32), 16-byte aligned rows and bases."""
    import cupy

    dtypes = HOPPER_DTYPES + (("float32",) if tf32 else ())
    return (
        KERNELS == "auto"
        and dtype_name(arrays[0].dtype) in dtypes
        and cupy.cuda.Device().compute_capability == "90"
        and _aligned(*arrays, ld=ld)
    )


def hopper_row_blocks(n: int, cluster: int) -> int:
    """grid.x of the Hopper kernels: the 128-row blocks, rounded up to whole clusters."""
    return _round_up(_cdiv(n, HOPPER_TILE_M), cluster)


def hopper_operands(e, c, cluster: int) -> tuple[np.ndarray, np.ndarray]:
    """The Hopper kernels' two TMA maps: E in 128-row boxes, C in 256 / cluster-row boxes (each
    block of a cluster loads its share of the C tile and multicasts it)."""
    return tma_desc(e, HOPPER_TILE_M), tma_desc(c, HOPPER_TILE_N // cluster)


_GPU_NAMES: dict[int, str] = {}


def gpu_name() -> str:
    """The current device's name (the autotuner's cache is per GPU model)."""
    import cupy

    dev = cupy.cuda.Device().id
    if dev not in _GPU_NAMES:
        _GPU_NAMES[dev] = cupy.cuda.runtime.getDeviceProperties(dev)["name"].decode()
    return _GPU_NAMES[dev]


_CUDA_DTYPES = {"float32": 0, "float16": 2, "bfloat16": 14}  # cudaDataType: CUDA_R_32F, _16F, _16BF
_CUBLAS_COMPUTE_32F = 68  # fp32 accumulation, no TF32
_CUBLAS_GEMM_DEFAULT = -1


def _gemm_rowmajor(a, b, out, *, trans_a: bool, accumulate: bool) -> None:
    """out (+)= op(a) @ b in fp32 through cuBLAS, on CuPy's current stream.

    Row-major views: a is (K, M) when trans_a else (M, K); b is (K, N); out is (M, N). Each may
    have a row stride larger than its width (a column slice of a wider buffer). cuBLAS is
    column-major, so this computes out^T = b^T @ op(a)^T.
    """
    import cupy
    from cupy_backends.cuda.libs import cublas

    m, n = out.shape
    k = b.shape[0]
    alpha = np.ones(1, np.float32)
    beta = np.full(1, 1.0 if accumulate else 0.0, np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.gemmEx(
        handle,
        cublas.CUBLAS_OP_N,
        cublas.CUBLAS_OP_N if not trans_a else cublas.CUBLAS_OP_T,
        n,
        m,
        k,
        alpha.ctypes.data,
        b.data.ptr,
        _CUDA_DTYPES[b.dtype.name],
        b.strides[0] // b.itemsize,
        a.data.ptr,
        _CUDA_DTYPES[a.dtype.name],
        a.strides[0] // a.itemsize,
        beta.ctypes.data,
        out.data.ptr,
        _CUDA_DTYPES[out.dtype.name],
        out.strides[0] // out.itemsize,
        _CUBLAS_COMPUTE_32F,
        _CUBLAS_GEMM_DEFAULT,
    )


# Per thread: a bad target is reported to the thread whose call had it (cce_cupy._targets._TargetWatch), and no
# two threads race to create a device's flag.
_TARGET_FLAGS = threading.local()


def target_error_flag():
    """This thread's out-of-range-target flag on the current device ((1,) int32); kernels set it,
    never clear it."""
    import cupy

    flags = _TARGET_FLAGS.__dict__.setdefault("by_device", {})
    dev = cupy.cuda.Device().id
    if dev not in flags:
        flags[dev] = cupy.zeros(1, dtype=cupy.int32)
    return flags[dev]


__all__ = [
    "KERNELS",
    "gpu_name",
    "hopper_operands",
    "hopper_row_blocks",
    "kernels_from_env",
    "target_error_flag",
    "tma_desc",
    "use_hopper",
]
