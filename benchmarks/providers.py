"""Benchmark inputs, the fp32 ground truth, and one adapter per provider.

Every provider computes the same thing: the mean cross-entropy of ``E @ C.T`` against ``targets``
(no ignored rows, no softcap), and for the gradient modes dE and dC. Inputs are made once per
(shape, data) as CuPy arrays (or NumPy arrays on the CPU backend) and handed to PyTorch and JAX by
DLPack, so every provider sees the same bits.

Frameworks are imported lazily, inside the adapters: the CPU smoke run needs neither torch nor a
GPU. JAX must not pre-allocate 75% of the GPU, so ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set
here, before anything can import jax.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

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


# ------------------------------------------------------------------------------------- timing
def _median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


class Timer:
    """Times fn() `repeats` times after `warmup` calls; returns the median in ms.

    kind: "cupy" / "torch" (CUDA events on the framework's current stream), "host" (perf_counter
    around a call that blocks until the result is ready: JAX, NumPy).
    """

    def __init__(self, kind: str):
        self.kind = kind

    def sync(self) -> None:
        if self.kind == "cupy":
            import cupy

            cupy.cuda.get_current_stream().synchronize()
        elif self.kind == "torch":
            import torch

            torch.cuda.synchronize()

    def time(
        self, fn: Callable[[], Any], repeats: int, warmup: int = 1, prepare: Callable[[], Any] | None = None
    ) -> float:
        """prepare (optional, untimed) runs before each call; its result is passed to fn."""
        for _ in range(warmup):
            arg = prepare() if prepare else None
            out = fn(arg) if prepare else fn()
            del out, arg
        self.sync()
        times = []
        for _ in range(repeats):
            arg = prepare() if prepare else None
            self.sync()
            if self.kind == "cupy":
                import cupy

                a, b = cupy.cuda.Event(), cupy.cuda.Event()
                a.record()
                out = fn(arg) if prepare else fn()
                b.record()
                b.synchronize()
                times.append(cupy.cuda.get_elapsed_time(a, b))
            elif self.kind == "torch":
                import torch

                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                out = fn(arg) if prepare else fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                out = fn(arg) if prepare else fn()
                block(out)
                times.append((time.perf_counter() - t0) * 1e3)
            del out, arg
        return _median(times)


def block(out: Any) -> None:
    """Wait for JAX results; no-op for anything else."""
    leaves = out if isinstance(out, (tuple, list)) else (out,)
    for x in leaves:
        if hasattr(x, "block_until_ready"):
            x.block_until_ready()
        elif isinstance(x, (tuple, list)):
            block(x)


class CupyPeak:
    """Peak bytes handed out by CuPy's memory pool while active (a MemoryHook)."""

    def __init__(self):
        import cupy

        class _Hook(cupy.cuda.MemoryHook):
            name = "bench_peak"

            def __init__(self):
                self.cur = 0
                self.peak = 0

            def malloc_postprocess(self, **kw):
                self.cur += int(kw.get("mem_size", 0))
                self.peak = max(self.peak, self.cur)

            def free_postprocess(self, **kw):
                self.cur -= int(kw.get("mem_size", 0))

        self.hook = _Hook()
        self.pool = cupy.get_default_memory_pool()

    def __enter__(self):
        self.pool.free_all_blocks()
        self.total0 = self.pool.total_bytes()
        self.hook.__enter__()
        return self

    def __exit__(self, *exc):
        self.hook.__exit__(*exc)
        self.total_grown = self.pool.total_bytes() - self.total0
        return False

    @property
    def peak(self) -> int:
        # The hook counts exactly; the pool's growth is an upper bound used if the hook saw nothing.
        return self.hook.peak if self.hook.peak > 0 else max(0, self.total_grown)


