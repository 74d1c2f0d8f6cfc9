#!/usr/bin/env python
"""Placement quality, migration cost and planner time: identity vs trtllm vs deepseek vs balanced
vs flow.

Loads: the real DeepSeek-V3 statistics in ../shared/data/deepseek-v3-sglang (skipped if
absent) and synthetic log-normal loads. For each EP geometry prints, per algorithm, the mean
and worst (over layers and files) max/mean rank load, the lower bound, replicas sharing a rank
with a copy, slots moved between consecutive files' plans (fresh vs --previous_config), and the
median planner time per file.

Then the per-iteration table (real loads): each iteration's max/mean - 1 of the rank loads,
averaged over iterations, layers and files. Iterations come from the noise model
counts ~ Multinomial(R x 256 x 8, Dirichlet(20000 p)); plans are made from one draw (train),
judged on another (test) under the equal split over replicas (TensorRT-LLM's round robin), our
load_aware split, and the per-iteration LP optimum of the split for that plan (on a subsample
of layers and iterations, next to load_aware on the same subsample).

  python scripts/bench_placement.py [--data DIR] [--repeats 3] [--geometries 32/288,144/288]
                                    [--iteration_geometries 36/288] [--skip_totals] [--online_timing]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from jax_eplb import default_slot_to_expert, load_sglang_json, lower_bound, plan_placement
from jax_eplb._metrics import duplicate_count, rank_loads
from jax_eplb._synthetic import expert_popularity
from bench_iterations import online_planning_table, per_iteration_set
from jax_eplb.cli import HelpWithDefaults

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deepseek-v3-sglang"
ALGOS = {
    "identity": None,
    "trtllm": dict(algorithm="trtllm"),
    "deepseek": dict(algorithm="deepseek"),
    "deepseek-hier": dict(algorithm="deepseek", num_groups=8, num_nodes=4),
    "balanced": dict(algorithm="balanced"),
    "flow": dict(algorithm="flow"),
}


def plan_for(name, load, num_slots, ep_size, previous=None):
    if ALGOS[name] is None:
        return np.tile(default_slot_to_expert(load.shape[1], num_slots, ep_size), (load.shape[0], 1))
    return plan_placement(load, num_slots, ep_size, previous=previous, **ALGOS[name]).slot_to_expert


def bench_set(label, loads, geometries, repeats):
    print(f"\n## {label}: {len(loads)} load sets x {loads[0].shape[0]} layers x {loads[0].shape[1]} experts")
    header = (f"{'geometry':>9} {'algorithm':>13} {'mean max/mean':>13} {'worst':>7} {'dup':>5} "
              f"{'moved fresh':>11} {'moved w/ prev':>13} {'ms/plan':>8}")
    print(header)
    rows = []
    for ep_size, num_slots in geometries:
        bound = np.concatenate([(lambda b: b.max_rank_load / b.mean_rank_load)(lower_bound(w, num_slots, ep_size))
                                for w in loads])
        for name in ALGOS:
            if name == "deepseek-hier" and (ep_size % 4 or num_slots // 4 < loads[0].shape[1] // 4):
                continue
            ratios, dups, times, moved_fresh, moved_prev, prev = [], 0, [], [], [], None
            for i, load in enumerate(loads):
                t = []
                for _ in range(repeats if i == 0 else 1):
                    start = time.perf_counter()
                    plan = plan_for(name, load, num_slots, ep_size)
                    t.append(time.perf_counter() - start)
                times.append(statistics.median(t))
                rl = rank_loads(load, plan, ep_size)
                ratios.append(rl.max(1) / rl.mean(1))
                dups += int(duplicate_count(plan, ep_size).sum())
                if prev is not None and ALGOS[name] is not None:
                    moved_fresh.append((plan != prev).sum(1).mean())
                    kept = plan_for(name, load, num_slots, ep_size, previous=prev)
                    moved_prev.append((kept != prev).sum(1).mean())
                prev = plan
            r = np.concatenate(ratios)
            fmt_moved = lambda m: f"{np.mean(m):.1f}" if m else "-"
            row = (f"{ep_size:>4}/{num_slots:<4} {name:>13} {r.mean():>13.4f} {r.max():>7.3f} {dups:>5} "
                   f"{fmt_moved(moved_fresh):>11} {fmt_moved(moved_prev):>13} {1e3 * statistics.median(times):>8.1f}")
            print(row, flush=True)
            rows.append(row)
        print(f"{ep_size:>4}/{num_slots:<4} {'lower bound':>13} {bound.mean():>13.4f} {bound.max():>7.3f}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--geometries", default="32/288,64/320,96/288,144/288")
    parser.add_argument("--synthetic_sets", type=int, default=4)
    parser.add_argument("--iteration_geometries", default="32/288,36/288,64/320,144/288")
    parser.add_argument("--skip_totals", action="store_true", help="only the per-iteration tables")
    parser.add_argument("--online_timing", action="store_true",
                        help="only the online flow planner's time per layer (first real load file)")
    args = parser.parse_args()
    geometries = [tuple(int(x) for x in g.split("/")) for g in args.geometries.split(",")]
    files = sorted(args.data.glob("*.json")) if args.data.is_dir() else []
    loads = [load_sglang_json(f).total() for f in files]
    iteration_geometries = [tuple(int(x) for x in g.split("/")) for g in args.iteration_geometries.split(",")]
    if files and args.online_timing:
        online_planning_table(loads[0], iteration_geometries)
        return
    if not files:
        print(f"(real data not found at {args.data}; skipped)")
    elif not args.skip_totals:
        bench_set(f"DeepSeek-V3 (SGLang) loads from {args.data.name}", loads, geometries, args.repeats)
    if not args.skip_totals:
        synthetic = [expert_popularity(58, 256, seed=s) * 1e6 for s in range(args.synthetic_sets)]
        bench_set("synthetic log-normal loads (sigma 0.8)", synthetic, geometries, args.repeats)
    if files:
        per_iteration_set(loads, iteration_geometries)


if __name__ == "__main__":
    main()
