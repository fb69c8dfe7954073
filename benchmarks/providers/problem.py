"""Benchmark inputs and the fp32 ground truth.

Every provider computes the same thing: the mean cross-entropy of ``E @ C.T`` against ``targets``
(no ignored rows, no softcap), and for the gradient modes dE and dC. Inputs are made once per
(shape, data) as CuPy arrays (or NumPy arrays on the CPU backend) and handed to PyTorch and JAX by
DLPack, so every provider sees the same bits.

JAX must not pre-allocate 75% of the GPU, so ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set here,
before anything can import jax.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The benchmark shapes (N, D, V) of the bars, shared by every benchmark script.
SHAPES = {
    "gemma2": (8192, 2304, 256000),
    "llama3": (8192, 4096, 128256),
}

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

MIB = 1 << 20

# Peaked ("trained-like") data, see make_inputs.
PEAK_TARGET = 15.0
PEAK_DISTRACTOR = 13.0


# --------------------------------------------------------------------------------------- inputs
@dataclass
class Problem:
    """One (shape, data) case: the canonical inputs and the ground truth."""

    shape: str
    n: int
    d: int
    v: int
    dtype: str
    data: str
    backend: str  # "cupy" or "numpy"
    e: Any = None  # (n, d) in `dtype`, xp array
    c: Any = None  # (v, d) in `dtype`
    t: Any = None  # (n,) int64
    truth: dict = field(default_factory=dict)  # loss (float), de, dc (fp32/fp64 xp arrays)
    _views: dict = field(default_factory=dict)

    @property
    def xp(self):
        if self.backend == "cupy":
            import cupy

            return cupy
        return np

    def input_bytes(self) -> int:
        return int(self.e.nbytes + self.c.nbytes + self.t.nbytes)

    def grad_bytes(self) -> int:
        return int(self.e.nbytes + self.c.nbytes)

    def free(self) -> None:
        self.e = self.c = self.t = None
        self.truth.clear()
        self._views.clear()


def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_inputs(p: Problem, seed: int = 0) -> None:
    """Fill p.e, p.c, p.t.

    ``uniform``: E ~ N(0, 1), C ~ N(0, 1) / sqrt(D), targets uniform in [0, V). Every logit is
    then ~N(0, 1): the softmax is nearly flat and no tile may be skipped safely.

    ``peaked`` (trained-like): C as above (so ||C_j||^2 ~ 1 and C_j . C_k ~ N(0, 1/D)); for each
    row i pick its target t_i and two distractors d1_i, d2_i uniformly in [0, V) and set

        E_i = z_i + 15 * C[t_i] + 13 * (C[d1_i] + C[d2_i]),     z_i ~ N(0, I_D)

    so the target logit is ~15, the two distractor logits ~13, and every other logit ~N(0, 1.1)
    (max over V about 5): the target sits ~10 units above the background. With V = 256000 the
    softmax puts about 0.7 on the target, 0.1 on each distractor and 0.1 on the whole
    background (loss about 0.4 nats), so gradient filtering keeps only the tiles holding one of
    the three hot columns of a row. All rows are valid (no ignore_index). E and C are made in
    fp32 and rounded once to `dtype`; the ground truth uses the rounded values.
    """
    xp = p.xp
    n, d, v = p.n, p.d, p.v
    if p.backend == "cupy":
        rs = xp.random.RandomState(seed)
        c = (rs.standard_normal((v, d), dtype=xp.float32) / np.float32(np.sqrt(d))).astype(xp.float32)
        t = rs.randint(0, v, size=n).astype(xp.int64)
        e = rs.standard_normal((n, d), dtype=xp.float32)
        if p.data == "peaked":
            d1 = rs.randint(0, v, size=n)
            d2 = rs.randint(0, v, size=n)
    else:
        rng = np.random.default_rng(seed)
        c = (rng.standard_normal((v, d), dtype=np.float32) / np.float32(np.sqrt(d))).astype(np.float32)
        t = rng.integers(0, v, size=n).astype(np.int64)
        e = rng.standard_normal((n, d), dtype=np.float32)
        if p.data == "peaked":
            d1 = rng.integers(0, v, size=n)
            d2 = rng.integers(0, v, size=n)
    if p.data == "peaked":
        e += np.float32(PEAK_TARGET) * c[t] + np.float32(PEAK_DISTRACTOR) * (c[d1] + c[d2])
    elif p.data != "uniform":
        raise ValueError(f"data must be 'uniform' or 'peaked', got {p.data!r}")
    dt = np_dtype(p.dtype)
    p.e = xp.ascontiguousarray(e.astype(dt))
    p.c = xp.ascontiguousarray(c.astype(dt))
    p.t = t
    del e, c


def ground_truth(p: Problem, chunk: int = 16384) -> None:
    """Loss, dE, dC of the mean cross-entropy in fp32 (fp64 on the CPU backend), chunked over V.

    Only an (N, chunk) block of logits exists at a time; CuPy's float32 matmul is plain FP32
    (CuPy uses TF32 only when CUPY_TF32=1, which this script never sets).
    """
    xp = p.xp
    acc = xp.float32 if p.backend == "cupy" else xp.float64
    e = p.e.astype(acc)
    c = p.c.astype(acc)
    n, v = p.n, p.v
    rows = xp.arange(n)
    m = xp.full(n, -np.inf, acc)
    s = xp.zeros(n, acc)
    for v0 in range(0, v, chunk):
        z = e @ c[v0 : v0 + chunk].T
        mz = z.max(1)
        m_new = xp.maximum(m, mz)
        s = s * xp.exp(m - m_new) + xp.exp(z - m_new[:, None]).sum(1)
        m = m_new
        del z
    lse = m + xp.log(s)
    tgt = (e * c[p.t]).sum(1)
    loss = float((lse - tgt).mean())
    de = xp.zeros_like(e)
    dc = xp.empty_like(c)
    for v0 in range(0, v, chunk):
        v1 = min(v, v0 + chunk)
        g = xp.exp(e @ c[v0:v1].T - lse[:, None])
        hit = (p.t >= v0) & (p.t < v1)
        g[rows[hit], p.t[hit] - v0] -= 1.0
        g *= acc(1.0 / n)
        de += g @ c[v0:v1]
        dc[v0:v1] = g.T @ e
        del g
    p.truth = {"loss": loss, "de": de, "dc": dc}


def to_xp_f32(p: Problem, x: Any):
    """Any provider output (CuPy, NumPy, torch, JAX) as an fp32 array of p's backend."""
    xp = p.xp
    mod = type(x).__module__
    if mod.startswith("torch"):
        x = x.detach().float().contiguous()
        if p.backend == "cupy":
            return xp.from_dlpack(x)
        return np.asarray(x.cpu().numpy())
    if mod.startswith("jax") or mod.startswith("jaxlib"):
        import jax.numpy as jnp

        x = x.astype(jnp.float32)
        if p.backend == "cupy":
            try:
                return xp.from_dlpack(x)
            except Exception:  # noqa: BLE001 - fall back to a host round trip
                return xp.asarray(np.asarray(x))
        return np.asarray(x)
    return xp.asarray(x).astype(xp.float32)


def rel_err(p: Problem, x: Any, key: str) -> float | None:
    if x is None or key not in p.truth:
        return None
    xp = p.xp
    ref = p.truth[key]
    if key == "loss":
        val = float(to_xp_f32(p, x).reshape(()))
        return abs(val - ref) / max(abs(ref), 1e-30)
    a = to_xp_f32(p, x).astype(ref.dtype)
    num = float(xp.linalg.norm((a - ref).ravel()))
    den = float(xp.linalg.norm(ref.ravel()))
    del a
    return num / den if den > 0 else num
