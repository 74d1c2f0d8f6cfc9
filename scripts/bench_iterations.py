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
            "balanced": dict(algorithm="balanced"), "flow": dict(algorithm="flow"),
            "flow+shared": dict(algorithm="flow", shared_rows=256)}
TOKENS_PER_RANK, TOP_K = 256, 8  # decode: one shared-expert row per token, so 256 shared rows per rank
LP_LAYER_STRIDE, LP_ITERATIONS = 8, 4  # the LP column: every 8th layer, 4 test iterations
NAMED_GEOMETRIES = {(144, 288): "DeepSeek's own decode geometry (EP144, 288 slots: 2 routed slots per GPU)"}


def lp_optimum(plan, counts, ep_size: int, shared_rows: float = 0.0) -> float:
    """Lowest max/mean - 1 any split of one iteration's ``counts`` [E] over ``plan`` [S] allows:
    minimise t subject to each expert's entries spread over its slots and every rank's sum <= t.
    ``shared_rows``: N shared-expert rows per serving rank, computed on any serving rank (one more
    variable per serving rank; together they sum to N x the serving ranks)."""
    num_slots = plan.size
    used = np.flatnonzero(plan >= 0)
    n = used.size
    rank = used // (num_slots // ep_size)
    serving = np.unique(rank)
    pool = serving.size if shared_rows else 0
    # rows: one per rank, sum of its slots' entries (+ its shared rows) - t <= 0; t is the last variable
    rows = np.concatenate([rank, serving[:pool], np.arange(ep_size)])
    cols = np.concatenate([np.arange(n), n + np.arange(pool), np.full(ep_size, n + pool)])
    values = np.concatenate([np.ones(n + pool), -np.ones(ep_size)])
    upper = coo_matrix((values, (rows, cols)), shape=(ep_size, n + pool + 1))
    experts = np.unique(plan[used])
    expert_row = np.searchsorted(experts, plan[used])
    eq_rows = np.concatenate([expert_row, np.full(pool, experts.size)])
    equal = coo_matrix((np.ones(n + pool), (eq_rows, np.arange(n + pool))),
                       shape=(experts.size + (pool > 0), n + pool + 1))
    totals = np.concatenate([counts[experts], [shared_rows * serving.size] if pool else []])
    cost = np.zeros(n + pool + 1)
    cost[-1] = 1.0
    result = linprog(cost, A_ub=upper, b_ub=np.zeros(ep_size), A_eq=equal, b_eq=totals,
                     bounds=(0, None), method="highs")
    mean = (counts.sum() + shared_rows * serving.size) / serving.size
    return result.fun / mean - 1.0 if mean > 0 else 0.0


def judge(plans, test, ep_size: int) -> dict:
    """``[L, S]`` plans on ``[K, L, E]`` test iterations -> the per-iteration figures: routed rows under
    the equal split, the load-aware split and its LP (subsample), and the same two with the shared
    expert's rows in the balance (``TOKENS_PER_RANK`` per rank)."""
    layers = np.arange(0, plans.shape[0], LP_LAYER_STRIDE)
    sub_plans, sub_test = plans[layers], test[:LP_ITERATIONS, layers]
    lp = lambda shared: float(np.mean([lp_optimum(plans[layer], test[k, layer], ep_size, shared)
                                       for layer in layers for k in range(LP_ITERATIONS)]))
    return dict(equal=per_iteration_imbalance(plans, test, ep_size, passes=0).mean(),
                load_aware=per_iteration_imbalance(plans, test, ep_size).mean(),
                sub_load_aware=per_iteration_imbalance(sub_plans, sub_test, ep_size).mean(), lp=lp(0.0),
                shared=per_iteration_imbalance(plans, test, ep_size, shared_rows=TOKENS_PER_RANK).mean(),
                sub_shared=per_iteration_imbalance(sub_plans, sub_test, ep_size, shared_rows=TOKENS_PER_RANK).mean(),
                lp_shared=lp(TOKENS_PER_RANK))


def per_iteration_set(loads, geometries) -> list[str]:
    """Prints and returns the per-iteration table over the ``[L, E]`` load sets."""
    print(f"\n## per-iteration imbalance (max/mean - 1 each iteration; {TOKENS_PER_RANK} tokens x top-{TOP_K} "
          f"per rank; train/test: two noise-model draws of 16 iterations; LP: every {LP_LAYER_STRIDE}th layer x "
          f"{LP_ITERATIONS} test iterations), {len(loads)} load sets x {loads[0].shape[0]} layers")
    print("routed: rows of routed experts; +shared: the shared expert's rows (256 per rank) move with the split; "
          "sub: on the LP's subsample")
    print(f"{'geometry':>9} {'algorithm':>11} {'train LA':>9} {'test equal':>10} {'test LA':>8} "
          f"{'sub LA':>7} {'LP':>7} {'LA+shared':>9} {'sub':>7} {'LP':>7} {'totals max/mean':>15} {'s/plan':>7}")
    rows = []
    for ep_size, num_slots in geometries:
        if (ep_size, num_slots) in NAMED_GEOMETRIES:
            print(f"{ep_size:>4}/{num_slots:<4} = {NAMED_GEOMETRIES[ep_size, num_slots]}")
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
                train_la.append(per_iteration_imbalance(plans, train, ep_size,
                                                        shared_rows=options.get("shared_rows", 0.0)).mean())
                loads_per_rank = rank_loads(load, plans, ep_size)
                totals.append((loads_per_rank.max(1) / loads_per_rank.mean(1)).mean())
            mean = {key: np.mean([f[key] for f in figures]) for key in figures[0]}
            row = (f"{ep_size:>4}/{num_slots:<4} {name:>11} {np.mean(train_la):>9.4f} {mean['equal']:>10.4f} "
                   f"{mean['load_aware']:>8.4f} {mean['sub_load_aware']:>7.4f} {mean['lp']:>7.4f} "
                   f"{mean['shared']:>9.4f} {mean['sub_shared']:>7.4f} {mean['lp_shared']:>7.4f} "
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
