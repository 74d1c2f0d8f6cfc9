"""Plain-XLA expert -> slot routing (TensorRT-LLM's round-robin rule): oracle and CPU fallback.

Axis legend: T tokens, K top-k, N = T*K entries, E experts, M max replicas, S slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROUND_ROBIN_BLOCK = 1024  # entries per block in TensorRT-LLM's rule


def replica_occurrence(flat_ids: jax.Array, num_experts: int, block: int) -> jax.Array:
    """``[N]``: how many earlier entries of the same block hold the same id (invalid ids grouped)."""
    n = flat_ids.shape[0]
    valid = (flat_ids >= 0) & (flat_ids < num_experts)
    position = jnp.arange(n, dtype=jnp.int32)
    key = (position // block) * (num_experts + 1) + jnp.where(valid, flat_ids, num_experts)
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    first = jnp.searchsorted(sorted_key, sorted_key, side="left").astype(jnp.int32)
    return jnp.zeros((n,), jnp.int32).at[order].set(position - first)


def route_reference(expert_ids: jax.Array, replica_count: jax.Array, expert_slots: jax.Array,
                    num_slots: int, rank_offset: jax.Array | int = 0, block: int = ROUND_ROBIN_BLOCK) -> jax.Array:
    """``[T, K]`` expert ids -> ``[T, K]`` slot ids.

    Entry i (row-major) in block b = i // block goes to replica
    ``(b + rank_offset + earlier occurrences of its expert in the block) % replica_count[e]``;
    replicas are ``expert_slots[e]`` (ascending slot ids). Invalid ids map to ``num_slots``.

    Args:
      replica_count: ``[E]`` int; expert_slots: ``[E, M]`` int, -1 padded.
      rank_offset: the EP rank under attention data parallelism, else 0.
    """
    num_experts = replica_count.shape[0]
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    valid = (flat >= 0) & (flat < num_experts)
    safe = jnp.where(valid, flat, 0)
    occurrence = replica_occurrence(flat, num_experts, block)
    block_index = jnp.arange(flat.shape[0], dtype=jnp.int32) // block
    count = jnp.maximum(replica_count[safe], 1)
    replica = (block_index + rank_offset + occurrence) % count
    slot = expert_slots[safe, replica]
    return jnp.where(valid, slot, num_slots).astype(jnp.int32).reshape(expert_ids.shape)
