#!/usr/bin/env python
"""EP MoE layer step: no EPLB vs a balanced plan, round_robin vs load_aware replica choice.

Routing skew comes from real DeepSeek-V3 per-expert loads (../shared/data, one MoE layer;
synthetic log-normal popularity if absent): the router's bias makes tokens pick experts with
those frequencies. Prints per-rank received entries, realized imbalance (max/mean - 1) and
step time (median of repeats, host clock) per configuration. On CPU the layer is scaled down
and the devices are emulated (``--emulate_devices``), so times compare configurations only.

  python scripts/bench_moe.py [--ep 8] [--tokens 2048] [--hidden 256] [--ffn 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--emulate_devices", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--slots_per_rank", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[1].parent / "shared/data/deepseek-v3-sglang/prefill_in1024.json")
    args = parser.parse_args()
    if "jax" not in sys.modules and args.emulate_devices:
        os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.emulate_devices}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jax_eplb import build_assignment_tables, default_slot_to_expert, load_sglang_json, plan_placement
    from jax_eplb._synthetic import expert_popularity
    from jax_eplb.moe import ExpertWeights, MoEConfig, RouterWeights, ep_moe_forward, slot_weights_from_logical

    if len(jax.devices()) < args.ep:
        sys.exit(f"error: {len(jax.devices())} devices < --ep {args.ep}")
    E, k, H, F, R = args.experts, args.top_k, args.hidden, args.ffn, args.ep
    if args.data.exists():
        load = load_sglang_json(args.data).total()[10, :E]  # one MoE layer
        source = f"{args.data.name} layer 13"
    else:
        load = expert_popularity(1, E)[0]
        source = "synthetic log-normal"
    popularity = load / load.sum()
    # DeepSeek-style router: the selection bias log(popularity) skews routing like the recorded layer.
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=k, router="deepseek")
    keys = jax.random.split(jax.random.key(0), 5)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    logical = ExpertWeights(*(jax.random.normal(kk, s, dtype) * 0.05 for kk, s in
                              zip(keys[:3], [(E, H, F), (E, H, F), (E, F, H)])))
    router = RouterWeights(jax.random.normal(keys[3], (H, E)) / np.sqrt(H),
                           jnp.asarray(0.5 * np.log(popularity + 1e-9), jnp.float32))
    mesh = Mesh(np.array(jax.devices()[:R]), ("ep",))
    x = jax.random.normal(keys[4], (args.tokens, H), dtype)
    plans = {"no EPLB": default_slot_to_expert(E, E, R),
             "balanced": plan_placement(load[None], args.slots_per_rank * R, R).slot_to_expert[0]}
    print(f"device: {jax.devices()[0].device_kind} x{R}, jax {jax.__version__}; skew from {source}; "
          f"T={args.tokens} H={H} F={F} E={E} k={k}")
    print(f"{'placement':>10} {'policy':>12} {'slots':>6} {'imbalance':>9} {'max/rank':>9} {'ms/step':>8}")
    for name, slot_to_expert in plans.items():
        tables = build_assignment_tables(slot_to_expert, E)
        slots = slot_weights_from_logical(logical, slot_to_expert, mesh)
        xs = jax.device_put(x, NamedSharding(mesh, P("ep")))
        for policy in ("round_robin", "load_aware"):
            fn = jax.jit(lambda r, s, xx, rc, es: ep_moe_forward(config, mesh, r, s, xx, rc, es, replica_policy=policy))
            rc, es = jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0])
            out, counts = fn(router, slots, xs, rc, es)
            out.block_until_ready()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn(router, slots, xs, rc, es)[0].block_until_ready()
                times.append(time.perf_counter() - start)
            per_rank = np.asarray(counts).sum(0).reshape(R, -1).sum(1)
            print(f"{name:>10} {policy:>12} {len(slot_to_expert):>6} {per_rank.max() / per_rank.mean() - 1:>9.3f} "
                  f"{per_rank.max():>9} {1e3 * statistics.median(times):>8.1f}", flush=True)


if __name__ == "__main__":
    main()
