"""Public expert -> slot routing with an ``implementation=`` override."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_eplb_kernels._dispatch import resolve_implementation
from jax_eplb_kernels._outer_count import MIN_DOT_DIM
from jax_eplb_kernels.histogram.reference import histogram_reference
from jax_eplb_kernels.slot_routing.pallas_gpu import RoutingBlockSizes, route_pallas
from jax_eplb_kernels.slot_routing.reference import ROUND_ROBIN_BLOCK, route_reference


class SlotRouting(NamedTuple):
    """slot_ids: ``[T, K]`` int32 (num_slots for invalid entries); slot_counts: ``[S]`` int32 or None."""

    slot_ids: jax.Array
    slot_counts: jax.Array | None


def route_to_slots(expert_ids: jax.Array, replica_count: jax.Array, expert_slots: jax.Array, num_slots: int, *,
                   rank_offset: jax.Array | int = 0, with_histogram: bool = False, block: int = ROUND_ROBIN_BLOCK,
                   implementation: str = "auto", block_sizes: RoutingBlockSizes = RoutingBlockSizes()) -> SlotRouting:
    """Chooses a replica slot for every (token, k) entry by TensorRT-LLM's round-robin rule.

    Args:
      expert_ids: ``[T, K]`` int expert ids; ids < 0 or >= E are invalid (-> ``num_slots``).
      replica_count: ``[E]``; expert_slots: ``[E, M]`` ascending slot ids, -1 padded (one layer
        of :class:`jax_eplb.AssignmentTables`).
      rank_offset: added to the block index (the EP rank under attention data parallelism).
      with_histogram: also return the ``[S]`` count of entries per chosen slot.
      implementation: ``auto`` | ``xla`` | ``pallas`` | ``pallas_interpret``.
    """
    if expert_ids.ndim != 2:
        raise ValueError(f"expert_ids must be [T, K], got shape {expert_ids.shape}")
    if replica_count.ndim != 1 or expert_slots.ndim != 2 or expert_slots.shape[0] != replica_count.shape[0]:
        raise ValueError(f"expected replica_count [E] and expert_slots [E, M], got {replica_count.shape} "
                         f"and {expert_slots.shape}")
    if num_slots < replica_count.shape[0]:
        raise ValueError(f"num_slots ({num_slots}) < experts ({replica_count.shape[0]})")
    num_experts, max_replicas = expert_slots.shape
    impl = resolve_implementation(
        implementation, probe=lambda: _probe(num_experts, max_replicas, num_slots, block, block_sizes),
        probe_key=("expert_to_slot_routing", num_experts, max_replicas, num_slots, block, block_sizes))
    if impl == "xla":
        slots = route_reference(expert_ids, replica_count, expert_slots, num_slots, rank_offset, block)
        counts = histogram_reference(slots, num_slots) if with_histogram else None
        return SlotRouting(slots, counts)
    chunk = min(block_sizes.chunk, block)
    if block % chunk:
        raise ValueError(f"block ({block}) must be a multiple of the chunk ({chunk})")
    if impl == "pallas" and chunk < MIN_DOT_DIM:
        raise ValueError(f"compiled Pallas needs chunk >= {MIN_DOT_DIM} (the slot histogram is a dot), got {chunk}")
    slots, counts = route_pallas(expert_ids, jnp.asarray(replica_count), jnp.asarray(expert_slots), rank_offset,
                                 num_slots, block, block_sizes, interpret=impl == "pallas_interpret")
    return SlotRouting(slots, counts if with_histogram else None)


def _probe(num_experts: int, max_replicas: int, num_slots: int, block: int, block_sizes: RoutingBlockSizes) -> bool:
    """Compiled Pallas == reference (slot ids and histogram) on a table of this shape, with a hot
    expert, invalid ids and a partial last block."""
    slot_expert = np.concatenate([np.arange(num_experts), np.arange(num_slots - num_experts) % num_experts])
    replica_count = np.bincount(slot_expert, minlength=num_experts).astype(np.int32)
    expert_slots = np.full((num_experts, max_replicas), -1, np.int32)
    for e in range(num_experts):
        slots = np.flatnonzero(slot_expert == e)[:max_replicas]
        expert_slots[e, : slots.size] = slots
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, num_experts + 1, size=(2 * block + 7, 1)).astype(np.int32)
    ids[:block // 2] = 0  # expert 0 has the most replicas
    args = (jnp.asarray(ids), jnp.asarray(replica_count), jnp.asarray(expert_slots))
    got = route_pallas(*args, 1, num_slots, block, block_sizes)
    want_slots = route_reference(*args, num_slots, 1, block)
    want_counts = histogram_reference(want_slots, num_slots)
    return bool(jnp.array_equal(got[0], want_slots) and jnp.array_equal(got[1], want_counts))