# ---------------------------------------------------------------------------------- providers
class Provider:
    """One provider variant on one Problem.

    Subclasses set `timer`, implement `setup`, `fwd`, `fwd_bwd` (returns loss, de, dc) and either
    `bwd_prepare` + `bwd` (the backward alone, timed directly) or leave `bwd_direct = False`, in
    which case bwd = fwd_bwd - fwd. `measure_memory(mode)` returns (extra bytes, output) where
    output is the result of one call (used for the errors).
    """

    name = "?"
    filter = False
    timer = "cupy"
    bwd_direct = True
    modes = ("fwd", "bwd", "fwd_bwd")
    note = ""

    def __init__(self, p: Problem):
        self.p = p

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def fwd(self):
        raise NotImplementedError

    def fwd_bwd(self):
        raise NotImplementedError

    def bwd_prepare(self):
        return None

    def bwd(self, state):
        raise NotImplementedError

    def call(self, mode: str):
        if mode == "fwd":
            return self.fwd()
        if mode == "fwd_bwd":
            return self.fwd_bwd()
        return self.bwd(self.bwd_prepare())

    def time(self, mode: str, repeats: int, warmup: int) -> float:
        t = Timer(self.timer)
        if mode == "fwd":
            return t.time(self.fwd, repeats, warmup)
        if mode == "fwd_bwd":
            return t.time(self.fwd_bwd, repeats, warmup)
        return t.time(self.bwd, repeats, warmup, prepare=self.bwd_prepare)

    def measure_memory(self, mode: str) -> tuple[int | None, Any]:
        out = self.call(mode)
        Timer(self.timer).sync()
        return None, out


def _grad_nbytes(mode: str, p: Problem) -> int:
    return p.grad_bytes() if mode in ("bwd", "fwd_bwd") else 0


# ----- cuBLAS floor
class CublasProvider(Provider):
    """The matmul floor: cupy.matmul (cuBLAS) into preallocated outputs (numpy.matmul on CPU).

    gemm_fwd: logits = E @ C.T. gemm_bwd_sum: the three GEMMs of a backward by recompute, timed
    together: logits = E @ C.T, dE = G @ C, dC = G.T @ E, with G a preallocated (N, V) buffer of
    random values in the input dtype.
    """

    name = "cublas"
    modes = ("gemm_fwd", "gemm_bwd_sum")

    def setup(self):
        p, xp = self.p, self.p.xp
        self.timer = "cupy" if p.backend == "cupy" else "host"
        self.logits = xp.empty((p.n, p.v), p.e.dtype)
        if p.backend == "cupy":
            g = xp.random.RandomState(1).standard_normal((p.n, p.v), dtype=xp.float32)
        else:
            g = np.random.default_rng(1).standard_normal((p.n, p.v), dtype=np.float32)
        g *= np.float32(1.0 / p.n)
        self.g = g.astype(p.e.dtype)
        del g
        self.de = xp.empty_like(p.e)
        self.dc = xp.empty_like(p.c)

    def teardown(self):
        self.logits = self.g = self.de = self.dc = None

    def _fwd(self):
        return self.p.xp.matmul(self.p.e, self.p.c.T, out=self.logits)

    def _bwd(self):
        xp, p = self.p.xp, self.p
        xp.matmul(p.e, p.c.T, out=self.logits)
        xp.matmul(self.g, p.c, out=self.de)
        xp.matmul(self.g.T, p.e, out=self.dc)
        return None

    def time(self, mode, repeats, warmup):
        return Timer(self.timer).time(self._fwd if mode == "gemm_fwd" else self._bwd, repeats, warmup)

    def measure_memory(self, mode):
        nbytes = self.logits.nbytes + (self.g.nbytes if mode == "gemm_bwd_sum" else 0)
        return int(nbytes), None

    note = "extra_mib = the preallocated (N, V) buffers (logits; plus G for gemm_bwd_sum)"


# ----- ours (cce_cupy, CuPy kernels on GPU, NumPy backend on CPU)
class CublasTF32Provider(CublasProvider):
    """cuBLAS E @ C.T for fp32 inputs on TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32): the GEMM
    floor of our allow_tf32 forward. gemm_fwd only."""

    name = "cublas_tf32"
    modes = ("gemm_fwd",)
    note = "cublasGemmEx, CUBLAS_COMPUTE_32F_FAST_TF32, into a preallocated (N, V) fp32 buffer"

    def _fwd(self):
        import cupy
        from cupy_backends.cuda.libs import cublas

        p = self.p
        n, d = p.e.shape
        v = p.c.shape[0]
        alpha, beta = np.ones(1, np.float32), np.zeros(1, np.float32)
        handle = cupy.cuda.device.get_cublas_handle()
        cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
        # Row-major logits (N, V) are column-major (V, N) = C (op T of column-major C^T) @ E^T.
        cublas.gemmEx(
            handle,
            cublas.CUBLAS_OP_T,
            cublas.CUBLAS_OP_N,
            v,
            n,
            d,
            alpha.ctypes.data,
            p.c.data.ptr,
            0,
            d,
            p.e.data.ptr,
            0,
            d,
            beta.ctypes.data,
            self.logits.data.ptr,
            0,
            v,
            77,
            -1,
        )  # CUDA_R_32F operands; CUBLAS_COMPUTE_32F_FAST_TF32; CUBLAS_GEMM_DEFAULT
        return self.logits

    def setup(self):
        if self.p.backend != "cupy" or self.p.e.dtype != np.float32:
            raise RuntimeError("cublas_tf32 needs fp32 inputs on the GPU")
        self.timer = "cupy"
        self.logits = self.p.xp.empty((self.p.n, self.p.v), np.float32)
        self.g = None

    def measure_memory(self, mode):
        return int(self.logits.nbytes), None


