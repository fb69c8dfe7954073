"""What training code does in JAX: logits materialized, optax's cross-entropy on them. Optax: bf16
logits upcast to fp32 (the common case); OptaxFp32: the logits computed in fp32 from the 16-bit
inputs (preferred_element_type), accurate as an exact fused loss is (issue 17 times it at 90 ms)."""

from __future__ import annotations

from ._jax import JaxProvider


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


class OptaxFp32(JaxProvider):
    name = "optax_fp32"
    note = JaxProvider.note + "; fp32 logits = e @ c.T accumulated and kept in fp32, optax CE"

    def make_loss(self):
        import jax.numpy as jnp
        import optax

        def loss(e, c, t):
            logits = jnp.einsum("nd,vd->nv", e, c, preferred_element_type=jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, t).mean()

        return loss
