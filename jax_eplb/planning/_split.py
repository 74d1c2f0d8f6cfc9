"""The load-aware split's effect on rank loads, in NumPy: what the runtime (``moe.replica_shares``)
does with one batch's expert counts, for many placements and batches at once.

Experts with one replica are fixed load. From the even split, every replicated expert re-pours
its count into its replicas' ranks lowest-first (water-filling against the others' current
shares; its replicas on one rank fill that rank together), all at once, ``passes`` times; a
step is damped where other replicated experts share its ranks (``_damping``). The flow planner
scores placements with it.
Axis legend: C placements, K batches, E experts, S slots, R ranks, X replicated experts, M replicas.
"""

from __future__ import annotations

import numpy as np

from jax_eplb._metrics import imbalance, replica_counts

SPLIT_PASSES = 16  # passes of the runtime's load-aware split; the planner models the same number


def split_rank_loads(slot_to_expert, counts, ep_size: int, passes: int = SPLIT_PASSES) -> np.ndarray:
    """``[C, S]`` placements (or ``[S]``; -1: an unused slot) and ``[K, E]`` counts -> ``[C, K, R]`` rank loads."""
    plans = np.array(slot_to_expert, dtype=np.int64, ndmin=2)
    counts = np.asarray(counts, dtype=np.float64)
    num_plans, num_slots = plans.shape
    num_batches, num_experts = counts.shape
    per_rank = num_slots // ep_size
    used = plans >= 0  # an unused slot (-1) carries nothing
    safe_plans = np.where(used, plans, 0)
    replicas = replica_counts(plans, num_experts)  # [C, E]
    share = np.where(used[:, None], counts[:, safe_plans].transpose(1, 0, 2)
                     / np.maximum(np.take_along_axis(replicas, safe_plans, 1), 1)[:, None, :], 0.0)  # [C, K, S]
    slots = replicated_slots(plans, replicas)  # [C, X, M]
    if slots.shape[1] == 0 or passes == 0:
        return share.reshape(num_plans, num_batches, ep_size, per_rank).sum(-1)
    valid = slots >= 0
    safe = np.where(valid, slots, 0)
    rank = safe // per_rank  # [C, X, M]
    expert = np.take_along_axis(plans, safe[:, :, 0], 1)  # [C, X]
    amount = np.where(valid[:, None, :, 0], counts[:, expert].transpose(1, 0, 2), 0.0)  # [C, K, X]
    same_rank = valid[..., :, None] & valid[..., None, :] & (rank[..., :, None] == rank[..., None, :])  # [C, X, M, M]
    weight = np.where(valid, 1.0 / np.maximum(same_rank.sum(-1), 1), 0.0)  # a rank counts once per expert
    step = _damping(rank, weight, ep_size)[:, None, :, None]  # [C, 1, X, 1]
    c_idx = np.arange(num_plans)[:, None, None, None]
    k_idx = np.arange(num_batches)[None, :, None, None]
    write = np.broadcast_to(valid[:, None], (num_plans, num_batches) + valid.shape[1:])
    rows = (np.broadcast_to(c_idx, write.shape)[write], np.broadcast_to(k_idx, write.shape)[write],
            np.broadcast_to(safe[:, None], write.shape)[write])
    for _ in range(passes):
        rank_load = share.reshape(num_plans, num_batches, ep_size, per_rank).sum(-1)  # [C, K, R]
        current = np.where(valid[:, None], share[c_idx, k_idx, safe[:, None]], 0.0)  # [C, K, X, M]
        own = np.einsum("cxmn,ckxn->ckxm", same_rank.astype(np.float64), current)  # the expert's load on that rank
        base = np.where(valid[:, None], rank_load[c_idx, k_idx, rank[:, None]] - own, np.inf)
        new = current + step * (water_fill(amount, base, weight[:, None]) - current)
        share[rows] = new[write]
    return share.reshape(num_plans, num_batches, ep_size, per_rank).sum(-1)