class OursProvider(Provider):
    name = "ours"

    def __init__(self, p, name="ours", **opts):
        super().__init__(p)
        self.name = name
        self.opts = opts
        self.filter = opts.get("filter_eps") is not None
        self.timer = "cupy" if p.backend == "cupy" else "host"
        self._lse = None

    def setup(self):
        import cce_cupy

        self.cce = cce_cupy
        for fn in ("linear_cross_entropy", "linear_cross_entropy_with_grad", "forward", "backward"):
            if not hasattr(cce_cupy, fn):
                raise ImportError(f"cce_cupy.{fn} is missing (cce_cupy/api.py not there yet?)")

    def fwd(self):
        return self.cce.linear_cross_entropy(self.p.e, self.p.c, self.p.t, **self.opts)

    def fwd_bwd(self):
        return self.cce.linear_cross_entropy_with_grad(self.p.e, self.p.c, self.p.t, **self.opts)

    def bwd_prepare(self):
        if self._lse is None:  # backward does not change lse: one forward serves every repeat
            lse, _tgt = self.cce.forward(self.p.e, self.p.c, self.p.t)
            self._lse = lse
        return self._lse

    def bwd(self, lse):
        return self.cce.backward(self.p.e, self.p.c, self.p.t, lse, 1.0, **self.opts)

    def teardown(self):
        self._lse = None

    def measure_memory(self, mode):
        if self.p.backend != "cupy":
            return None, self.call(mode)
        if mode == "bwd":
            state = self.bwd_prepare()
        with CupyPeak() as pk:
            out = self.bwd(state) if mode == "bwd" else self.call(mode)
            Timer("cupy").sync()
        return max(0, pk.peak - _grad_nbytes(mode, self.p)), out


# ----- torch family: inputs shared zero-copy by DLPack
def torch_views(p: Problem):
    """(e, c, t) as torch tensors sharing p's memory; e and c require grad."""
    if "torch" not in p._views:
        import torch

        tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[p.dtype]

        def share(x):
            if p.dtype in ("bfloat16", "float16"):  # 16-bit floats travel as int16 bits
                return torch.from_dlpack(x.view(p.xp.int16)).view(tdt)
            return torch.from_dlpack(x)

        e = share(p.e).detach().requires_grad_(True)
        c = share(p.c).detach().requires_grad_(True)
        t = torch.from_dlpack(p.t)
        p._views["torch"] = (e, c, t)
    return p._views["torch"]


def naive_torch_loss(e, c, t):
    """What training code does: bf16 logits, upcast to fp32, F.cross_entropy (mean)."""
    import torch.nn.functional as F

    return F.cross_entropy((e @ c.T).float(), t)


class TorchProvider(Provider):
    """Autograd providers. fwd: the loss with grad enabled (as in training, so saved tensors count);
    bwd: torch.autograd.grad alone, after an untimed forward; fwd_bwd: both."""

    timer = "torch"
    loss_fn: Callable = None

    def setup(self):
        import torch

        self.torch = torch
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        self.e, self.c, self.t = torch_views(self.p)
        self.make_loss()

    def make_loss(self):
        raise NotImplementedError

    def fwd(self):
        return self.loss_fn(self.e, self.c, self.t)

    def fwd_bwd(self):
        loss = self.loss_fn(self.e, self.c, self.t)
        de, dc = self.torch.autograd.grad(loss, (self.e, self.c))
        return loss.detach(), de, dc

    def bwd_prepare(self):
        return self.loss_fn(self.e, self.c, self.t)

    def bwd(self, loss):
        return self.torch.autograd.grad(loss, (self.e, self.c))

    def teardown(self):
        self.e = self.c = self.t = None
        self.loss_fn = None

    def measure_memory(self, mode):
        torch = self.torch
        state = self.bwd_prepare() if mode == "bwd" else None
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = self.bwd(state) if mode == "bwd" else self.call(mode)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return max(0, peak - _grad_nbytes(mode, self.p)), out


class TorchEager(TorchProvider):
    name = "torch"
    note = "bf16 logits = e @ c.T, F.cross_entropy on the fp32 upcast"

    def make_loss(self):
        self.loss_fn = naive_torch_loss


