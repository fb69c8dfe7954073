"""Benchmark providers: one module per peer, and the registry bench.py runs them through.

Frameworks are imported lazily, inside the adapters: the CPU smoke run needs neither torch nor a
GPU, and a peer that is not installed fails (or is skipped) alone.
"""

from __future__ import annotations

from typing import Callable

from .apple_cce import AppleCCE
from .base import Provider, grad_nbytes
from .cublas import CublasProvider, CublasTF32Provider
from .jax_cce import JaxCCE
from .liger import Liger
from .measure import CupyPeak, Timer, block, free_device_memory, median
from .optax_naive import Optax, OptaxFp32
from .ours import OursProvider
from .ours_jax import JaxBindings, JaxBindingsBudget, JaxBindingsCmdBuf, JaxBindingsFilter
from .problem import (
    MIB,
    SHAPES,
    TRAINED_LM_ENV,
    Problem,
    ground_truth,
    load_trained_lm,
    make_inputs,
    rel_err,
    to_xp_f32,
    trained_lm_dims,
)
from .quack import Quack, quack_missing
from .torch_naive import TorchCompile, TorchEager

__all__ = [
    "ALL_PROVIDERS",
    "BUDGET_BYTES",
    "EXTRA_PROVIDERS",
    "GEMM_MODES",
    "GEMM_PROVIDERS",
    "GPU_ONLY",
    "MIB",
    "SHAPES",
    "TRAINED_LM_ENV",
    "CupyPeak",
    "Problem",
    "Provider",
    "Timer",
    "block",
    "free_device_memory",
    "grad_nbytes",
    "ground_truth",
    "load_trained_lm",
    "make_inputs",
    "known_provider",
    "make_provider",
    "median",
    "provider_identity",
    "rel_err",
    "skip_reason",
    "to_xp_f32",
    "trained_lm_dims",
]

# ours_budget's memory_budget (issue 17's bar: 4 GiB at gemma2 and llama3).
BUDGET_BYTES = 4 << 30

# Every provider by its command-line key. Keys that record under another name or filter flag are
# mapped in provider_identity.
_MAKERS: dict[str, Callable[[Problem], Provider]] = {
    "cublas": CublasProvider,
    "cublas_tf32": CublasTF32Provider,
    "ours": OursProvider,
    "ours_deterministic": lambda p: OursProvider(p, name="ours_deterministic", deterministic=True),
    "ours_filter": lambda p: OursProvider(p, name="ours", filter_eps="auto"),
    "ours_budget": lambda p: OursProvider(p, name="ours", memory_budget=BUDGET_BYTES),
    # a budget of the bf16 logits' bytes: what torch.compile holds beyond its inputs and gradients
    "ours_budget_logits": lambda p: OursProvider(p, name="ours", memory_budget=p.n * p.v * 2),
    "ours_tf32": lambda p: OursProvider(p, name="ours_tf32", allow_tf32=True),
    "torch": TorchEager,
    "torch_compile": TorchCompile,
    "apple_cce": lambda p: AppleCCE(p, filter=True),
    "apple_cce_exact": lambda p: AppleCCE(p, filter=False),
    "liger": Liger,
    "quack": Quack,
    "optax": Optax,
    "optax_fp32": OptaxFp32,
    "jax_cce": JaxCCE,
    "jax_bindings": JaxBindings,
    "jax_bindings_filter": JaxBindingsFilter,
    "jax_bindings_budget": JaxBindingsBudget,
    "jax_bindings_cmdbuf": JaxBindingsCmdBuf,
}

GPU_ONLY = {"torch", "torch_compile", "apple_cce", "liger", "quack"}
# The default run, in this order: the JAX providers last, because XLA's allocator keeps what it grew.
ALL_PROVIDERS = (
    "cublas",
    "ours",
    "ours_budget",
    "ours_deterministic",
    "ours_filter",
    "torch_compile",
    "torch",
    "apple_cce",
    "apple_cce_exact",
    "liger",
    "quack",
    "jax_bindings",
    "jax_bindings_filter",
    "optax",
    "jax_cce",
)
# The GEMM floors (timed without an untimed first call of their own; modes of their own).
GEMM_MODES = {"cublas": CublasProvider.modes, "cublas_tf32": CublasTF32Provider.modes}
GEMM_PROVIDERS = tuple(GEMM_MODES)
# Known but not run unless named in --providers.
EXTRA_PROVIDERS = (
    "jax_bindings_cmdbuf",
    "jax_bindings_budget",
    "cublas_tf32",
    "ours_tf32",
    "optax_fp32",
    "ours_budget_logits",
)
assert set(_MAKERS) == set(ALL_PROVIDERS + EXTRA_PROVIDERS)


def budget_key_mib(key: str) -> int | None:
    """MiB of a key "ours_budget@MIB" (ours with that memory_budget, e.g. a peer's extra memory), else None."""
    head, _, mib = key.partition("@")
    return int(mib) if head == "ours_budget" and mib.isdigit() and int(mib) > 0 else None


def known_provider(key: str) -> bool:
    return key in _MAKERS or budget_key_mib(key) is not None


def make_provider(key: str, p: Problem) -> Provider:
    """A provider variant by its command-line key (see ALL_PROVIDERS; also ours_budget@MIB)."""
    mib = budget_key_mib(key)
    if mib is not None:
        return OursProvider(p, name="ours", memory_budget=mib << 20)
    if key not in _MAKERS:
        raise ValueError(
            f"unknown provider {key!r}; known: {', '.join(ALL_PROVIDERS + EXTRA_PROVIDERS)}, ours_budget@MIB"
        )
    return _MAKERS[key](p)


def provider_identity(key: str) -> tuple[str, bool]:
    """(provider name as recorded, filter flag) of a command-line key."""
    if budget_key_mib(key) is not None:
        return ("ours", False)
    return {
        "ours_filter": ("ours", True),
        "ours_budget": ("ours", False),  # told apart by its record's memory_budget
        "ours_budget_logits": ("ours", False),
        "jax_bindings_budget": ("jax_bindings", False),
        "jax_bindings_filter": ("jax_bindings", True),
        "apple_cce": ("apple_cce", True),
        "apple_cce_exact": ("apple_cce", False),
    }.get(key, (key, False))


def skip_reason(key: str) -> str | None:
    """Why a provider cannot run in this environment, found without importing its framework (None:
    try it; a failure then becomes an error record). Only QuACK, whose wheels are staged by hand,
    is checked ahead."""
    return quack_missing() if key == "quack" else None
