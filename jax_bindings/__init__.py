"""JAX bindings of the fused linear cross-entropy: `jax.custom_vjp` over the CuPy kernels on GPU
(through `jax.experimental.buffer_callback`, zero-copy) and a pure-JAX blocked reference elsewhere.

Set `XLA_PYTHON_CLIENT_PREALLOCATE=false` when CuPy and JAX share a GPU (see docs/jax.md).
"""

try:
    import jax  # noqa: F401
except ImportError as err:  # name the extra rather than a bare "No module named 'jax'"
    raise ImportError(
        "jax_bindings needs JAX >= 0.9.0: pip install 'cce-cupy[jax]' (CPU), or 'cce-cupy[jax-cuda13]' / "
        "'cce-cupy[jax-cuda12]' for GPUs (see README, Install)"
    ) from err

from cce_cupy.options import CCEOptions, make_options
from jax_bindings._dispatch import BACKWARD_IMPLS
from jax_bindings.gpu import COMMAND_BUFFER_COMPATIBLE, precompile
from jax_bindings.loss import linear_cross_entropy
from jax_bindings.sharded import VocabShards as VocabShards
from jax_bindings.sharded import make_vocab_parallel_loss as make_vocab_parallel_loss
from jax_bindings.sharded import make_vocab_parallel_mesh as make_vocab_parallel_mesh
from jax_bindings.sharded import shard_classifier as shard_classifier
from jax_bindings.sharded import vocab_parallel_linear_cross_entropy as vocab_parallel_linear_cross_entropy

__all__ = [
    "BACKWARD_IMPLS",
    "CCEOptions",
    "COMMAND_BUFFER_COMPATIBLE",
    "linear_cross_entropy",
    "make_options",
    "precompile",
]
