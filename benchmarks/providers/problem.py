"""Benchmark inputs and the fp32 ground truth.

Every provider computes the same thing: the mean cross-entropy of ``E @ C.T`` against ``targets``
(no ignored rows, no softcap), and for the gradient modes dE and dC. Inputs are made once per
(shape, data) as CuPy arrays (or NumPy arrays on the CPU backend) and handed to PyTorch and JAX by
DLPack, so every provider sees the same bits.

JAX must not pre-allocate 75% of the GPU, so ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set here,
before anything can import jax.
"""

from __future__ import annotations

import json
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

# Long-tailed data, see make_inputs (tuned at V = 128256 and 256000).
ZIPF_EXPONENT = 1.076  # prior_r ~ r**-a over the ranks r = 1..V
TAIL_NOISE = 0.5  # std of every logit's random part
TAIL_TARGET_LOGIT = -4.2  # each row's target is raised to this logit (against log prior) if below
TAIL_PRIOR_SCALE = 4.0  # E_i[0]; C_j[0] = log(prior_j) / this, so both are O(1) in bf16

# The trained-LM data: the file `examples/train_lm.py --save-states PATH` writes, its path from
# bench.py --trained-lm or this environment variable.
TRAINED_LM_ENV = "CCE_TRAINED_LM"


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
    source: str | None = None  # the states file of data "trained_lm"
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


