"""cce-cupy: fused linear + cross-entropy that never materializes the N x V logits.

CuPy arrays run CUDA kernels (compiled by cupy.RawModule), NumPy arrays a blocked NumPy backend,
other GPU arrays (PyTorch, JAX) go through DLPack zero-copy. See README.md.
"""

from cce_cupy._version import __version__ as __version__
from cce_cupy.api import (
    backward,
    check_targets,
    cross_entropy,
    forward,
    linear_cross_entropy,
    linear_cross_entropy_with_grad,
)
from cce_cupy.options import CCEOptions, make_options
from cce_cupy.validate import (
    INDEX_DTYPES,
    SUPPORTED_DTYPES,
    Problem,
    check_cross_entropy_args,
    check_linear_ce_args,
)

__all__ = [
    "CCEOptions",
    "INDEX_DTYPES",
    "Problem",
    "SUPPORTED_DTYPES",
    "backward",
    "check_cross_entropy_args",
    "check_linear_ce_args",
    "check_targets",
    "cross_entropy",
    "forward",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "make_options",
]
