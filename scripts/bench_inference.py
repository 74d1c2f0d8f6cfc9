#!/usr/bin/env python
"""Inference throughput and step time: no EPLB vs a static EPLB plan (round_robin and
load_aware replica choice), side by side in one run.

The plan comes from statistics recorded in the no-EPLB run (the offline workflow). A second table
gives the EP exchange of each configuration: bytes each rank sends per MoE layer (dispatch +
combine; mean over ranks and the busiest rank) and the receive buffer, for every transport and
dispatch mode, from the rows the run's dispatch plans actually sent (recorded every step; the
run itself uses ``--transport auto`` and token dispatch); ragged/token is the real-row minimum. Default:
the tiny model on 8 CPU-emulated devices (times compare configurations on this machine only;
emulated devices share the host's cores, so a rank's extra load costs less than on real GPUs).
On a GPU machine: ``--model deepseek_v3_slice --ep 1 --emulate_devices 0`` (one GPU has no EP
imbalance to fix, so this measures the step cost of the slot machinery).

  python scripts/bench_inference.py [--model tiny] [--ep 8] [--num_slots 80] [--requests 256]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from jax_eplb.cli import HelpWithDefaults


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--num_slots", type=int, default=80)
    parser.add_argument("--emulate_devices", type=int, default=8, help="0: the machine's accelerators")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--input_len", type=int, default=32)
    parser.add_argument("--output_len", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=128)
    parser.add_argument("--grouped_matmul", nargs="+", default=["auto"],
                        help="one row set per grouped matmul (e.g. ragged_dot pallas on a GPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()

    from jax_eplb import plan_config_from_slots, plan_placement
    from jax_eplb.serving import (TRAFFIC_HEADER, StatisticsRecorder, ThroughputSettings, format_traffic, model_source,
                                  run_throughput, token_norm_dist)
    from jax_eplb.sharding import ep_mesh

    config, weights = model_source(args.model)
    requests = token_norm_dist(num_requests=args.requests, input_mean=args.input_len, output_mean=args.output_len,
                               vocab_size=config.vocab_size)
    mesh = ep_mesh(args.ep, args.emulate_devices or None)
    quiet = lambda _: None  # noqa: E731

    def bench(matmul, plan=None, policy="round_robin", recorder=None):
        settings = ThroughputSettings(max_batch_size=args.max_batch_size, grouped_matmul=matmul, replica_policy=policy,
                                      progress=False, traffic=True)
        return run_throughput(config, weights, requests, mesh, settings, plan=plan, recorder=recorder, log=quiet)

    recorder = StatisticsRecorder(None, 0, 100000, config.moe_layer_ids, config.top_k)  # kept in memory
    baseline = bench(args.grouped_matmul[0], recorder=recorder)
    first = baseline.figures
    print(f"model {config.name}, ep={args.ep} ({first['platform']}), {args.requests} requests, input "
          f"{args.input_len}, output {args.output_len}, batch {args.max_batch_size}")
    print(f"{'configuration':<44} {'tok/s':>9} {'x':>6} {'step ms':>8} {'decode ms':>9} {'prefill ms':>10} "
          f"{'imbalance':>9}", flush=True)
    out = []

    def report(name, result, matmul):
        f = result.figures
        speedup = f['output_tokens_per_s'] / first['output_tokens_per_s']
        print(f"{name:<44} {f['output_tokens_per_s']:>9.1f} {speedup:>6.2f} "
              f"{f['mean_step_ms']:>8.2f} {f['mean_decode_step_ms']:>9.2f} {f['mean_prefill_step_ms']:>10.2f} "
              f"{f['mean_imbalance']:>9.3f}", flush=True)
        out.append({"configuration": name, "grouped_matmul": matmul, **f})
        if result.tokens == baseline.tokens:
            return
        if matmul == args.grouped_matmul[0]:  # same arithmetic: a placement must not change a single token
            print(f"error: {name} generated different tokens than no EPLB", file=sys.stderr)
            sys.exit(1)
        same = np.mean([a == b for x, y in zip(result.tokens, baseline.tokens) for a, b in zip(x, y)])
        print(f"  ({matmul} rounds differently from {args.grouped_matmul[0]}: {100 * same:.1f}% of tokens equal)")

    report("no EPLB", baseline, args.grouped_matmul[0])
    stats = recorder.statistics()
    plan = plan_config_from_slots(plan_placement(stats.total(), args.num_slots, args.ep).slot_to_expert,
                                  stats.layer_ids)
    for matmul in args.grouped_matmul:
        suffix = "" if len(args.grouped_matmul) == 1 else f", {matmul}"
        for policy in ("round_robin", "load_aware"):
            report(f"EPLB {args.num_slots} slots, {policy}{suffix}", bench(matmul, plan, policy), matmul)
            if args.json:  # after every row: a run cut short keeps what it measured
                args.json.write_text(json.dumps(out, indent=2))
    print(f"\nEP exchange per rank and MoE layer (dispatch + combine to other ranks; {config.dtype} activations, "
          f"float32 results), mean over timed iterations and layers")
    print(f"{'configuration':<44} {TRAFFIC_HEADER}")
    for row in out:
        print("\n".join(format_traffic(row["traffic"], f"{row['configuration']:<44} ")))


if __name__ == "__main__":
    main()
