"""The `jax-cce` package's chunked linear cross-entropy (`jax_cce.linear_cross_entropy`)."""

from __future__ import annotations

from ._jax import JaxProvider


class JaxCCE(JaxProvider):
    name = "jax_cce"
    note = JaxProvider.note + "; jax_cce.linear_cross_entropy defaults (chunk_size 4096, no filter)"

    def make_loss(self):
        import jax_cce

        return lambda e, c, t: jax_cce.linear_cross_entropy(e, c, t)
