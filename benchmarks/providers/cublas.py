"""The cuBLAS GEMM floors: what any loss over E @ C.T costs at least."""

from __future__ import annotations

import numpy as np

from .base import Provider
from .measure import Timer


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
