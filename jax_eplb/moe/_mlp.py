"""The SwiGLU feed-forward network: dense MLP layers and the shared experts of an MoE layer.

Axis legend: T tokens, H hidden, F FFN width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_INIT = jax.nn.initializers.normal(0.02)


def swiglu(x, gate, up, down):
    """``down(silu(x @ gate) * (x @ up))`` for ``x`` ``[T, H]``, ``[H, F]``, ``[H, F]``, ``[F, H]``; float32 out."""
    h = jax.nn.silu(jnp.dot(x, gate, preferred_element_type=jnp.float32)) * jnp.dot(
        x, up, preferred_element_type=jnp.float32)
    return jnp.dot(h.astype(x.dtype), down, preferred_element_type=jnp.float32)


class MLP(nnx.Module):
    """SwiGLU FFN with replicated weights: gate, up ``[H, F]``; down ``[F, H]``."""

    def __init__(self, hidden_size: int, ffn_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.gate = nnx.Param(_INIT(rngs.params(), (hidden_size, ffn_size), dtype))
        self.up = nnx.Param(_INIT(rngs.params(), (hidden_size, ffn_size), dtype))
        self.down = nnx.Param(_INIT(rngs.params(), (ffn_size, hidden_size), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` ``[..., H]`` -> ``[..., H]`` float32."""
        return swiglu(x, self.gate.get_value(), self.up.get_value(), self.down.get_value())
