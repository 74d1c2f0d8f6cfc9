"""The load-aware split's effect on rank loads, in NumPy: what the runtime (``moe.replica_shares``)
does with one batch's expert counts, for many placements and batches at once.

Experts with one replica are fixed load. From the even split, every replicated expert re-pours
its count into its replicas' ranks lowest-first (water-filling against the others' current
shares; its replicas on one rank fill that rank together), all at once, damped where other
replicated experts share its ranks (``_damping``): a block-Jacobi step on the sum of squared rank
loads, whose minimiser also has the lowest busiest rank (the LP optimum of the split). The steps
carry Nesterov momentum, dropped whenever the sum of squares rises; the even split is kept where
the passes did not lower the busiest rank, so the split is never worse than it.

``shared_rows``: N shared-expert rows per serving rank that may be computed on any serving rank
(one more expert, on every rank): shared-expert balancing, as ``moe.balanced_shares`` computes it
in the step. Those rows link every rank, so plain damped passes converge fast; momentum on top of
them oscillates (measured), so it is off then.
The flow planner scores placements with this function.
Axis legend: C placements, K batches, E experts, S slots, R ranks, X replicated experts, M replicas.
"""

from __future__ import annotations

import numpy as np

from jax_eplb._metrics import imbalance, replica_counts

SPLIT_PASSES = 32  # passes of the runtime's load-aware split; the planner models the same number
BETTER_BY = 1e-5  # relative changes below this decide nothing (the passes' split replacing the even one, a
# restart), so float32 (runtime) and float64 (here) take the same decisions


def split_rank_loads(slot_to_expert, counts, ep_size: int, passes: int = SPLIT_PASSES,
                     shared_rows: float = 0.0) -> np.ndarray:
    """``[C, S]`` placements (or ``[S]``; -1: an unused slot) and ``[K, E]`` counts -> ``[C, K, R]``
    rows computed per rank (routed, plus shared when ``shared_rows`` > 0)."""
    plans = np.array(slot_to_expert, dtype=np.int64, ndmin=2)
    counts = np.asarray(counts, dtype=np.float64)
    num_plans, num_slots = plans.shape
    num_batches, num_experts = counts.shape
    per_rank = num_slots // ep_size
    used = plans >= 0  # an unused slot (-1) carries nothing
    serving = used.reshape(num_plans, ep_size, per_rank).any(axis=2)  # [C, R]
    safe_plans = np.where(used, plans, 0)
    replicas = replica_counts(plans, num_experts)  # [C, E]
    share = np.where(used[:, None], counts[:, safe_plans].transpose(1, 0, 2)
                     / np.maximum(np.take_along_axis(replicas, safe_plans, 1), 1)[:, None, :], 0.0)  # [C, K, S]
    even = share.reshape(num_plans, num_batches, ep_size, per_rank).sum(-1)  # [C, K, R]
    pool = np.broadcast_to((shared_rows * serving)[:, None, :], even.shape)  # [C, K, R] shared rows
    slots = replicated_slots(plans, replicas)  # [C, X, M]
    if passes == 0 or (slots.shape[1] == 0 and not shared_rows):
        return even + pool
    valid = slots >= 0
    safe = np.where(valid, slots, 0)
    rank = safe // per_rank  # [C, X, M]
    expert = np.take_along_axis(plans, safe[:, :, 0], 1)  # [C, X]
    amount = np.where(valid[:, None, :, 0], counts[:, expert].transpose(1, 0, 2), 0.0)  # [C, K, X]
    same_rank = valid[..., :, None] & valid[..., None, :] & (rank[..., :, None] == rank[..., None, :])  # [C, X, M, M]
    weight = np.where(valid, 1.0 / np.maximum(same_rank.sum(-1), 1), 0.0)  # a rank counts once per expert
    on_rank = (rank[..., None] == np.arange(ep_size)) & valid[..., None]  # [C, X, M, R]
    step, pool_step = _damping(rank, weight, ep_size, serving if shared_rows else None)
    moving = np.take_along_axis(share, safe.reshape(num_plans, 1, -1), 2).reshape(amount.shape + valid.shape[-1:])
    moving = np.where(valid[:, None], moving, 0.0)  # [C, K, X, M] the replicated experts' shares
    fixed = even - np.einsum("ckxm,cxmr->ckr", moving, on_rank)  # [C, K, R] everything else
    pool_total = shared_rows * serving.sum(1)[:, None]  # [C, 1]
    return _accelerated(fixed, moving, pool, amount, pool_total, step[:, None, :, None], pool_step[:, None, None],
                        valid[:, None], same_rank.astype(np.float64), weight[:, None], on_rank, rank,
                        serving[:, None], passes)


