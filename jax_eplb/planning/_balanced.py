"""The balanced planner (default): greedy seed, replica-count search, swap refinement.

Pure numpy, vectorised over layers. Axis legend: L layers, E experts, S slots, R ranks,
m = S/R slots per rank.

Per layer the result's max rank load is never above TensorRT-LLM's or DeepSeek's (both are
computed and the best plan per layer is kept before refinement).
"""

from __future__ import annotations

import numpy as np

from jax_eplb.planning._baselines import deepseek_plan, trtllm_plan
from jax_eplb.planning._packing import pack_replicas
from jax_eplb._metrics import rank_loads
from jax_eplb.planning._refine import refine_by_swaps
from jax_eplb.planning._replication import greedy_replication


FEW_SLOTS_PER_RANK = 4  # at or below this, replica counts are searched, not only greedy


def _max_load(load, slot_to_expert, ep_size):
    return rank_loads(load, slot_to_expert, ep_size).max(axis=1)


def search_replica_counts(load: np.ndarray, count: np.ndarray, ep_size: int,
                          num_sources: int = 8, max_steps: int = 64) -> np.ndarray:
    """Moves single replicas between experts while that lowers the packed max rank load.

    With few slots per rank the replica counts that minimise the largest replica (greedy) are not
    the best once replicas must share ranks: a mid-sized expert paired with a hot one may be
    better split. Each step, per layer, tries giving one more replica to each expert on the
    heaviest rank, taken from one of the ``num_sources`` experts that lose least by giving one
    up; the best move is kept if it lowers the max rank load. Returns ``[L, E]`` counts.
    """
    count = count.copy()
    num_layers, num_experts = load.shape
    plan = pack_replicas(load, count, ep_size)
    peak = _max_load(load, plan, ep_size)
    active = np.ones(num_layers, bool)
    per_rank = plan.shape[1] // ep_size
    for _ in range(max_steps):
        rows = np.nonzero(active)[0]
        if rows.size == 0:
            break
        w, c = load[rows], count[rows]
        sizes = np.take_along_axis(w / c, plan[rows], axis=1).reshape(rows.size, ep_size, per_rank)
        heavy = np.argmax(sizes.sum(axis=2), axis=1)
        receivers = plan[rows].reshape(rows.size, ep_size, per_rank)[np.arange(rows.size), heavy]  # [A, m]
        give_cost = np.where(c >= 2, w / np.maximum(c - 1, 1), np.inf)
        donors = np.argsort(give_cost, axis=1, kind="stable")[:, :num_sources]  # [A, D]
        cand = np.repeat(c[:, None, None, :], per_rank, 1).repeat(donors.shape[1], 2)  # [A, m, D, E]
        a_idx = np.arange(rows.size)[:, None, None]
        cand[a_idx, np.arange(per_rank)[None, :, None], np.arange(donors.shape[1])[None, None, :],
             receivers[:, :, None]] += 1
        cand[a_idx, np.arange(per_rank)[None, :, None], np.arange(donors.shape[1])[None, None, :],
             donors[:, None, :]] -= 1
        ok = ((donors[:, None, :] != receivers[:, :, None])
              & np.isfinite(np.take_along_axis(give_cost, donors, axis=1))[:, None, :])
        cand = cand.reshape(-1, num_experts)
        cand_load = np.repeat(w, per_rank * donors.shape[1], axis=0)
        cand_ok = ok.reshape(-1) & (cand.min(axis=1) >= 1)
        cand = np.where(cand_ok[:, None], cand, np.repeat(c, per_rank * donors.shape[1], axis=0))
        cand_plan = pack_replicas(cand_load, cand, ep_size)
        cand_peak = np.where(cand_ok, _max_load(cand_load, cand_plan, ep_size), np.inf).reshape(rows.size, -1)
        best = np.argmin(cand_peak, axis=1)
        better = cand_peak[np.arange(rows.size), best] < peak[rows] * (1 - 1e-12)
        active[rows[~better]] = False
        hit = np.nonzero(better)[0]
        flat = hit * per_rank * donors.shape[1] + best[hit]
        count[rows[hit]] = cand[flat]
        plan[rows[hit]] = cand_plan[flat]
        peak[rows[hit]] = cand_peak[hit, best[hit]]
    return count


def own_candidates(load: np.ndarray, num_slots: int, ep_size: int) -> list[np.ndarray]:
    """The planner's own ``[L, S]`` plans, before any baseline: the greedy counts packed and refined by
    swaps, and with few slots per rank the searched counts too."""
    load = np.asarray(load, dtype=np.float64)
    count = greedy_replication(load, num_slots, prefer_larger_id=False).replica_count
    candidates = [refine_by_swaps(load, pack_replicas(load, count, ep_size), ep_size)]
    if num_slots // ep_size <= FEW_SLOTS_PER_RANK and num_slots > load.shape[1]:
        searched = search_replica_counts(load, count, ep_size)
        candidates.append(refine_by_swaps(load, pack_replicas(load, searched, ep_size), ep_size))
    return candidates


def balanced_plan(load: np.ndarray, num_slots: int, ep_size: int) -> np.ndarray:
    """``[L, E]`` loads -> ``[L, S]`` slot_to_expert: per layer the best of :func:`own_candidates` and the
    TensorRT-LLM and DeepSeek plans (a baseline that wins is refined by swaps)."""
    load = np.asarray(load, dtype=np.float64)
    candidates = own_candidates(load, num_slots, ep_size)
    candidates += [trtllm_plan(load, num_slots, ep_size), deepseek_plan(load, num_slots, ep_size)]
    peak = np.stack([_max_load(load, c, ep_size) for c in candidates])  # [C, L]
    best = np.argmin(peak, axis=0)  # ours come first and win ties
    plan = np.stack(candidates)[best, np.arange(load.shape[0])]
    from_baseline = best >= len(candidates) - 2
    if from_baseline.any():
        plan[from_baseline] = refine_by_swaps(load[from_baseline], plan[from_baseline], ep_size)
    return plan
