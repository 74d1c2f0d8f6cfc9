"""Replica choice: which slot serves each (token, k) entry. Runs per EP rank inside shard_map.

Axis legend: T local tokens, K top-k, E experts, M max replicas, S slots, R ranks.

* ``round_robin``: TensorRT-LLM's rule (kernels' route_to_slots), rank offset = EP rank.
* ``load_aware``: the all-gathered per-rank expert counts of this batch decide, identically on
  every rank, how many entries of each expert each replica takes (water-filling: every
  expert's entries go preferably to its replicas on the least-loaded ranks; a few passes over
  all replicated experts at once, so no long chain of dependent steps); an entry's global
  index within its expert (lower ranks first, then local order) picks its replica. The batch
  keeps the round-robin choice instead if that happens to give a lower max rank load, so
  load_aware is never worse than round_robin. With shared-expert balancing the tokens' shared rows
  join the split (``moe._split.balanced_shares``) and each token's shared row gets a rank too.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_eplb.moe._split import balanced_shares, replica_quotas, rounded
from jax_eplb_kernels import SlotRouting, routing_histogram, route_to_slots
from jax_eplb_kernels.slot_routing.reference import replica_occurrence

def round_robin_slots(expert_ids, replica_count, expert_slots, num_slots, rank, implementation="auto",
                      with_histogram: bool = False) -> SlotRouting:
    """``[T, K]`` slots by TensorRT-LLM's rule with the EP rank as block offset (and, fused, this
    rank's ``[S]`` slot histogram when asked)."""
    return route_to_slots(expert_ids, replica_count, expert_slots, num_slots, rank_offset=rank,
                          with_histogram=with_histogram, implementation=implementation)


class SharedRouting(NamedTuple):
    """Where each token's shared-expert rows are computed (``shared_rank`` ``[T]``, R for masked
    tokens) and this rank's ``[R]`` count of its tokens' shared rows sent to each rank."""

    shared_rank: jax.Array
    shared_counts: jax.Array


def load_aware_slots(expert_ids, replica_count, expert_slots, num_slots, rank, axis_name: str,
                     implementation: str = "auto", shared_mask=None,
                     rows_per_token: int = 1) -> SlotRouting | tuple[SlotRouting, SharedRouting]:
    """``[T, K]`` slots so that, over all ranks, the batch's per-rank loads are as even as possible,
    with this rank's ``[S]`` histogram of the chosen slots (it is computed anyway).

    ``shared_mask``: ``[T]`` bool, the tokens whose shared-expert row this rank brings (shared-expert
    balancing; ``rows_per_token`` rows of the experts' FFN width each): the shared rows join the split
    (any rank may compute them) and a SharedRouting comes back too. A rank keeps its own tokens'
    rows up to its quota; the rest, in rank order, fill the ranks whose quota exceeds their own rows."""
    num_experts, max_replicas = expert_slots.shape
    num_ranks = jax.lax.axis_size(axis_name)
    slots_per_rank = num_slots // num_ranks
    flat = expert_ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    safe = jnp.where(valid, flat, 0)
    local_counts = routing_histogram(flat, num_experts, implementation=implementation)
    if shared_mask is None:
        all_counts = jax.lax.all_gather(local_counts, axis_name)  # [R, E]
        quotas = replica_quotas(all_counts.sum(axis=0), replica_count, expert_slots, slots_per_rank, num_ranks)
    else:
        gathered = jax.lax.all_gather(jnp.append(local_counts, jnp.sum(shared_mask, dtype=jnp.int32)), axis_name)
        all_counts, own_shared = gathered[:, :-1], gathered[:, -1]  # [R, E], [R]
        counts = all_counts.sum(axis=0)
        split = balanced_shares(counts, replica_count, expert_slots, own_shared * rows_per_token, slots_per_rank,
                                num_ranks)
        quotas = jnp.where(expert_slots >= 0, rounded(split.replica, counts), 0)
        shared_quota = rounded(split.shared / rows_per_token, jnp.sum(own_shared))  # [R] tokens
    lower_ranks = jnp.sum(jnp.where(jnp.arange(num_ranks)[:, None] < rank, all_counts, 0), axis=0)  # [E]
    bounds = jnp.cumsum(quotas, axis=1)  # [E, M]
    global_index = lower_ranks[safe] + replica_occurrence(flat, num_experts, block=flat.shape[0])
    replica = jnp.sum(global_index[:, None] >= bounds[safe], axis=1)
    replica = jnp.minimum(replica, jnp.maximum(replica_count[safe] - 1, 0))
    slot = expert_slots[safe, replica]
    water = jnp.where(valid, slot, num_slots).astype(jnp.int32).reshape(expert_ids.shape)
    # Integer rounding and the sweep order can leave water-filling a hair behind the fixed rule on
    # small batches: keep whichever of the two gives the lower max rank load (same choice on
    # every rank, decided from psum-ed slot counts; shared rows counted where each choice puts them).
    robin = round_robin_slots(expert_ids, replica_count, expert_slots, num_slots, rank, implementation,
                              with_histogram=True)
    local_slots = jnp.stack([routing_histogram(water, num_slots, implementation=implementation),
                             robin.slot_counts])  # [2, S]
    rows = jax.lax.psum(local_slots, axis_name).reshape(2, num_ranks, -1).sum(axis=2)  # [2, R]
    if shared_mask is not None:
        rows = rows + rows_per_token * jnp.stack([shared_quota, own_shared])
    peak = rows.max(axis=1)  # [2]
    keep_water = peak[0] <= peak[1]
    routing = SlotRouting(jnp.where(keep_water, water, robin.slot_ids),
                          jnp.where(keep_water, local_slots[0], local_slots[1]))
    if shared_mask is None:
        return routing
    home = jnp.where(shared_mask, rank, num_ranks).astype(jnp.int32)
    moved = _shared_destinations(shared_mask, own_shared, shared_quota, rank)
    shared_rank = jnp.where(keep_water, moved, home)
    counts = jnp.zeros((num_ranks,), jnp.int32).at[shared_rank].add(1, mode="drop")
    return routing, SharedRouting(shared_rank, counts)


def _shared_destinations(shared_mask, own, quota, rank):
    """``[T]`` rank computing each of this rank's tokens' shared rows (R: masked), for ``own`` ``[R]``
    rows brought and ``quota`` ``[R]`` rows computed per rank: every rank keeps min(own, quota) of
    its tokens (the first ones); the others, in rank order, fill the ranks with quota > own in
    rank order."""
    num_ranks = own.shape[0]
    keep = jnp.minimum(own, quota)
    given = own - keep  # [R]
    wanted = jnp.cumsum(quota - keep)  # [R] running total of the rows ranks take from others
    index = jnp.cumsum(shared_mask) - 1  # [T] among this rank's tokens
    donated = jnp.sum(jnp.where(jnp.arange(num_ranks) < rank, given, 0)) + index - keep[rank]
    taker = jnp.minimum(jnp.searchsorted(wanted, donated, side="right"), num_ranks - 1).astype(jnp.int32)
    return jnp.where(~shared_mask, num_ranks, jnp.where(index < keep[rank], rank, taker)).astype(jnp.int32)