class TorchCompile(TorchProvider):
    name = "torch_compile"
    note = "torch.compile(dynamic=False) of: bf16 logits, F.cross_entropy on the fp32 upcast"
    _compiled: dict = {}

    def make_loss(self):
        key = (self.p.n, self.p.d, self.p.v, self.p.dtype)
        if key not in TorchCompile._compiled:
            TorchCompile._compiled[key] = self.torch.compile(naive_torch_loss, dynamic=False)
        self.loss_fn = TorchCompile._compiled[key]


class AppleCCE(TorchProvider):
    name = "apple_cce"

    def __init__(self, p, filter: bool):
        super().__init__(p)
        self.filter = filter
        self.note = (
            "cut_cross_entropy.linear_cross_entropy, default filter_eps ('high' = bf16 eps/32)"
            if filter
            else "cut_cross_entropy.linear_cross_entropy(filter_eps=None), exact"
        )

    def make_loss(self):
        from cut_cross_entropy import linear_cross_entropy

        if self.filter:
            self.loss_fn = linear_cross_entropy
        else:
            self.loss_fn = lambda e, c, t: linear_cross_entropy(e, c, t, filter_eps=None)


class Liger(TorchProvider):
    name = "liger"
    note = "LigerFusedLinearCrossEntropyLoss: gradients are computed inside its forward; bwd only scales"

    def make_loss(self):
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        mod = LigerFusedLinearCrossEntropyLoss()
        self.loss_fn = lambda e, c, t: mod(c, e, t)


# ----- JAX family: jit-compiled once per (shape, dtype); timed by host clock around block_until_ready
def jax_views(p: Problem):
    if "jax" not in p._views:
        import jax
        import jax.numpy as jnp

        jdt = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}[p.dtype]
        t32 = p.t.astype(p.xp.int32)
        if p.backend == "cupy":

            def share(x):
                if p.dtype in ("bfloat16", "float16"):
                    bits = jax.dlpack.from_dlpack(x.view(p.xp.int16))
                    return jax.lax.bitcast_convert_type(bits, jdt)
                return jax.dlpack.from_dlpack(x)

            try:
                e, c, t = share(p.e), share(p.c), jax.dlpack.from_dlpack(t32)
            except Exception:  # noqa: BLE001 - host round trip if DLPack import fails
                e = jnp.asarray(p.xp.asnumpy(p.e))
                c = jnp.asarray(p.xp.asnumpy(p.c))
                t = jnp.asarray(p.xp.asnumpy(t32))
        else:
            e, c, t = jnp.asarray(p.e), jnp.asarray(p.c), jnp.asarray(t32)
        jax.block_until_ready((e, c, t))
        p._views["jax"] = (e, c, t)
    return p._views["jax"]


class JaxProvider(Provider):
    """fwd: jit(loss); fwd_bwd: jit(value_and_grad(loss, argnums=(0, 1))); bwd = fwd_bwd - fwd.
    extra_mib: XLA's temp buffer size of the compiled executable (memory_analysis)."""

    timer = "host"
    bwd_direct = False
    note = "bwd = fwd_bwd - fwd (XLA runs them as one program); timed by host clock + block_until_ready"

    def setup(self):
        import jax

        self.jax = jax
        self.e, self.c, self.t = jax_views(self.p)
        loss = self.make_loss()
        args = (self.e, self.c, self.t)
        self.f_fwd = jax.jit(loss).lower(*args).compile()
        self.f_fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()

    def make_loss(self) -> Callable:
        raise NotImplementedError

    def fwd(self):
        return self.f_fwd(self.e, self.c, self.t)

    def fwd_bwd(self):
        loss, (de, dc) = self.f_fb(self.e, self.c, self.t)
        return loss, de, dc

    def time(self, mode, repeats, warmup):
        t = Timer("host")
        if mode == "fwd":
            return t.time(self.fwd, repeats, warmup)
        if mode == "fwd_bwd":
            return t.time(self.fwd_bwd, repeats, warmup)
        raise ValueError("bwd is derived")

    def measure_memory(self, mode):
        compiled = self.f_fwd if mode == "fwd" else self.f_fb
        out = self.fwd() if mode == "fwd" else self.fwd_bwd()
        block(out)
        try:
            temp = int(compiled.memory_analysis().temp_size_in_bytes)
        except Exception:  # noqa: BLE001 - some backends give no analysis
            temp = None
        return temp, out

    def teardown(self):
        self.f_fwd = self.f_fb = None
        self.e = self.c = self.t = None


