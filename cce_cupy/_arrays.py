"""Array interop of the public functions: which kind a call's arrays are (NumPy, CuPy, a GPU array
with `__dlpack__`, another framework's CPU array), how they are taken in for a backend, and how
results go back as that kind. JAX tracers and tensors that require grad are refused here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cce_cupy.options import is_jax_tracer


@dataclasses.dataclass
class _Kind:
    """How a call's arrays were taken in, and how to give results back."""

    name: str  # "numpy", "cupy", "dlpack" (GPU foreign) or "host" (CPU foreign)
    module: str = ""  # top-level module of the foreign type ("torch", "jax", ...)
    device: int | None = None  # CUDA device id on GPU
    xp: Any = np

    def back(self, x):
        if x is None or self.name in ("numpy", "cupy"):
            return x
        if self.name == "host":
            return _from_numpy(np.asarray(x), self.module)
        return _from_cupy(x, self.module)


def _cupy():
    try:
        import cupy
    except ImportError:  # pragma: no cover - cupy is a dependency of the cuda extra
        return None
    return cupy


def _module_of(x) -> str:
    return type(x).__module__.split(".")[0]


def _describe(x) -> str:
    return f"{_module_of(x)}.{type(x).__name__}"


def _gpu_device(x) -> int | None:
    """CUDA device id of a foreign array, or None if it lives on the host."""
    dev = getattr(x, "__dlpack_device__", None)
    if dev is None:
        return None
    dtype_code, dev_id = dev()
    return int(dev_id) if int(dtype_code) in (2, 3, 13) else None  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged


_OPTIONAL_ARRAYS = ("bias", "grad_lse")


def _check_not_traced_or_tracked(present: dict[str, Any]) -> None:
    """Arrays this eager API cannot take: JAX tracers (jit/grad/vmap) and tensors recording autograd."""
    for k, x in present.items():
        if is_jax_tracer(x):
            raise TypeError(
                f"{k} is a JAX tracer ({_describe(x)}): cce_cupy functions run eagerly and cannot be traced "
                "by jax.jit, jax.grad or jax.vmap. Under jit/grad use jax_bindings.linear_cross_entropy "
                "(same arguments and options), which defines the gradient for JAX"
            )
        if getattr(x, "requires_grad", False) is True:
            raise TypeError(
                f"{k} ({_describe(x)}) requires grad: cce_cupy does not record autograd, so a gradient "
                f"would silently not flow. Pass {k}.detach() and apply the gradients that "
                "linear_cross_entropy_with_grad returns yourself"
            )


def _take(named: dict[str, Any]) -> tuple[_Kind, dict[str, Any]]:
    """Classify the arrays of a call (all one kind, one device) and convert them for a backend.

    NumPy arrays may accompany the CPU arrays of one other framework (e.g. NumPy targets with JAX
    CPU arrays): all go to the NumPy backend and results come back as the framework's kind.
    """
    for k, x in named.items():
        if x is None and k not in _OPTIONAL_ARRAYS:
            raise TypeError(f"{k} must be an array (NumPy, CuPy, or a GPU array with __dlpack__), got None")
    present = {k: x for k, x in named.items() if x is not None}
    _check_not_traced_or_tracked(present)
    cupy = _cupy()
    kinds = {}
    for k, x in present.items():
        if isinstance(x, (np.ndarray, np.generic)):
            kinds[k] = ("numpy", None)
        elif cupy is not None and isinstance(x, cupy.ndarray):
            kinds[k] = ("cupy", x.device.id)
        elif hasattr(x, "__dlpack__") and _gpu_device(x) is not None:
            kinds[k] = ("dlpack:" + _module_of(x), _gpu_device(x))
        elif hasattr(x, "__array__") and hasattr(x, "shape"):
            kinds[k] = ("host:" + _module_of(x), None)
        else:
            raise TypeError(f"{k} must be an array (NumPy, CuPy, or a GPU array with __dlpack__), got {_describe(x)}")
    names = list(present)
    host = [k for k in names if kinds[k][0].startswith("host:")]
    if host and all(kinds[k][0] in ("numpy", kinds[host[0]][0]) for k in names):
        kinds = {k: kinds[host[0]] for k in names}  # NumPy beside one framework's CPU arrays
    first = names[0]
    for k in names[1:]:
        if kinds[k][0] != kinds[first][0]:
            raise TypeError(
                f"{first} is a {_describe(present[first])} but {k} is a {_describe(present[k])}: "
                "pass all arrays as one kind (all NumPy, all CuPy, or all of one framework on one "
                f"device): move {k} to where {first} lives (e.g. cupy.asarray, jax.device_put, "
                "torch.as_tensor(..., device=...))"
            )
        if kinds[k][1] != kinds[first][1]:
            raise ValueError(
                f"{first} is on cuda:{kinds[first][1]} but {k} is on cuda:{kinds[k][1]}: move all arrays to one device"
            )
    kind_name, dev = kinds[first]
    if kind_name == "numpy":
        return _Kind("numpy"), {k: (None if x is None else np.asarray(x)) for k, x in named.items()}
    if kind_name == "cupy":
        return _Kind("cupy", device=dev, xp=cupy), dict(named)
    if kind_name.startswith("dlpack:"):
        if cupy is None:
            raise TypeError(f"{first} is a GPU array but CuPy is not installed: pip install cce-cupy[cuda]")
        with cupy.cuda.Device(dev):
            conv = {k: (None if x is None else cupy.from_dlpack(x)) for k, x in named.items()}
        return _Kind("dlpack", kind_name.split(":", 1)[1], dev, cupy), conv
    conv = {}
    for k, x in named.items():
        try:
            conv[k] = None if x is None else _host_to_numpy(x)
        except Exception as err:
            raise TypeError(
                f"{k} ({_describe(x)}, dtype {getattr(x, 'dtype', '?')}) cannot be read as a NumPy array: "
                "convert it to a NumPy array of a supported dtype first"
            ) from err
    return _Kind("host", kind_name.split(":", 1)[1]), conv


def _host_to_numpy(x) -> np.ndarray:
    """A CPU array of another framework as NumPy (no copy where possible)."""
    if _module_of(x) == "torch" and str(x.dtype) == "torch.bfloat16":
        import ml_dtypes  # NumPy has no bfloat16 and torch.Tensor.numpy() refuses it: view the bits
        import torch

        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return np.asarray(x)


def _from_cupy(x, module: str):
    if module == "torch":
        import torch

        return torch.from_dlpack(x)
    if module in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.from_dlpack(x)
    return x


def _from_numpy(x: np.ndarray, module: str):
    if module in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.asarray(x)
    if module == "torch":
        import torch

        x = np.ascontiguousarray(x).reshape(x.shape)  # ascontiguousarray makes a 0-d array 1-d
        if x.dtype.name == "bfloat16":
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(x)
    return x