def replicated_slots(plans: np.ndarray, replicas: np.ndarray) -> np.ndarray:
    """``[C, X, M]`` slot ids of each plan's replicated experts (ascending expert id), -1 padded."""
    num_plans, num_slots = plans.shape
    num_experts = replicas.shape[1]
    key = np.where((plans >= 0) & (np.take_along_axis(replicas, np.maximum(plans, 0), 1) > 1), plans,
                   num_experts)  # singles and unused slots sort last
    order = np.argsort(key, axis=1, kind="stable")
    sorted_key = np.take_along_axis(key, order, 1)
    first = np.concatenate([np.ones((num_plans, 1), bool), sorted_key[:, 1:] != sorted_key[:, :-1]], 1)
    group = np.cumsum(first, 1) - 1
    start = np.maximum.accumulate(np.where(first, np.arange(num_slots)[None], 0), 1)
    keep = sorted_key < num_experts
    width = max(int(replicas.max()), 1) if keep.any() else 1
    groups = int((replicas > 1).sum(1).max()) if keep.any() else 0
    out = np.full((num_plans, groups, width), -1)
    rows = np.broadcast_to(np.arange(num_plans)[:, None], plans.shape)
    out[rows[keep], group[keep], (np.arange(num_slots)[None] - start)[keep]] = order[keep]
    return out


def _damping(rank: np.ndarray, weight: np.ndarray, ep_size: int) -> np.ndarray:
    """``[C, X]`` step ``2 / (n + 1)``, n the most replicated experts on any of the expert's ranks
    (``weight`` ``[C, X, M]``: 1 / the expert's replicas on that rank, so a rank counts experts).
    n experts pouring the same way between the same ranks then shrink the gap by ``(n - 1) / (n + 1)``
    instead of overshooting it n-fold; an expert alone on its ranks takes the full step."""
    experts_on = np.zeros((rank.shape[0], ep_size))
    np.add.at(experts_on, (np.broadcast_to(np.arange(rank.shape[0])[:, None, None], rank.shape), rank), weight)
    crowd = np.where(weight > 0, np.take_along_axis(experts_on, rank.reshape(rank.shape[0], -1), 1)
                     .reshape(rank.shape), 0.0).max(axis=2)
    return 2.0 / (np.maximum(np.round(crowd), 1.0) + 1.0)


def water_fill(amount: np.ndarray, base: np.ndarray, weight: np.ndarray | float = 1.0) -> np.ndarray:
    """``amount`` ``[...]`` poured onto levels ``base`` ``[..., M]`` (inf: no replica) lowest-first;
    ``weight``: 1 / the number of replicas that share a level (one expert's replicas on one rank
    fill it together: each takes its part of the rank's fill).

    With the bases sorted, the candidate level of the lowest j, ``(amount + their weighted sum) /
    their weight``, falls while the next base is below it and rises after: the water level is the
    smallest candidate (no test of which bases are under water, so rounding cannot leave none)."""
    finite = np.isfinite(base)
    weight = np.where(finite, weight, 0.0)
    level_base = np.where(finite, base, 0.0)
    below = (base[..., None, :] <= base[..., :, None]) & finite[..., None, :]  # [..., M, M']
    total = np.sum(np.where(below, (weight * level_base)[..., None, :], 0.0), axis=-1)
    width = np.sum(np.where(below, weight[..., None, :], 0.0), axis=-1)
    level = (amount[..., None] + total) / np.maximum(width, 1e-30)
    level = np.min(np.where(finite, level, np.inf), axis=-1, keepdims=True)  # inf: a row with no replica
    return np.where(finite, np.maximum(np.where(np.isfinite(level), level, 0.0) - level_base, 0.0) * weight, 0.0)


def per_iteration_imbalance(slot_to_expert, samples, ep_size: int, passes: int = SPLIT_PASSES) -> np.ndarray:
    """``[L]`` mean over ``samples`` ``[K, L, E]`` of max/mean - 1 of the rank loads under the split,
    over the ranks that serve (a rank whose slots are all unused is left out)."""
    plans = np.asarray(slot_to_expert)
    out = np.zeros(plans.shape[0])
    for layer, plan in enumerate(plans):
        loads = split_rank_loads(plan, np.asarray(samples)[:, layer], ep_size, passes)[0]  # [K, R]
        serving = (plan.reshape(ep_size, -1) >= 0).any(axis=1)
        out[layer] = imbalance(loads[:, serving]).mean()
    return out
