"""Plain-XLA routing histogram: the oracle and the CPU fallback."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def histogram_reference(ids: jax.Array, num_bins: int) -> jax.Array:
    """Counts ``ids`` (any shape, int) into ``[num_bins]`` int32; ids < 0 or >= num_bins ignored."""
    flat = ids.reshape(-1).astype(jnp.int32)
    valid = (flat >= 0) & (flat < num_bins)
    return jnp.zeros((num_bins,), jnp.int32).at[jnp.where(valid, flat, num_bins)].add(1, mode="drop")