def _accelerated(fixed, share, pool, amount, pool_total, step, pool_step, valid, same_rank, weight, on_rank, rank,
                 serving, passes):
    """The passes on ``[C, K, X, M]`` shares and ``[C, K, R]`` shared rows -> ``[C, K, R]`` rank loads:
    the last point's, or the even split's where that has the lower busiest serving rank."""
    def loads(y, y_pool):
        return fixed + np.einsum("ckxm,cxmr->ckr", y, on_rank) + y_pool

    def peak(load):
        return np.max(np.where(serving, load, -np.inf), axis=-1)

    last, last_pool, y, y_pool = share, pool, share, pool
    # The shared rows link every rank, so plain damped passes converge fast; momentum on top of
    # them oscillates (measured): it is for the routed shares alone.
    pooled = bool(np.any(pool_total > 0))
    momentum = np.ones(fixed.shape[:2])
    last_square = np.full(fixed.shape[:2], np.inf)
    rank_index = rank.reshape(rank.shape[0], 1, -1)
    for _ in range(passes):
        load = loads(y, y_pool)  # [C, K, R]
        square = np.sum(load * load, axis=-1)
        own = np.einsum("cxmn,ckxn->ckxm", same_rank, y)  # the expert's load on that rank
        at_rank = np.take_along_axis(load, np.broadcast_to(rank_index, load.shape[:2] + rank_index.shape[2:]), 2)
        base = np.where(valid, at_rank.reshape(y.shape) - own, np.inf)
        new = y + step * (water_fill(amount, base, weight) - y)
        new_pool = y_pool + pool_step * (_pool_fill(pool_total, np.where(serving, load - y_pool, np.inf)) - y_pool)
        following = (1.0 + np.sqrt(1.0 + 4.0 * momentum * momentum)) / 2.0
        restart = square > last_square * (1.0 + BETTER_BY)  # the sum of squares rose: drop the momentum
        beta = np.where(restart | pooled, 0.0, (momentum - 1.0) / following)
        momentum = np.where(restart, 1.0, following)
        y = _feasible(new + beta[..., None, None] * (new - last), amount, valid)
        y_pool = _feasible(new_pool + beta[..., None] * (new_pool - last_pool), pool_total, serving)
        last, last_pool, last_square = new, new_pool, square
    final, start = loads(y, y_pool), loads(share, pool)
    better = peak(final) < peak(start) * (1.0 - BETTER_BY)  # never worse than the even split
    return np.where(better[..., None], final, start)


def _feasible(share, total, valid):
    """``share`` ``[..., M]`` clipped at 0 and rescaled to sum to ``total`` ``[...]`` over ``valid``."""
    share = np.where(valid, np.maximum(share, 0.0), 0.0)
    return share * (total / np.maximum(share.sum(-1), 1e-30))[..., None]


def _pool_fill(total, base):
    """``total`` ``[...]`` poured onto levels ``base`` ``[..., R]`` (inf: not serving) lowest-first
    (``water_fill`` with one replica per rank, by a sort: R can be large)."""
    order = np.sort(base, axis=-1)
    finite = np.isfinite(order)
    width = np.cumsum(finite, axis=-1)
    level = (total[..., None] + np.cumsum(np.where(finite, order, 0.0), axis=-1)) / np.maximum(width, 1)
    level = np.min(np.where(finite, level, np.inf), axis=-1, keepdims=True)
    return np.where(np.isfinite(base), np.maximum(np.where(np.isfinite(level), level, 0.0) - base, 0.0), 0.0)


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


def _damping(rank: np.ndarray, weight: np.ndarray, ep_size: int,
             serving: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``[C, X]`` step ``2 / (n + 1)``, n the most replicated experts on any of the expert's ranks
    (``weight`` ``[C, X, M]``: 1 / the expert's replicas on that rank, so a rank counts experts),
    and ``[C]`` the shared rows' step (they are one more expert on every ``serving`` ``[C, R]`` rank;
    0 without them). n experts pouring the same way between the same ranks then shrink the gap by
    ``(n - 1) / (n + 1)`` instead of overshooting it n-fold; an expert alone on its ranks takes the full step."""
    experts_on = np.zeros((rank.shape[0], ep_size)) if serving is None else serving.astype(np.float64)
    np.add.at(experts_on, (np.broadcast_to(np.arange(rank.shape[0])[:, None, None], rank.shape), rank), weight)
    crowd = np.where(weight > 0, np.take_along_axis(experts_on, rank.reshape(rank.shape[0], -1), 1)
                     .reshape(rank.shape), 0.0).max(axis=2)
    pool = 0.0 if serving is None else 2.0 / (np.round(experts_on.max(axis=1)) + 1.0)
    return 2.0 / (np.maximum(np.round(crowd), 1.0) + 1.0), np.broadcast_to(pool, rank.shape[:1])


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


def per_iteration_imbalance(slot_to_expert, samples, ep_size: int, passes: int = SPLIT_PASSES,
                            shared_rows: float = 0.0) -> np.ndarray:
    """``[L]`` mean over ``samples`` ``[K, L, E]`` of max/mean - 1 of the rank loads under the split,
    over the ranks that serve (a rank whose slots are all unused is left out); ``shared_rows``: see
    ``split_rank_loads``."""
    plans = np.asarray(slot_to_expert)
    out = np.zeros(plans.shape[0])
    for layer, plan in enumerate(plans):
        loads = split_rank_loads(plan, np.asarray(samples)[:, layer], ep_size, passes, shared_rows)[0]  # [K, R]
        serving = (plan.reshape(ep_size, -1) >= 0).any(axis=1)
        out[layer] = imbalance(loads[:, serving]).mean()
    return out
