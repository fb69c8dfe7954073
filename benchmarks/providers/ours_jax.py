"""Ours in JAX: `jax_bindings.linear_cross_entropy` (custom_vjp over buffer_callback)."""

from __future__ import annotations

from ._jax import JaxProvider


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


class JaxBindingsBudget(JaxBindings):
    note = JaxProvider.note + "; our custom_vjp with memory_budget=4 GiB (the gradients come out of the forward)"
    opts = {"memory_budget": 4 << 30}
