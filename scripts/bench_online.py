#!/usr/bin/env python
"""Online EPLB under drift: expert popularity changes mid-run.

The tiny model serves a dataset on 8 CPU-emulated ranks; at ``--shift`` (fraction of the run)
every MoE layer's expert popularity changes (the router's selection bias is redrawn), the same
iteration in every run. Runs side by side:

* no EPLB (default layout, one slot per expert);
* static: a plan made from the no-EPLB run's statistics *before* the shift (goes stale);
* online: ``layer_updates_per_iter`` k, starting from the default layout, with our
  migration-aware planner, and (for the first k) TensorRT-LLM's planner re-planning from scratch.

Prints imbalance per window of iterations, the online balancer's slots and bytes moved, planner
and rebalance time, and how many iterations after the shift online drops below static. The
generated tokens of all runs must match (EPLB never changes outputs).

  python scripts/bench_online.py [--k 1] [--requests 512] [--window 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from jax_eplb.cli import HelpWithDefaults


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--num_slots", type=int, default=80)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2], help="layer_updates_per_iter values to run")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--input_len", type=int, default=16)
    parser.add_argument("--output_len", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=128)
    parser.add_argument("--shift", type=float, default=0.4, help="fraction of the iterations before the shift")
    parser.add_argument("--window", type=int, default=6, help="iterations per printed window")
    args = parser.parse_args()

    import jax
    import numpy as np

    from jax_eplb import MoeLoadBalancerConfig, plan_config_from_slots, plan_placement
    from jax_eplb.model import router_bias
    from jax_eplb.serving import StatisticsRecorder, ThroughputSettings, model_source, run_throughput, token_norm_dist
    from jax_eplb.sharding import ep_mesh

    config, weights = model_source(args.model)
    requests = token_norm_dist(num_requests=args.requests, input_mean=args.input_len, output_mean=args.output_len,
                               vocab_size=config.vocab_size)
    mesh = ep_mesh(args.ep, args.ep)
    batches = -(-args.requests // args.max_batch_size)
    total_iters = batches * args.output_len
    shift_at = int(total_iters * args.shift)
    shifted_bias = router_bias(dataclasses.replace(config, popularity_seed=config.popularity_seed + 1))

    def drift(iteration, model):
        if iteration == shift_at:  # every MoE layer's selection bias changes: new hot experts
            bias = model.moe_block.correction_bias
            bias.set_value(jax.device_put(shifted_bias, bias.get_value().sharding))

    def bench(plan=None, planner="migration_aware", recorder=None):
        settings = ThroughputSettings(max_batch_size=args.max_batch_size, online_planner=planner, progress=False)
        return run_throughput(config, weights, requests, mesh, settings, plan=plan, recorder=recorder,
                              log=lambda _: None, before_iteration=drift)

    def online(k):
        return MoeLoadBalancerConfig(num_slots=args.num_slots, layer_updates_per_iter=k)

    recorder = StatisticsRecorder(None, 0, shift_at, config.moe_layer_ids, config.top_k)  # kept in memory
    runs = {"no EPLB": bench(recorder=recorder)}
    stats = recorder.statistics()
    static = plan_config_from_slots(plan_placement(stats.total(), args.num_slots, args.ep).slot_to_expert,
                                    stats.layer_ids)
    runs["static (pre-shift plan)"] = bench(static)
    for k in args.k:
        runs[f"online k={k}"] = bench(online(k))
    runs[f"online k={args.k[0]} trtllm"] = bench(online(args.k[0]), "trtllm")

    names = list(runs)
    series = {n: np.array([r["imbalance"] for r in runs[n].per_iteration]) for n in names}
    iters = len(series[names[0]])
    print(f"model {config.name}, ep={args.ep}, {args.num_slots} slots, {iters} iterations, popularity shift at "
          f"iteration {shift_at}; imbalance (max/mean - 1 of per-rank load, mean over MoE layers) per window")
    head = f"{'iterations':>11} " + " ".join(f"{n:>24}" for n in names)
    online_names = [n for n in names if n.startswith("online")]
    head += " " + " ".join(f"{'moved ' + n[7:]:>14}" for n in online_names)
    print(head)
    for start in range(0, iters, args.window):
        stop = min(iters, start + args.window)
        mark = "*" if start <= shift_at < stop else " "
        cells = " ".join(f"{series[n][start:stop].mean():>24.3f}" for n in names)
        moved = " ".join(f"{sum(r.get('slots_moved', 0) for r in runs[n].per_iteration[start:stop]):>14}"
                         for n in online_names)
        print(f"{start:>5}-{stop - 1:<4}{mark} {cells} {moved}")
    print("(* = window with the shift; 'moved' = slots rewritten by the online balancer)")
    after = slice(shift_at, iters)
    tail = slice(shift_at + (iters - shift_at) // 2, iters)
    print(f"\n{'run':<24} {'before shift':>12} {'after shift':>12} {'last half after':>15} {'tok/s':>8}")
    for n in names:
        f = runs[n].figures
        print(f"{n:<24} {series[n][:shift_at].mean():>12.3f} {series[n][after].mean():>12.3f} "
              f"{series[n][tail].mean():>15.3f} {f['output_tokens_per_s']:>8.1f}")
    static = series["static (pre-shift plan)"]
    for n in online_names:
        f = runs[n].figures
        window = args.window
        below = next((i for i in range(shift_at, iters - window + 1)
                      if series[n][i:i + window].mean() < static[i:i + window].mean()), None)
        print(f"{n}: {f['layer_updates']} layer updates, {f['slots_moved']} slots "
              f"({f['slots_moved'] / max(f['layer_updates'], 1):.1f} of {args.num_slots} per update), "
              f"{f['bytes_moved'] / 2**20:.1f} MiB moved; planner {f['mean_plan_ms_per_update']:.2f} ms per layer "
              f"update (host thread); rebalance {f['mean_apply_ms_per_iteration']:.2f} ms per iteration; "
              f"below static {'never' if below is None else f'from {below - shift_at} iterations after the shift'}")
    mismatched = [n for n in names if runs[n].tokens != runs[names[0]].tokens]
    if mismatched:
        print(f"error: {mismatched} generated different tokens than no EPLB", file=sys.stderr)
        sys.exit(1)
    print("generated tokens identical across all runs")


if __name__ == "__main__":
    main()
