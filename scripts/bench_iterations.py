"""Per-iteration placement quality (used by bench_placement.py): plans made from one draw of noise-model
iterations (train), judged on another (test), under the equal split, the load-aware split and the LP
optimum of the split (on a subsample of layers and iterations, next to load_aware on the same subsample).

Axis legend: K iterations, L layers, E experts, S slots, R ranks.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from jax_eplb import plan_placement
from jax_eplb._metrics import rank_loads
from jax_eplb.planning import per_iteration_imbalance, sample_iterations

PLANNERS = {"trtllm": dict(algorithm="trtllm"), "deepseek": dict(algorithm="deepseek"),
            "balanced": dict(algorithm="balanced"), "flow": dict(algorithm="flow")}
TOKENS_PER_RANK, TOP_K = 256, 8
LP_LAYER_STRIDE, LP_ITERATIONS = 8, 4  # the LP column: every 8th layer, 4 test iterations


def lp_optimum(plan, counts, ep_size: int) -> float:
    """Lowest max/mean - 1 any split of one iteration's ``counts`` [E] over ``plan`` [S] allows:
    minimise t subject to each expert's entries spread over its slots and every rank's sum <= t."""
    num_slots = plan.size
    used = np.flatnonzero(plan >= 0)
    n = used.size
    rank = used // (num_slots // ep_size)
    # rows: one per rank, sum of its slots' entries - t <= 0
    rows = np.concatenate([rank, np.arange(ep_size)])
    cols = np.concatenate([np.arange(n), np.full(ep_size, n)])
    values = np.concatenate([np.ones(n), -np.ones(ep_size)])
    upper = coo_matrix((values, (rows, cols)), shape=(ep_size, n + 1))
    experts = np.unique(plan[used])
    expert_row = np.searchsorted(experts, plan[used])
    equal = coo_matrix((np.ones(n), (expert_row, np.arange(n))), shape=(experts.size, n + 1))
    cost = np.zeros(n + 1)
    cost[-1] = 1.0
    result = linprog(cost, A_ub=upper, b_ub=np.zeros(ep_size), A_eq=equal, b_eq=counts[experts],
                     bounds=(0, None), method="highs")
    mean = counts.sum() / len(np.unique(rank))
    return result.fun / mean - 1.0 if mean > 0 else 0.0


def judge(plans, test, ep_size: int) -> dict:
    """``[L, S]`` plans on ``[K, L, E]`` test iterations -> the three per-iteration figures."""
    layers = np.arange(0, plans.shape[0], LP_LAYER_STRIDE)
    lp = [lp_optimum(plans[layer], test[k, layer], ep_size) for layer in layers for k in range(LP_ITERATIONS)]
    return dict(equal=per_iteration_imbalance(plans, test, ep_size, passes=0).mean(),
                load_aware=per_iteration_imbalance(plans, test, ep_size).mean(),
                sub_load_aware=per_iteration_imbalance(plans[layers], test[:LP_ITERATIONS, layers], ep_size).mean(),
                lp=float(np.mean(lp)))


def per_iteration_set(loads, geometries) -> list[str]:
    """Prints and returns the per-iteration table over the ``[L, E]`` load sets."""
    print(f"\n## per-iteration imbalance (max/mean - 1 each iteration; {TOKENS_PER_RANK} tokens x top-{TOP_K} "
          f"per rank; train/test: two noise-model draws of 16 iterations; LP: every {LP_LAYER_STRIDE}th layer x "
          f"{LP_ITERATIONS} test iterations), {len(loads)} load sets x {loads[0].shape[0]} layers")
    print(f"{'geometry':>9} {'algorithm':>9} {'train LA':>9} {'test equal':>10} {'test LA':>8} "
          f"{'subsample LA':>12} {'LP':>7} {'totals max/mean':>15} {'s/plan':>7}")
    rows = []
    for ep_size, num_slots in geometries:
        entries = ep_size * TOKENS_PER_RANK * TOP_K
        draws = [(sample_iterations(load, entries, seed=0), sample_iterations(load, entries, seed=1)) for load in loads]
        for name, options in PLANNERS.items():
            figures, train_la, totals, seconds = [], [], [], []
            for load, (train, test) in zip(loads, draws):
                start = time.perf_counter()
                plans = plan_placement(load, num_slots, ep_size, samples=train if name == "flow" else None,
                                       **options).slot_to_expert
                seconds.append(time.perf_counter() - start)
                figures.append(judge(plans, test, ep_size))
                train_la.append(per_iteration_imbalance(plans, train, ep_size).mean())
                loads_per_rank = rank_loads(load, plans, ep_size)
                totals.append((loads_per_rank.max(1) / loads_per_rank.mean(1)).mean())
            mean = {key: np.mean([f[key] for f in figures]) for key in figures[0]}
            row = (f"{ep_size:>4}/{num_slots:<4} {name:>9} {np.mean(train_la):>9.4f} {mean['equal']:>10.4f} "
                   f"{mean['load_aware']:>8.4f} {mean['sub_load_aware']:>12.4f} {mean['lp']:>7.4f} "
                   f"{np.mean(totals):>15.4f} {np.median(seconds):>7.2f}")
            print(row, flush=True)
            rows.append(row)
    return rows


def online_planning_table(load, geometries, stride: int = 6) -> list[str]:
    """Prints (and returns) the online balancer's work for one layer with ``flow``: a re-plan of one
    layer of ``load`` [L, E] against the balanced plan in force (every ``stride``-th layer), in ms."""
    print(f"\n## online planning, flow, one layer against the plan in force (every {stride}th layer; "
          f"migration tolerance 0.05), ms")
    print(f"{'geometry':>9} {'median':>7} {'max':>7}")
    rows = []
    for ep_size, num_slots in geometries:
        previous = plan_placement(load, num_slots, ep_size).slot_to_expert
        times = []
        for layer in range(0, load.shape[0], stride):
            start = time.perf_counter()
            plan_placement(load[layer:layer + 1], num_slots, ep_size, "flow", previous=previous[layer:layer + 1],
                           migration_tolerance=0.05, entries_per_iteration=ep_size * TOKENS_PER_RANK * TOP_K)
            times.append(1e3 * (time.perf_counter() - start))
        row = f"{ep_size:>4}/{num_slots:<4} {np.median(times):>7.0f} {np.max(times):>7.0f}"
        print(row, flush=True)
        rows.append(row)
    return rows
