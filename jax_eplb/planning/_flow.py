"""The flow planner: placements whose replicas link ranks, so that the load-aware split can move
each iteration's swings between them.

A plan made for the window's total load balances the mean, but what costs time is the hottest
rank of each iteration. Under the load-aware split a replicated expert is a link between its
ranks: its count can go to whichever of them is lighter this iteration. With S - E extra slots
there are S - E links; spent on a shallow tree per group of ranks (instead of wherever the mean
happened to want them) they pool the noise of the whole group.

Per layer the candidates are the balanced plan and "linked" plans: the replicated experts
(greedy counts, hottest first) are laid on the edges of shallow trees over
``max(1, R - (S - E))`` near-equal groups of ranks (branching 2 to 8; an expert with r replicas
is r - 1 edges from one parent), single experts fill the free slots heaviest first onto the
lightest rank, then swaps between single experts balance the window's total (the linking
replicas stay put). A candidate whose total-load max rank load (even split) is above both
TensorRT-LLM's and the balanced plan's is dropped. The winner has the lowest mean per-iteration
imbalance under the runtime's split (``split_rank_loads``) over the sample iterations; a linked
plan must beat the balanced one by two standard errors of the paired difference, so noise alone
never picks it.

Sample iterations: recorded per-iteration counts when the statistics hold them; otherwise the
noise model ``counts ~ Multinomial(n, Dirichlet(concentration * p))`` around the layer's load
shares ``p``, with ``n`` entries (tokens x top-k) per iteration; concentration 20000 reproduces
TensorRT-LLM's published per-iteration imbalance for its plan on the DeepSeek-V3 loads within
0.02 (docs/benchmarks.md).
Axis legend: K sample iterations, L layers, E experts, S slots, R ranks, m = S/R.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np

from jax_eplb._metrics import imbalance, rank_loads
from jax_eplb.planning._balanced import balanced_plan
from jax_eplb.planning._baselines import trtllm_plan
from jax_eplb.planning._migration import align_ranks
from jax_eplb.planning._refine import refine_by_swaps
from jax_eplb.planning._replication import greedy_replication
from jax_eplb.planning._split import split_rank_loads

BRANCHING = (2, 3, 4, 5, 6, 8)
NOISE_CONCENTRATION = 20000.0
NUM_SAMPLES = 16
DECODE_TOKENS_PER_RANK = 256  # the noise model's default batch: 256 decode tokens per rank
MARGIN = 2.0  # standard errors a linked plan must win by


def sample_iterations(load, entries_per_iteration, num_samples: int = NUM_SAMPLES,
                      concentration: float = NOISE_CONCENTRATION, seed: int = 0) -> np.ndarray:
    """``[K, L, E]`` iterations drawn around ``load`` ``[L, E]``; ``entries_per_iteration``: n per
    layer (``[L]`` or one number)."""
    load = np.asarray(load, dtype=np.float64)
    entries = np.broadcast_to(np.asarray(entries_per_iteration, dtype=np.float64), load.shape[:1])
    rng = np.random.default_rng(seed)
    out = np.zeros((num_samples,) + load.shape)
    for layer, (row, n) in enumerate(zip(load, entries)):
        total = row.sum()
        if total <= 0 or n < 1:
            out[:, layer] = row
            continue
        shares = rng.dirichlet(concentration * row / total + 1e-9, size=num_samples)
        out[:, layer] = [rng.multinomial(int(round(n)), q) for q in shares]
    return out


def flow_plan(load, samples, num_slots: int, ep_size: int, previous=None,
              tolerance: float = 0.0, shared_rows: float = 0.0) -> np.ndarray:
    """``[L, E]`` loads and ``[K, L, E]`` sample iterations -> ``[L, S]`` slot_to_expert.

    ``shared_rows``: shared-expert rows per rank per iteration that the split moves too (scored with them).

    ``previous``: the plan in force; a new plan's ranks are renamed to move fewest slots, and a
    layer keeps its previous plan while that is within ``1 + tolerance`` of the new one's mean
    per-iteration imbalance (and its total load stays within the candidates' limit)."""
    load = np.asarray(load, dtype=np.float64)
    samples = np.asarray(samples, dtype=np.float64)
    balanced = balanced_plan(load, num_slots, ep_size)
    limit = np.maximum(rank_loads(load, trtllm_plan(load, num_slots, ep_size), ep_size).max(axis=1),
                       rank_loads(load, balanced, ep_size).max(axis=1)) * (1 + 1e-9)
    linked, fits = linked_plans(load, num_slots, ep_size)
    out = balanced.copy()
    for layer in range(load.shape[0]):
        options = np.concatenate([balanced[layer][None], linked[layer][fits[layer]]])
        options = options[rank_loads(load[layer][None], options, ep_size).max(axis=1) <= limit[layer]]
        old = None if previous is None else np.asarray(previous[layer])
        keepable = old is not None and _keepable(load[layer], old, ep_size, limit[layer])
        judged = np.concatenate([options, old[None]]) if keepable else options
        per_iteration = imbalance(split_rank_loads(judged, samples[:, layer], ep_size, shared_rows=shared_rows))
        winner = _winner(per_iteration[:len(options)])
        out[layer] = options[winner]
        if old is not None:  # renaming ranks changes no rank load: the winner's figures hold for it
            new_mean, old_mean = per_iteration[[winner, -1]].mean(axis=1)
            keep = keepable and old_mean <= new_mean * (1 + tolerance) + 1e-12
            out[layer] = old if keep else align_ranks(out[layer], old, ep_size, load.shape[1])
    return out


def linked_plans(load, num_slots: int, ep_size: int, branching=BRANCHING) -> tuple[np.ndarray, np.ndarray]:
    """``[L, E]`` loads -> ``[L, B, S]`` plans whose replicated experts form shallow trees over
    groups of ranks, one per ``branching`` value, and ``[L, B]`` whether each fits the slots."""
    load = np.asarray(load, dtype=np.float64)
    count = greedy_replication(load, num_slots, prefer_larger_id=False).replica_count  # [L, E]
    plans = np.zeros((load.shape[0], len(branching), num_slots), np.int64)
    fits = np.zeros(plans.shape[:2], bool)
    for layer, index in np.ndindex(*fits.shape):
        laid = _lay_out(load[layer], count[layer], num_slots, ep_size, branching[index])
        if laid is not None:
            plans[layer, index], fits[layer, index] = laid, True
    # Swaps between single experts balance the window's total; the linking replicas stay put.
    movable = np.take_along_axis(count, plans.reshape(load.shape[0], -1), 1).reshape(plans.shape) == 1
    if fits.any():
        plans[fits] = refine_by_swaps(np.repeat(load, len(branching), 0)[fits.reshape(-1)], plans[fits], ep_size,
                                      movable=movable[fits])
    return plans, fits


def _lay_out(load, count, num_slots: int, ep_size: int, branching: int) -> np.ndarray | None:
    """One layer's ``[S]`` layout before refinement: replicated experts (hottest first) on tree
    edges, then single experts heaviest first onto the lightest rank with a free slot."""
    per_rank = num_slots // ep_size
    children = defaultdict(list)
    for parent, child in _tree_edges(ep_size, num_slots - load.shape[0], branching):
        children[parent].append(child)
    ranks: list[list[int]] = [[] for _ in range(ep_size)]
    replicated = np.flatnonzero(count > 1)
    for expert in replicated[np.argsort(-load[replicated], kind="stable")]:
        if not _link(int(expert), int(count[expert]), children, ranks, per_rank):
            return None
    rank_load = [sum(load[e] / count[e] for e in held) for held in ranks]
    free = [(rank_load[r], r) for r in range(ep_size) if len(ranks[r]) < per_rank]
    heapq.heapify(free)  # (load, rank): the lightest rank, lowest id on ties
    singles = np.flatnonzero(count == 1)
    for expert in singles[np.argsort(-load[singles], kind="stable")]:
        level, rank = heapq.heappop(free)
        ranks[rank].append(int(expert))
        if len(ranks[rank]) < per_rank:
            heapq.heappush(free, (level + load[expert], rank))
    return np.array([e for held in ranks for e in held])


def _link(expert: int, replicas: int, children: dict, ranks: list, per_rank: int) -> bool:
    """Places ``expert``'s replicas on a parent with free slots and ``replicas - 1`` of its children
    (others, if the tree has too few left: on the emptiest ranks). False if it cannot be placed."""
    parents = [p for p in children if children[p] and len(ranks[p]) < per_rank]
    if not parents:
        parents = [min(range(len(ranks)), key=lambda r: len(ranks[r]))]
    parent = max(parents, key=lambda p: (min(len(children[p]), replicas - 1), -len(ranks[p])))
    linked = [c for c in children[parent] if len(ranks[c]) < per_rank][:replicas - 1]
    children[parent] = [c for c in children[parent] if c not in linked]
    chosen = [parent] + linked
    if len(chosen) < replicas:
        spare = sorted((r for r in range(len(ranks)) if r not in chosen and len(ranks[r]) < per_rank),
                       key=lambda r: len(ranks[r]))
        chosen += spare[:replicas - len(chosen)]
    if len(chosen) < replicas or len(ranks[parent]) >= per_rank:
        return False
    for rank in chosen:
        ranks[rank].append(expert)
    return True


def _tree_edges(num_ranks: int, num_links: int, branching: int) -> list[tuple[int, int]]:
    """(parent, child) edges: breadth-first trees (the root has ``branching`` children, others
    ``branching - 1``) over ``max(1, num_ranks - num_links)`` near-equal groups of ranks."""
    groups = max(1, num_ranks - num_links)
    edges, start = [], 0
    for group in range(groups):
        size = num_ranks // groups + (group < num_ranks % groups)
        frontier, placed = [start], 1
        while placed < size:
            grown = []
            for parent in frontier:
                for _ in range(branching if parent == start else branching - 1):
                    if placed < size:
                        edges.append((parent, start + placed))
                        grown.append(start + placed)
                        placed += 1
            frontier = grown
        start += size
    return edges


def _winner(per_iteration: np.ndarray) -> int:
    """Index of the best of ``[C, K]`` (row 0 the balanced plan): lowest mean, a challenger only
    when it wins by ``MARGIN`` standard errors of the paired difference."""
    diff = per_iteration - per_iteration[0]
    spread = diff.std(axis=1, ddof=1) / np.sqrt(diff.shape[1]) if diff.shape[1] > 1 else np.zeros(len(diff))
    score = diff.mean(axis=1) + MARGIN * spread
    score[0] = 0.0
    return int(np.argmin(score))


def _keepable(load, previous, ep_size: int, limit: float) -> bool:
    """Whether ``previous`` ``[S]`` may stay: every expert placed, no unused slot, total load within ``limit``."""
    return (previous.min() >= 0 and np.unique(previous).size == load.shape[0]
            and rank_loads(load[None], previous[None], ep_size).max() <= limit)
