"""Migration-aware plans: keep experts where they already are when that costs no balance.

Ranks are interchangeable, so a fresh plan's ranks are matched to the previous plan's ranks
(maximum common experts, Hungarian algorithm), and inside a rank an expert that stays keeps its
old slot. A layer whose previous plan is already as balanced as the fresh one keeps it whole.
Axis legend: L layers, S slots, R ranks, E experts, m = S/R.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from jax_eplb._metrics import rank_loads, replica_sizes
from jax_eplb.planning._refine import refine_by_swaps


def slots_moved(plan: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """``[L]`` slots whose expert differs between two ``[L, S]`` plans (weights to copy)."""
    return (np.asarray(plan) != np.asarray(previous)).sum(axis=1)


def align_ranks(plan: np.ndarray, previous: np.ndarray, ep_size: int, num_experts: int) -> np.ndarray:
    """``plan`` ``[S]`` with its ranks renamed (most experts in common, Hungarian) and, inside a rank,
    experts that stay kept in their old slots: the same placement up to labels, fewest slots moved."""
    new_bins = plan.reshape(ep_size, -1)
    old_bins = previous.reshape(ep_size, -1)
    per_rank = new_bins.shape[1]
    new_hist = np.zeros((ep_size, num_experts))
    old_hist = np.zeros((ep_size, num_experts))
    np.add.at(new_hist, (np.arange(ep_size)[:, None], new_bins), 1)
    np.add.at(old_hist, (np.arange(ep_size)[:, None], old_bins), 1)
    common = new_hist @ old_hist.T  # [R_new, R_old]
    new_rank, old_rank = linear_sum_assignment(common, maximize=True)
    out = np.empty_like(old_bins)
    for p, q in zip(new_rank, old_rank):
        experts = list(new_bins[p])
        row = np.full(per_rank, -1, dtype=old_bins.dtype)
        for j, expert in enumerate(old_bins[q]):  # stayers keep their slot
            if expert in experts:
                row[j] = expert
                experts.remove(expert)
        row[row == -1] = experts
        out[q] = row
    return out.reshape(-1)


def _recount_layer(load: np.ndarray, previous: np.ndarray, target_count: np.ndarray,
                   ep_size: int) -> np.ndarray:
    """Rewrites as few slots of ``previous`` ``[S]`` as needed to reach ``target_count`` ``[E]``."""
    plan = previous.copy()
    old_count = np.bincount(previous, minlength=load.shape[0])
    surplus = old_count - target_count
    if not surplus.any():
        return plan
    sizes = replica_sizes(load[None], previous[None])[0]
    rank_of_slot = np.arange(plan.size) // (plan.size // ep_size)
    rank_load = np.bincount(rank_of_slot, weights=sizes, minlength=ep_size)
    freed = []
    for expert in np.nonzero(surplus > 0)[0]:  # free replicas on the heaviest ranks
        slots = np.nonzero(previous == expert)[0]
        slots = slots[np.argsort(-rank_load[rank_of_slot[slots]], kind="stable")][: surplus[expert]]
        freed.extend(slots.tolist())
    freed = np.asarray(freed)
    for slot in freed:
        rank_load[rank_of_slot[slot]] -= sizes[slot]
    receivers = np.repeat(np.arange(load.shape[0]), np.maximum(-surplus, 0))
    receivers = receivers[np.argsort(-(load[receivers] / target_count[receivers]), kind="stable")]
    freed = freed[np.argsort(rank_load[rank_of_slot[freed]], kind="stable")]
    plan[freed] = receivers
    return plan


def warm_start(load: np.ndarray, plan: np.ndarray, previous: np.ndarray, ep_size: int) -> np.ndarray:
    """``previous`` ``[L, S]`` changed to ``plan``'s replica counts, then refined by swaps."""
    num_experts = load.shape[1]
    seeded = np.stack([
        _recount_layer(load[l], previous[l], np.bincount(plan[l], minlength=num_experts), ep_size)
        for l in range(plan.shape[0])])
    return refine_by_swaps(load, seeded, ep_size)


def align_to_previous(load: np.ndarray, plan: np.ndarray, previous: np.ndarray, ep_size: int,
                      tolerance: float = 0.0) -> np.ndarray:
    """Of the plans as balanced as ``plan`` ``[L, S]`` (within ``1 + tolerance`` of its max rank
    load under ``load`` ``[L, E]``), returns per layer the one that moves fewest slots from
    ``previous``: ``previous`` itself, ``previous`` re-counted and refined (warm start), or
    ``plan`` with its ranks and slots re-labelled to match ``previous``.
    """
    load = np.asarray(load, dtype=np.float64)
    plan, previous = np.asarray(plan), np.asarray(previous)
    budget = rank_loads(load, plan, ep_size).max(axis=1) * (1.0 + tolerance) + 1e-12
    warm = warm_start(load, plan, previous, ep_size)
    covers_all = np.array([np.unique(row).size == load.shape[1] for row in previous])  # (failed ranks dropped)
    keep_old = covers_all & (rank_loads(load, previous, ep_size).max(axis=1) <= budget)
    use_warm = rank_loads(load, warm, ep_size).max(axis=1) <= budget
    out = np.empty_like(plan)
    for layer in range(plan.shape[0]):
        aligned = align_ranks(plan[layer], previous[layer], ep_size, load.shape[1])
        options = [aligned] + ([warm[layer]] if use_warm[layer] else [])
        options += [previous[layer]] if keep_old[layer] else []
        out[layer] = min(options, key=lambda o: int((o != previous[layer]).sum()))
    return out
