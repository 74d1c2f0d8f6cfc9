"""The SwiGLU feed-forward network: dense MLP layers and the shared experts of an MoE layer.

Axis legend: T tokens, H hidden, F FFN width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_eplb.moe._fp8 import linear_weight, weight_value

_INIT = jax.nn.initializers.normal(0.02)


def swiglu(x, gate, up, down):
    """``down(silu(x @ gate) * (x @ up))`` for ``x`` ``[T, H]``, ``[H, F]``, ``[H, F]``, ``[F, H]``; float32 out."""
    h = jax.nn.silu(jnp.dot(x, gate, preferred_element_type=jnp.float32)) * jnp.dot(
        x, up, preferred_element_type=jnp.float32)
    return jnp.dot(h.astype(x.dtype), down, preferred_element_type=jnp.float32)


class MLP(nnx.Module):
    """SwiGLU FFN with replicated weights: gate, up ``[H, F]``; down ``[F, H]`` (``Fp8Weight``s in
    ``weight_block``s when given)."""

    def __init__(self, hidden_size: int, ffn_size: int, *, dtype=jnp.float32,
                 weight_block: tuple[int, int] | None = None, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        self.gate, self.up, self.down = (
            linear_weight(shape, dtype, weight_block, init=_INIT, rngs=rngs)
            for shape in ((hidden_size, ffn_size), (hidden_size, ffn_size), (ffn_size, hidden_size)))

    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(gate, up, down) in the compute dtype (FP8 dequantized here)."""
        return tuple(weight_value(w, self.dtype) for w in (self.gate, self.up, self.down))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` ``[..., H]`` -> ``[..., H]`` float32."""
        return swiglu(x, *self.weights())
