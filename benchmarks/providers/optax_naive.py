"""What training code does in JAX: bf16 logits, optax's cross-entropy on the fp32 upcast."""

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
