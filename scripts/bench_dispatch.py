#!/usr/bin/env python
"""Entry vs token dispatch, side by side: the EP MoE layer step timed with the two modes interleaved
(one call of each in turn, median over rounds), so a noisy machine slows both alike; also the
largest difference between their outputs.

Layer as bench_moe.py (``recorded_layer``: routing skew from a recorded DeepSeek-V3 layer; balanced
plan, padded matmul on CPU), both replica policies, the ``all_to_all`` transport (``--transport ragged`` on GPUs).

  python scripts/bench_dispatch.py [--ep 8] [--tokens 1024] [--rounds 9]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from jax_eplb.cli import HelpWithDefaults

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deepseek-v3-sglang"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--emulate_devices", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--slots_per_rank", type=int, default=36)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--transport", default="all_to_all")
    parser.add_argument("--grouped_matmul", default="auto")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "prefill_in1024.json")
    args = parser.parse_args()
    if args.emulate_devices:
        os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.emulate_devices}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from bench_moe import recorded_layer

    from jax_eplb import build_assignment_tables, plan_placement
    from jax_eplb.moe import MoEOptions, ep_moe_forward, slot_weights_from_logical

    if len(jax.devices()) < args.ep:
        sys.exit(f"error: {len(jax.devices())} devices < --ep {args.ep}")
    E, k, H, F, R = 256, 8, args.hidden, args.ffn, args.ep
    config, router, logical, x, load, _ = recorded_layer(args.data, E, k, H, F, args.tokens)
    mesh = Mesh(np.array(jax.devices()[:R]), ("ep",))
    x = jax.device_put(x, NamedSharding(mesh, P("ep")))
    plan = plan_placement(load[None], args.slots_per_rank * R, R).slot_to_expert[0]
    tables = build_assignment_tables(plan, E)
    call_args = (router, slot_weights_from_logical(logical, plan, mesh), x, jnp.asarray(tables.replica_count[0]),
                 jnp.asarray(tables.expert_slots[0]))
    runs = {}
    for policy in ("round_robin", "load_aware"):
        for dispatch in ("entry", "token"):
            options = MoEOptions(replica_policy=policy, dispatch=dispatch, transport=args.transport,
                                 grouped_matmul=args.grouped_matmul)
            runs[(policy, dispatch)] = jax.jit(functools.partial(ep_moe_forward, config, mesh, options=options))
    outs = {key: fn(*call_args).out for key, fn in runs.items()}
    times = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn(*call_args).out.block_until_ready()
            times[key].append(time.perf_counter() - start)
    print(f"device: {jax.devices()[0].device_kind} x{R}, jax {jax.__version__}; T={args.tokens} H={H} F={F} E={E} "
          f"k={k}, {args.transport}, median of {args.rounds} interleaved rounds")
    print(f"{'policy':>12} {'entry ms':>9} {'token ms':>9} {'token/entry':>11} {'max |diff|':>10}")
    for policy in ("round_robin", "load_aware"):
        entry, token = (1e3 * statistics.median(times[(policy, d)]) for d in ("entry", "token"))
        diff = float(jnp.max(jnp.abs(outs[(policy, "entry")] - outs[(policy, "token")])))
        print(f"{policy:>12} {entry:>9.1f} {token:>9.1f} {token / entry:>11.2f} {diff:>10.1e}")


if __name__ == "__main__":
    main()
