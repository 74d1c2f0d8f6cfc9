"""Replica choice: which slot serves each (token, k) entry. Runs per EP rank inside shard_map.

Axis legend: T local tokens, K top-k, E experts, M max replicas, S slots, R ranks.

* ``round_robin``: TensorRT-LLM's rule (kernels' route_to_slots), rank offset = EP rank.
* ``load_aware``: the all-gathered per-rank expert counts of this batch decide, identically on
  every rank, how many entries of each expert each replica takes (water-filling: every
  expert's entries go preferably to its replicas on the least-loaded ranks); an entry's global
  index within its expert (lower ranks first, then local order) picks its replica. The batch
  keeps the round-robin choice instead if that happens to give a lower max rank load, so
  load_aware is never worse than round_robin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_eplb_kernels import SlotRouting, routing_histogram, route_to_slots
from jax_eplb_kernels.slot_routing.reference import replica_occurrence

def round_robin_slots(expert_ids, replica_count, expert_slots, num_slots, rank, implementation="auto",
                      with_histogram: bool = False) -> SlotRouting:
    """``[T, K]`` slots by TensorRT-LLM's rule with the EP rank as block offset (and, fused, this
    rank's ``[S]`` slot histogram when asked)."""
    return route_to_slots(expert_ids, replica_count, expert_slots, num_slots, rank_offset=rank,
                          with_histogram=with_histogram, implementation=implementation)


def replica_quotas(expert_counts, replica_count, expert_slots, slots_per_rank, num_ranks, sweeps: int = 2):
    """``[E, M]`` entries each replica should take so that rank loads come out even.

    Args:
      expert_counts: ``[E]`` global entries per expert this batch.
    Experts with one replica are fixed load; each replicated expert (at most S - E of them), in
    turn, pours its entries into its replicas' ranks lowest-first (water-filling), ``sweeps``
    times over.
    """
    num_experts, max_replicas = expert_slots.shape
    counts = expert_counts.astype(jnp.float32)
    valid = expert_slots >= 0  # [E, M]
    replica_rank = jnp.where(valid, expert_slots // slots_per_rank, 0)  # [E, M]
    even = jnp.where(valid, counts[:, None] / jnp.maximum(replica_count, 1)[:, None], 0.0)  # start: even split
    rank_load = jnp.zeros((num_ranks,), jnp.float32).at[replica_rank.reshape(-1)].add(even.reshape(-1))

    def pour(e, carry):
        quota, rank_load = carry
        mine = quota[e]  # [M]
        rank_load = rank_load.at[replica_rank[e]].add(-mine)
        base = jnp.where(valid[e], rank_load[replica_rank[e]], jnp.inf)  # [M]
        # water level L with sum(max(0, L - base)) = counts[e], over sorted bases.
        order = jnp.sort(base)
        finite = jnp.isfinite(order)
        prefix = jnp.cumsum(jnp.where(finite, order, 0.0))
        j = jnp.arange(1, max_replicas + 1, dtype=jnp.float32)
        level = (counts[e] + prefix) / j  # level if the first j replicas are filled
        ok = finite & (level >= order)  # valid j form a prefix; the level falls as j grows
        level = jnp.min(jnp.where(ok, level, jnp.inf))
        new = jnp.where(valid[e], jnp.maximum(level - base, 0.0), 0.0)
        rank_load = rank_load.at[replica_rank[e]].add(new)
        return quota.at[e].set(new), rank_load

    # Only replicated experts have a choice (pouring a single-replica expert is a no-op), and
    # at most S - E experts are replicated: loop over those instead of all E.
    num_slots = slots_per_rank * num_ranks
    candidates = min(num_experts, max(num_slots - num_experts, 0))
    replicated = jnp.argsort(replica_count <= 1, stable=True)[:candidates]  # replicated experts first

    def sweep(_, carry):
        return jax.lax.fori_loop(0, candidates, lambda i, c: pour(replicated[i], c), carry)

    quota = jax.lax.fori_loop(0, sweeps, sweep, (even, rank_load))[0] if candidates else even
    # Integer quotas summing exactly to each expert's count (largest remainders first).
    floor = jnp.floor(quota)
    remainder = jnp.where(valid, quota - floor, -1.0)
    missing = (counts - floor.sum(axis=1)).astype(jnp.int32)  # [E]
    rank_of_remainder = jnp.argsort(jnp.argsort(-remainder, axis=1), axis=1)
    return (floor + (rank_of_remainder < missing[:, None])).astype(jnp.int32)


def load_aware_slots(expert_ids, replica_count, expert_slots, num_slots, rank, axis_name: str,
                     implementation: str = "auto") -> SlotRouting:
    """``[T, K]`` slots so that, over all ranks, the batch's per-rank loads are as even as possible,
    with this rank's ``[S]`` histogram of the chosen slots (it is computed anyway)."""
    num_experts, max_replicas = expert_slots.shape
    num_ranks = jax.lax.axis_size(axis_name)
    flat = expert_ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    safe = jnp.where(valid, flat, 0)
    local_counts = routing_histogram(flat, num_experts, implementation=implementation)
    all_counts = jax.lax.all_gather(local_counts, axis_name)  # [R, E]
    lower_ranks = jnp.sum(jnp.where(jnp.arange(num_ranks)[:, None] < rank, all_counts, 0), axis=0)  # [E]
    quotas = replica_quotas(all_counts.sum(axis=0), replica_count, expert_slots, num_slots // num_ranks, num_ranks)
    bounds = jnp.cumsum(quotas, axis=1)  # [E, M]
    global_index = lower_ranks[safe] + replica_occurrence(flat, num_experts, block=flat.shape[0])
    replica = jnp.sum(global_index[:, None] >= bounds[safe], axis=1)
    replica = jnp.minimum(replica, jnp.maximum(replica_count[safe] - 1, 0))
    slot = expert_slots[safe, replica]
    water = jnp.where(valid, slot, num_slots).astype(jnp.int32).reshape(expert_ids.shape)
    # Integer rounding and the sweep order can leave water-filling a hair behind the fixed rule on
    # small batches: keep whichever of the two gives the lower max rank load (same choice on
    # every rank, decided from psum-ed slot counts).
    robin = round_robin_slots(expert_ids, replica_count, expert_slots, num_slots, rank, implementation,
                              with_histogram=True)
    local_slots = jnp.stack([routing_histogram(water, num_slots, implementation=implementation),
                             robin.slot_counts])  # [2, S]
    peak = jax.lax.psum(local_slots, axis_name).reshape(2, num_ranks, -1).sum(axis=2).max(axis=1)  # [2]
    keep_water = peak[0] <= peak[1]
    return SlotRouting(jnp.where(keep_water, water, robin.slot_ids),
                       jnp.where(keep_water, local_slots[0], local_slots[1]))