class _Rng:
    """The backend's generator with one interface: CuPy's RandomState, or NumPy's Generator."""

    def __init__(self, xp, seed: int):
        self.gpu = xp is not np
        self.r = xp.random.RandomState(seed) if self.gpu else np.random.default_rng(seed)

    def normal(self, shape):
        """N(0, 1), float32."""
        return self.r.standard_normal(shape, dtype=np.float32)

    def integers(self, high: int, size: int):
        """Uniform in [0, high)."""
        return self.r.randint(0, high, size=size) if self.gpu else self.r.integers(0, high, size=size)

    def uniform(self, size: int):
        """Uniform in [0, 1), float64."""
        return self.r.random_sample(size) if self.gpu else self.r.random(size)

    def permutation(self, k: int):
        return self.r.permutation(k)


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
    the three hot columns of a row.

    ``long_tailed`` (a unigram tail, as in a real LM): a Zipf prior over the vocabulary,
    prior_r ~ r^-a at rank r (a = ZIPF_EXPONENT = 1.076), the ranks shuffled over the vocabulary
    ids with the seed; targets are drawn from the prior. The logits are

        y_ij = log prior_j + r_ij + b_i [j = t_i],    b_i = max(0, -4.2 - log prior_{t_i})

    with r_ij ~ N(0, 0.5^2) (TAIL_NOISE) the random part, and b_i the row's knowledge of its
    target: a target rarer than the logit level -4.2 (TAIL_TARGET_LOGIT, near exp(-4) = 1.8% of
    the softmax) is raised to it, as a trained LM predicts its token above the unigram prior.
    Without a bias vector: E_i[0] = 4, C_j[0] = log prior_j / 4; C_j's other D - 1 dimensions
    are N(0, 0.5^2 / (D - 1)), so z_i . C_j ~ N(0, 0.5^2) for z_i ~ N(0, I) whatever D; and
    E_i[1:] = k_i z_i + b_i C'_t / |C'_t|^2 (C' = C[:, 1:]). That raises the target by b_i
    exactly and moves every other logit by b_i C'_t . C'_j / |C'_t|^2, of variance
    b_i^2 0.5^2 / ((D - 1) |C'_t|^2); k_i^2 = 1 - b_i^2 / ((D - 1) |C'_t|^2) takes as much off
    z_i's part, so each row's random part has variance 0.5^2 for any D >= 1 + (b_max / 0.5)^2:
    D >= 449 at V = 128256, >= 517 at V = 256000 (b_max = 10.6, 11.4). Below that (tiny test
    shapes) the rarest targets' rows get a wider random part. Measured in float64 from the bf16
    arrays made here (seed 0; mean over rows, 5th-95th percentile over rows in brackets):
        V = 128256, D = 1024, 400 rows: loss 3.95 nats, 36.4% [32.7-39.5%] of a row's softmax in
            entries below 2^-12 (D = 4096, 200 rows: 3.96, 36.3%; D = 64: 4.04, 35.8%);
        V = 256000, D = 1024, 400 rows: loss 4.01 nats, 38.7% [34.9-41.9%] below 2^-12
            (D = 2304, 200 rows: 4.05, 38.4%).
    The tail grows with V (about 2.3 points from 128256 to 256000), so one exponent puts both
    model vocabularies in 36-39% only near these values.

    ``trained_lm``: the hidden states, classifier and targets of a trained
    examples/train_lm.py model, read from p.source (load_trained_lm); n, d, v must be the file's.

    All rows are valid (no ignore_index). E and C are made in fp32 and rounded once to `dtype`;
    the ground truth uses the rounded values.
    """
    xp = p.xp
    n, d, v = p.n, p.d, p.v
    rng = _Rng(xp, seed)
    if p.data in ("uniform", "peaked"):
        c = rng.normal((v, d)) / np.float32(np.sqrt(d))
        t = rng.integers(v, n).astype(xp.int64)
        e = rng.normal((n, d))
        if p.data == "peaked":
            d1 = rng.integers(v, n)
            d2 = rng.integers(v, n)
            e += np.float32(PEAK_TARGET) * c[t] + np.float32(PEAK_DISTRACTOR) * (c[d1] + c[d2])
    elif p.data == "long_tailed":
        e, c, t = _long_tailed(xp, rng, n, d, v)
    elif p.data == "trained_lm":
        e, c, t = load_trained_lm(p.source)
        if (e.shape, c.shape) != ((n, d), (v, d)):
            raise ValueError(f"{p.source} holds N, D, V = {e.shape[0]}, {e.shape[1]}, {c.shape[0]}, not {n}, {d}, {v}")
        e, c, t = xp.asarray(e), xp.asarray(c), xp.asarray(t)
    else:
        raise ValueError(f"data must be 'uniform', 'peaked', 'long_tailed' or 'trained_lm', got {p.data!r}")
    dt = np_dtype(p.dtype)
    p.e = xp.ascontiguousarray(e.astype(dt))
    p.c = xp.ascontiguousarray(c.astype(dt))
    p.t = t
    del e, c


def zipf_log_prior(v: int, a: float = ZIPF_EXPONENT) -> np.ndarray:
    """log prior_r of the ranks r = 1..v, prior_r ~ r**-a, normalized; float64."""
    lp = -a * np.log(np.arange(1, v + 1, dtype=np.float64))
    return lp - np.logaddexp.reduce(lp)


def _long_tailed(xp, rng: _Rng, n: int, d: int, v: int):
    """(e, c, targets) of the long-tailed data, fp32 (see make_inputs)."""
    if d < 2:
        raise ValueError(f"long_tailed data needs D >= 2 (one dimension carries the log prior), got D={d}")
    by_rank = zipf_log_prior(v)
    ids = rng.permutation(v)  # the vocabulary id of each rank
    log_prior = xp.empty(v, dtype=xp.float64)
    log_prior[ids] = xp.asarray(by_rank)
    cdf = xp.asarray(np.cumsum(np.exp(by_rank)))
    rank = xp.minimum(xp.searchsorted(cdf, rng.uniform(n) * cdf[-1], side="right"), v - 1)
    t = ids[rank].astype(xp.int64)
    c = xp.empty((v, d), dtype=xp.float32)
    c[:, 0] = (log_prior / TAIL_PRIOR_SCALE).astype(xp.float32)
    c[:, 1:] = rng.normal((v, d - 1)) * np.float32(TAIL_NOISE / np.sqrt(d - 1))
    ct = c[t, 1:]
    norm2 = (ct * ct).sum(axis=1, dtype=xp.float64)
    boost = xp.maximum(0.0, TAIL_TARGET_LOGIT - log_prior[t])
    keep = xp.sqrt(xp.maximum(0.0, 1.0 - boost**2 / ((d - 1) * norm2)))
    e = xp.empty((n, d), dtype=xp.float32)
    e[:, 0] = TAIL_PRIOR_SCALE
    e[:, 1:] = keep.astype(xp.float32)[:, None] * rng.normal((n, d - 1))
    e[:, 1:] += (boost / norm2).astype(xp.float32)[:, None] * ct
    return e, c, t


def trained_lm_dims(path: str) -> tuple[int, int, int]:
    """(N, D, V) of a states file, from its metadata alone."""
    with np.load(_states_path(path)) as f:
        meta = json.loads(str(f["meta"]))
    return int(meta["n"]), int(meta["d"]), int(meta["v"])


def load_trained_lm(path: str | None):
    """(e (N, D), c (V, D) as float32, exact; targets (N,) int64) of a states file.

    The format (examples/train_lm.py --save-states): an .npz with `e`, `c` (16-bit dtypes stored
    as their uint16 bits), `targets`, `dtype` (the name of e's and c's dtype) and `meta` (JSON:
    n, d, v, and how the states were made).
    """
    with np.load(_states_path(path)) as f:
        dt = np_dtype(str(f["dtype"]))
        e, c = (f[k].view(dt) if dt.itemsize == 2 else f[k] for k in ("e", "c"))
        t = f["targets"].astype(np.int64)
    if t.shape != e.shape[:1] or c.shape[1] != e.shape[1] or t.min() < 0 or t.max() >= c.shape[0]:
        raise ValueError(
            f"{path}: inconsistent states: e {e.shape}, c {c.shape}, targets {t.shape} in [{t.min()}, {t.max()}]"
        )
    return e.astype(np.float32), c.astype(np.float32), t


def _states_path(path: str | None) -> str:
    if not path:
        raise ValueError(
            f"data 'trained_lm' needs the saved states: bench.py --trained-lm PATH or ${TRAINED_LM_ENV} "
            "(written by examples/train_lm.py --save-states PATH)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"trained-LM states {path!r} (bench.py --trained-lm or ${TRAINED_LM_ENV}) do not exist: "
            "write them with examples/train_lm.py --save-states PATH"
        )
    return path


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
