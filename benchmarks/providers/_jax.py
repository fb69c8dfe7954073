"""The JAX family's shared parts: inputs shared by DLPack, the jit-compiled provider (timed by host
clock around block_until_ready)."""

from __future__ import annotations

from typing import Callable

from .base import Provider
from .measure import Timer, block
from .problem import Problem


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
