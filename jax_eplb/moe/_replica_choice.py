"""Replica choice: which slot serves each (token, k) entry. Runs per EP rank inside shard_map.

Axis legend: T local tokens, K top-k, E experts, M max replicas, S slots, R ranks.

* ``round_robin``: TensorRT-LLM's rule (kernels' route_to_slots), rank offset = EP rank.
* ``load_aware``: the all-gathered per-rank expert counts of this batch decide, identically on
  every rank, how many entries of each expert each replica takes (water-filling: every
  expert's entries go preferably to its replicas on the least-loaded ranks; a few passes over
  all replicated experts at once, so no long chain of dependent steps); an entry's global
  index within its expert (lower ranks first, then local order) picks its replica. The batch
  keeps the round-robin choice instead if that happens to give a lower max rank load, so
  load_aware is never worse than round_robin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_eplb.planning._split import SPLIT_PASSES
from jax_eplb_kernels import SlotRouting, routing_histogram, route_to_slots
from jax_eplb_kernels.slot_routing.reference import replica_occurrence

def round_robin_slots(expert_ids, replica_count, expert_slots, num_slots, rank, implementation="auto",
                      with_histogram: bool = False) -> SlotRouting:
    """``[T, K]`` slots by TensorRT-LLM's rule with the EP rank as block offset (and, fused, this
    rank's ``[S]`` slot histogram when asked)."""
    return route_to_slots(expert_ids, replica_count, expert_slots, num_slots, rank_offset=rank,
                          with_histogram=with_histogram, implementation=implementation)


def replica_shares(expert_counts, replica_count, expert_slots, slots_per_rank, num_ranks,
                   passes: int = SPLIT_PASSES):
    """``[E, M]`` entries (fractional) each replica should take so that rank loads come out even.

    Args:
      expert_counts: ``[E]`` global entries per expert this batch.
    Experts with one replica are fixed load. From the even split, every replicated expert (at
    most S - E of them) re-pours its entries into its replicas' ranks lowest-first (water-filling
    against the others' current shares; its replicas on one rank fill that rank together), all at
    once, ``passes`` times; a step is ``2 / (n + 1)`` with n the most replicated experts on one of
    its ranks, so simultaneous pours do not overshoot. ``planning.split_rank_loads`` is the same
    computation in NumPy (the flow planner's objective).
    """
    num_experts, max_replicas = expert_slots.shape
    counts = expert_counts.astype(jnp.float32)
    valid = expert_slots >= 0  # [E, M]
    replica_rank = jnp.where(valid, expert_slots // slots_per_rank, 0)  # [E, M]
    even = jnp.where(valid, counts[:, None] / jnp.maximum(replica_count, 1)[:, None], 0.0)  # [E, M]
    # Only replicated experts have a choice, and at most S - E experts are replicated.
    candidates = min(num_experts, max(slots_per_rank * num_ranks - num_experts, 0))
    if candidates == 0 or passes == 0:
        return even
    chosen = jnp.argsort(replica_count <= 1, stable=True)[:candidates]  # [X] replicated experts first
    rank_x, valid_x, counts_x = replica_rank[chosen], valid[chosen], counts[chosen]  # [X, M], [X]
    fixed = (jnp.zeros((num_ranks,), jnp.float32).at[replica_rank.reshape(-1)].add(even.reshape(-1))
             .at[rank_x.reshape(-1)].add(-even[chosen].reshape(-1)))  # [R] load of the others
    # One expert's replicas on one rank fill it together: each counts 1/(their number) of the rank.
    same_rank = (valid_x[:, :, None] & valid_x[:, None, :]
                 & (rank_x[:, :, None] == rank_x[:, None, :])).astype(jnp.float32)  # [X, M, M]
    weight = jnp.where(valid_x, 1.0 / jnp.maximum(same_rank.sum(axis=2), 1.0), 0.0)  # [X, M]
    moving = jnp.where((replica_count[chosen] > 1)[:, None], weight, 0.0)
    experts_on = jnp.zeros((num_ranks,), jnp.float32).at[rank_x.reshape(-1)].add(moving.reshape(-1))  # [R]
    crowd = jnp.max(jnp.where(moving > 0, experts_on[rank_x], 0.0), axis=1)  # [X]
    step = (2.0 / (jnp.maximum(jnp.round(crowd), 1.0) + 1.0))[:, None]  # [X, 1]

    on_rank = jax.nn.one_hot(rank_x.reshape(-1), num_ranks, dtype=jnp.float32) * valid_x.reshape(-1, 1)  # [X*M, R]

    def one_pass(_, share):  # share [X, M]; rank sums and gathers as small matmuls (no scatter)
        rank_load = fixed + share.reshape(-1) @ on_rank
        own = jnp.einsum("xmn,xn->xm", same_rank, share)  # the expert's own load on that rank
        base = jnp.where(valid_x, (on_rank @ rank_load).reshape(share.shape) - own, jnp.inf)
        return share + step * (_water_fill(counts_x, base, weight) - share)

    return even.at[chosen].set(jax.lax.fori_loop(0, passes, one_pass, even[chosen]))


def _water_fill(amount, base, weight):
    """``amount`` ``[X]`` poured onto levels ``base`` ``[X, M]`` (inf: no replica) lowest-first -> ``[X, M]``;
    ``weight`` ``[X, M]``: 1 / the replicas sharing that level (the same rank), which fill it together.

    The level when exactly the replicas at or below ``base[m]`` are filled is
    ``(amount + weighted sum of those bases) / their weight``. Over the bases in rising order these
    levels fall while the next base is below the level and rise after, so the water level is the
    smallest of them (a pairwise comparison instead of a sort: M is small; no under-water test
    that rounding could fail for every m)."""
    finite = jnp.isfinite(base)
    level_base = jnp.where(finite, base, 0.0)
    below = (base[:, None, :] <= base[:, :, None]) & finite[:, None, :]  # [X, M(m), M(m')]: base[m'] <= base[m]
    total = jnp.sum(jnp.where(below, (weight * level_base)[:, None, :], 0.0), axis=2)
    width = jnp.sum(jnp.where(below, weight[:, None, :], 0.0), axis=2)
    level = (amount[:, None] + total) / jnp.maximum(width, 1e-30)  # [X, M]
    level = jnp.min(jnp.where(finite, level, jnp.inf), axis=1)
    return jnp.where(finite, jnp.maximum(level[:, None] - level_base, 0.0) * weight, 0.0)


def replica_quotas(expert_counts, replica_count, expert_slots, slots_per_rank, num_ranks,
                   passes: int = SPLIT_PASSES):
    """``[E, M]`` integer entries per replica: ``replica_shares`` rounded so that each expert's
    quotas sum exactly to its count (each within one of its share: the rounded running sum)."""
    quota = replica_shares(expert_counts, replica_count, expert_slots, slots_per_rank, num_ranks, passes)
    running = jnp.round(jnp.cumsum(quota, axis=1))  # [E, M]; the last valid one is the count
    running = jnp.minimum(running, expert_counts.astype(jnp.float32)[:, None])
    quotas = jnp.diff(running, axis=1, prepend=0.0)
    return jnp.where(expert_slots >= 0, quotas, 0).astype(jnp.int32)


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
