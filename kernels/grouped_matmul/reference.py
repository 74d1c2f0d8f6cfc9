"""Plain-XLA tile-grouped matmul: the oracle and the CPU path (one weight copy gathered per tile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tile_grouped_matmul_reference(x: jax.Array, w: jax.Array, tile_group: jax.Array) -> jax.Array:
    """``x [NT * tile, K]`` (tile t's rows all use group ``tile_group[t]``), ``w [m, K, N]``
    -> ``[NT * tile, N]`` f32."""
    num_tiles = tile_group.shape[0]
    xt = x.reshape(num_tiles, -1, x.shape[1])
    out = jnp.einsum("tik,tkn->tin", xt, w[tile_group], preferred_element_type=jnp.float32)
    return out.reshape(x.shape[0], w.shape[2])