class Optax(JaxProvider):
    name = "optax"
    note = JaxProvider.note + "; bf16 logits = e @ c.T, optax CE on the fp32 upcast"

    def make_loss(self):
        import jax.numpy as jnp
        import optax

        def loss(e, c, t):
            logits = (e @ c.T).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, t).mean()

        return loss


class JaxCCE(JaxProvider):
    name = "jax_cce"
    note = JaxProvider.note + "; jax_cce.linear_cross_entropy defaults (chunk_size 4096, no filter)"

    def make_loss(self):
        import jax_cce

        return lambda e, c, t: jax_cce.linear_cross_entropy(e, c, t)


class JaxBindings(JaxProvider):
    name = "jax_bindings"
    note = JaxProvider.note + "; our custom_vjp over buffer_callback, default options"
    opts: dict = {}

    def make_loss(self):
        import jax_bindings

        opts = dict(self.opts)
        return lambda e, c, t: jax_bindings.linear_cross_entropy(e, c, t, **opts)


class JaxBindingsFilter(JaxBindings):
    note = JaxProvider.note + "; our custom_vjp over buffer_callback, filter_eps='auto'"
    opts = {"filter_eps": "auto"}


class JaxBindingsCmdBuf(JaxBindings):
    name = "jax_bindings_cmdbuf"
    note = JaxProvider.note + "; our custom_vjp, command_buffer_compatible=True (CUDA-graph capture)"
    opts = {"command_buffer_compatible": True}


# -------------------------------------------------------------------------------- the registry
GPU_ONLY = {"torch", "torch_compile", "apple_cce", "liger"}
ALL_PROVIDERS = (
    "cublas",
    "ours",
    "ours_deterministic",
    "ours_filter",
    "torch_compile",
    "torch",
    "apple_cce",
    "apple_cce_exact",
    "liger",
    "jax_bindings",
    "jax_bindings_filter",
    "optax",
    "jax_cce",
)
# The GEMM floors (timed without an untimed first call of their own; modes of their own).
GEMM_MODES = {"cublas": CublasProvider.modes, "cublas_tf32": CublasTF32Provider.modes}
GEMM_PROVIDERS = tuple(GEMM_MODES)
# Known but not run unless named in --providers.
EXTRA_PROVIDERS = ("jax_bindings_cmdbuf", "cublas_tf32", "ours_tf32")


def make_provider(key: str, p: Problem) -> Provider:
    """A provider variant by its command-line key (see ALL_PROVIDERS)."""
    if key == "cublas":
        return CublasProvider(p)
    if key == "ours":
        return OursProvider(p)
    if key == "ours_deterministic":
        return OursProvider(p, name="ours_deterministic", deterministic=True)
    if key == "ours_filter":
        return OursProvider(p, name="ours", filter_eps="auto")
    if key == "ours_tf32":
        return OursProvider(p, name="ours_tf32", allow_tf32=True)
    if key == "cublas_tf32":
        return CublasTF32Provider(p)
    if key == "torch":
        return TorchEager(p)
    if key == "torch_compile":
        return TorchCompile(p)
    if key == "apple_cce":
        return AppleCCE(p, filter=True)
    if key == "apple_cce_exact":
        return AppleCCE(p, filter=False)
    if key == "liger":
        return Liger(p)
    if key == "optax":
        return Optax(p)
    if key == "jax_cce":
        return JaxCCE(p)
    if key == "jax_bindings":
        return JaxBindings(p)
    if key == "jax_bindings_filter":
        return JaxBindingsFilter(p)
    if key == "jax_bindings_cmdbuf":
        return JaxBindingsCmdBuf(p)
    raise ValueError(f"unknown provider {key!r}; known: {', '.join(ALL_PROVIDERS + EXTRA_PROVIDERS)}")


def provider_identity(key: str) -> tuple[str, bool]:
    """(provider name as recorded, filter flag) of a command-line key."""
    return {
        "ours_filter": ("ours", True),
        "jax_bindings_filter": ("jax_bindings", True),
        "apple_cce": ("apple_cce", True),
        "apple_cce_exact": ("apple_cce", False),
    }.get(key, (key, False))


def free_device_memory() -> None:
    """Return cached blocks of every framework already imported (never imports one)."""
    import sys

    gc.collect()
    if "cupy" in sys.modules:
        try:
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
        except Exception:  # noqa: BLE001
            pass
    if "torch" in sys.modules:
        try:
            torch = sys.modules["torch"]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
