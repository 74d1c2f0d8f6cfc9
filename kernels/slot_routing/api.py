"""Public expert -> slot routing with an ``implementation=`` override."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_eplb_kernels._dispatch import resolve_implementation, triton_in_auto
from jax_eplb_kernels._outer_count import MIN_DOT_DIM
from jax_eplb_kernels.histogram.reference import histogram_reference
from jax_eplb_kernels._mosaic_gpu import mosaic_gpu_available
from jax_eplb_kernels.slot_routing.mosaic_gpu import route_mosaic_gpu
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
      implementation: ``auto`` (on a GPU the fastest correct of XLA, Pallas on Mosaic GPU and - on
        JAX < 0.11 only - Pallas on Triton, measured at this shape; XLA elsewhere), ``xla``,
        ``mosaic_gpu`` (Hopper and newer), ``pallas`` (Triton), or their ``*_interpret`` forms.
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
        implementation, trials=lambda: _trials(expert_ids.shape, num_experts, max_replicas, num_slots, block,
                                               block_sizes),
        key=("expert_to_slot_routing", expert_ids.shape, num_experts, max_replicas, num_slots, block, block_sizes),
        subject=f"expert-to-slot routing ({expert_ids.shape[0]}x{expert_ids.shape[1]} ids, {num_experts} experts, "
                f"{num_slots} slots)")
    if impl == "xla":
        slots = route_reference(expert_ids, replica_count, expert_slots, num_slots, rank_offset, block)
        counts = histogram_reference(slots, num_slots) if with_histogram else None
        return SlotRouting(slots, counts)
    if impl.startswith("mosaic_gpu"):
        slots, counts = route_mosaic_gpu(expert_ids, jnp.asarray(replica_count), jnp.asarray(expert_slots),
                                         rank_offset, num_slots, block, interpret=impl == "mosaic_gpu_interpret")
        return SlotRouting(slots, counts if with_histogram else None)
    chunk = min(block_sizes.chunk, block)
    if block % chunk:
        raise ValueError(f"block ({block}) must be a multiple of the chunk ({chunk})")
    if impl == "pallas" and chunk < MIN_DOT_DIM:
        raise ValueError(f"compiled Pallas needs chunk >= {MIN_DOT_DIM} (the slot histogram is a dot), got {chunk}")
    slots, counts = route_pallas(expert_ids, jnp.asarray(replica_count), jnp.asarray(expert_slots), rank_offset,
                                 num_slots, block, block_sizes, interpret=impl == "pallas_interpret")
    return SlotRouting(slots, counts if with_histogram else None)


def _trials(shape, num_experts: int, max_replicas: int, num_slots: int, block: int,
            block_sizes: RoutingBlockSizes) -> dict:
    """``auto``'s candidates on ids of this shape for a table of this shape, with a hot expert,
    invalid ids and a partial last block: slot ids and histogram, both compared."""
    slot_expert = np.concatenate([np.arange(num_experts), np.arange(num_slots - num_experts) % num_experts])
    replica_count = np.bincount(slot_expert, minlength=num_experts).astype(np.int32)
    expert_slots = np.full((num_experts, max_replicas), -1, np.int32)
    for e in range(num_experts):
        slots = np.flatnonzero(slot_expert == e)[:max_replicas]
        expert_slots[e, : slots.size] = slots
    replica_count = np.minimum(replica_count, max_replicas)
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, num_experts + 1, size=shape).astype(np.int32)
    ids.reshape(-1)[: ids.size // 4] = 0  # expert 0 has the most replicas
    args = (jnp.asarray(ids), jnp.asarray(replica_count), jnp.asarray(expert_slots))

    @jax.jit
    def reference(ids, count, table):
        slots = route_reference(ids, count, table, num_slots, 1, block)
        return slots, histogram_reference(slots, num_slots)

    runs = {"xla": lambda: reference(*args)}
    if mosaic_gpu_available():
        runs["mosaic_gpu"] = lambda: route_mosaic_gpu(*args, 1, num_slots, block)
    if triton_in_auto():
        runs["pallas"] = lambda: route_pallas(*args, 1, num_slots, block, block_sizes)
    return runs
