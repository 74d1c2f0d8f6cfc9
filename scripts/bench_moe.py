#!/usr/bin/env python
"""EP MoE layer step: no EPLB vs a balanced plan, round_robin vs load_aware replica choice,
all_to_all vs ragged transport (GPU only), entry vs token dispatch, ragged_dot vs tile-grouped
matmul (padded on CPU, the Pallas kernel on GPU), and the bytes each exchange moves per rank.

Routing skew comes from real DeepSeek-V3 per-expert loads (../shared/data, one MoE layer;
synthetic log-normal popularity if absent): the router's bias makes tokens pick experts with
those frequencies. Prints per-rank received entries, realized imbalance (max/mean - 1) and
step time (median of repeats, host clock) per configuration. On CPU the layer is scaled down
and the devices are emulated (``--emulate_devices``), so times compare configurations only.
A second table times one rank's grouped SwiGLU (the same methods) against a dense matmul of
the same useful FLOPs, in TFLOP/s, and the same grouped SwiGLU with FP8 weights dequantized in
the step against bf16 weights (ms, ratio); a third the layer with a shared expert, its rows balanced or
not (more than one rank); a fourth the load-aware split alone (bench_split.py: the accelerated
passes vs the 16 damped ones they replaced) at this geometry and at DeepSeek-V3's EP36/288, next
to the layer step above. A configuration that fails is reported and skipped.

  python scripts/bench_moe.py [--ep 8] [--tokens 2048] [--hidden 256] [--ffn 128]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple
from jax_eplb.cli import HelpWithDefaults

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deepseek-v3-sglang"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--emulate_devices", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--slots_per_rank", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul_rows", type=int, nargs="*", default=[512, 2048],
                        help="rows for the grouped-vs-dense matmul table")
    parser.add_argument("--transports", nargs="+", default=None,
                        help="default: all_to_all and ragged on GPU, all_to_all on CPU")
    parser.add_argument("--dispatches", nargs="+", default=["entry", "token"], help="dispatch modes")
    parser.add_argument("--matmuls", nargs="+", default=None,
                        help="grouped matmuls; default: ragged_dot and pallas on GPU, ragged_dot and padded on CPU")
    parser.add_argument("--data", type=Path,
                        default=SHARED_DATA / "prefill_in1024.json")
    parser.add_argument("--plans", nargs="+", choices=("no_eplb", "balanced"), default=["no_eplb", "balanced"],
                        help="placements to run (the first is each configuration's baseline)")
    parser.add_argument("--policies", nargs="+", choices=("round_robin", "load_aware"),
                        default=["round_robin", "load_aware"], help="replica choices to run")
    parser.add_argument("--table_matmuls", nargs="+", default=None,
                        help="grouped matmuls of the matmul-vs-dense table (default: --matmuls)")
    parser.add_argument("--no_split_table", action="store_true", help="leave out the load-aware split table")
    parser.add_argument("--fp8_slots", type=int, default=32,
                        help="local slots of the FP8-vs-bf16 table (at most --slots_per_rank; 32 = DeepSeek-V3 at EP8)")
    args = parser.parse_args()
    if "jax" not in sys.modules and args.emulate_devices:
        os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.emulate_devices}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from jax_eplb import build_assignment_tables, default_slot_to_expert, plan_placement

    if len(jax.devices()) < args.ep:
        sys.exit(f"error: {len(jax.devices())} devices < --ep {args.ep}")
    E, k, H, F, R = args.experts, args.top_k, args.hidden, args.ffn, args.ep
    config, router, logical, x, load, source = recorded_layer(args.data, E, k, H, F, args.tokens)
    dtype = x.dtype
    mesh = Mesh(np.array(jax.devices()[:R]), ("ep",))
    make_plan = {"no_eplb": lambda: default_slot_to_expert(E, E, R),
                 "balanced": lambda: plan_placement(load[None], args.slots_per_rank * R, R).slot_to_expert[0]}
    labels = {"no_eplb": "no EPLB", "balanced": "balanced"}
    print(f"device: {jax.devices()[0].device_kind} x{R}, jax {jax.__version__}; skew from {source}; "
          f"T={args.tokens} H={H} F={F} E={E} k={k}")
    on_gpu = jax.devices()[0].platform == "gpu"
    transports = args.transports or (["all_to_all", "ragged"] if on_gpu else ["all_to_all"])
    # padded gathers a weight copy per tile (CPU only); pallas reads them in place (compiled: GPU only)
    matmuls = args.matmuls or (["ragged_dot", "pallas"] if on_gpu else ["ragged_dot", "padded"])
    print("compile s: the first call (trace, compile, run); ms/step: median of the repeats after it; peak GiB: the "
          "device's peak memory so far; diff: largest |out - first configuration's out| / its largest |out|")
    print(f"{'placement':>10} {'policy':>12} {'transport':>10} {'dispatch':>8} {'matmul':>10} {'slots':>6} "
          f"{'imbalance':>9} {'max/rank':>9} {'compile s':>9} {'ms/step':>8} {'vs no-EPLB':>10} {'peak GiB':>8} "
          f"{'diff':>8}")
    baseline, reference, plans = {}, [], {}
    for name in dict.fromkeys(args.plans):  # the first is the baseline
        plans[name] = slot_to_expert = make_plan[name]()
        layer_table(jax, jnp, np, config, mesh, router, logical, x, slot_to_expert, labels[name], args, transports,
                    matmuls, baseline, reference)  # the slot weights are freed on return, before the next layout
        _traffic_of_batch(jax, jnp, np, config, router, x, build_assignment_tables(slot_to_expert, E), slot_to_expert,
                          R, labels[name], dtype)
    if R > 1 and "balanced" in plans:  # one rank has no one to hand shared rows to
        shared_balance_table(jax, jnp, np, config, mesh, router, logical, x, plans["balanced"], matmuls[0],
                             args.repeats)
    del logical, reference  # the grouped-matmul table's weights take their place
    grouped_matmul_table(jax, jnp, np, E, R, H, F, dtype, args, methods=args.table_matmuls or matmuls)
    fp8_matmul_table(jax, jnp, H, F, args, methods=args.table_matmuls or matmuls)
    if not args.no_split_table:
        from bench_split import split_table

        split_table(load, [(R, args.slots_per_rank * R), (36, 288)], max(args.tokens // R, 1), k)


def layer_table(jax, jnp, np, config, mesh, router, logical, x, slot_to_expert, name, args, transports, matmuls,
                baseline, reference):
    """One placement's rows: every policy x transport x dispatch x matmul, timed; ``reference`` holds the first
    configuration's output (every other one computes the same experts, so must agree to the dtype's rounding)."""
    import itertools

    from jax.sharding import NamedSharding, PartitionSpec as P

    from jax_eplb import build_assignment_tables
    from jax_eplb.moe import MoEOptions, ep_moe_forward, slot_weights_from_logical

    tables = build_assignment_tables(slot_to_expert, config.num_experts)
    slots = slot_weights_from_logical(logical, slot_to_expert, mesh)
    xs = jax.device_put(x, NamedSharding(mesh, P("ep")))
    rc, es = jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0])
    for policy in args.policies:
        for transport, dispatch, matmul in itertools.product(transports, args.dispatches, matmuls):
            options = MoEOptions(replica_policy=policy, transport=transport, grouped_matmul=matmul, dispatch=dispatch)
            fn = jax.jit(functools.partial(ep_moe_forward, config, mesh, options=options))
            label = f"{name:>10} {policy:>12} {transport:>10} {dispatch:>8} {matmul:>10}"
            try:
                start = time.perf_counter()
                result = jax.block_until_ready(fn(router, slots, xs, rc, es))
                compile_s = time.perf_counter() - start
                ms = 1e3 * _time(lambda: fn(router, slots, xs, rc, es).out, args.repeats)
            except Exception as error:  # noqa: BLE001 - reported, the other configurations still run
                print(f"{label} FAILED: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:200] if str(error) else ''}", flush=True)
                continue
            out = np.asarray(result.out, np.float32)
            if not reference:
                reference.append(out)
            diff = float(np.abs(out - reference[0]).max() / max(float(np.abs(reference[0]).max()), 1e-30))
            key = (policy, transport, dispatch, matmul)
            baseline.setdefault(key, ms)  # the first placement is the baseline
            per_rank = np.asarray(result.rank_load)
            print(f"{label} {len(slot_to_expert):>6} {per_rank.max() / per_rank.mean() - 1:>9.3f} "
                  f"{per_rank.max():>9} {compile_s:>9.1f} {ms:>8.1f} {baseline[key] / ms:>9.2f}x "
                  f"{_peak_gib(mesh):>8} {diff:>8.1e}", flush=True)


def _peak_gib(mesh) -> str:
    stats = mesh.devices.flat[0].memory_stats() or {}
    return f"{stats['peak_bytes_in_use'] / 2**30:.1f}" if "peak_bytes_in_use" in stats else "-"


def shared_balance_table(jax, jnp, np, config, mesh, router, logical, x, slot_to_expert, matmul, repeats):
    """The layer with one shared expert (FFN = the experts'), its rows balanced or not: step time and the
    rows each rank computes (routed + shared) - ours (on) vs every rank computing its own (off)."""
    import dataclasses

    from jax.sharding import NamedSharding, PartitionSpec as P

    from jax_eplb import build_assignment_tables
    from jax_eplb.moe import ExpertWeights, MoEOptions, ep_moe_forward, slot_weights_from_logical

    E, H, F, R = config.num_experts, config.hidden_size, config.expert_ffn_size, mesh.shape["ep"]
    config = dataclasses.replace(config, num_shared_experts=1)
    keys = jax.random.split(jax.random.key(7), 3)
    shared = ExpertWeights(*(jax.random.normal(k, s, x.dtype) * 0.05 for k, s in zip(keys, ((H, F), (H, F), (F, H)))))
    tables = build_assignment_tables(slot_to_expert, E)
    slots = slot_weights_from_logical(logical, slot_to_expert, mesh)
    xs = jax.device_put(x, NamedSharding(mesh, P("ep")))
    args = (router, slots, xs, jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]))
    print(f"\nshared expert (FFN {F}) in the balance: balanced placement, load_aware, {matmul}; rows = what each rank "
          f"computes (routed entries + shared rows)")
    print(f"{'shared rows':>12} {'rows imbalance':>14} {'max rows/rank':>13} {'ms/step':>8} {'vs off':>7}")
    outs, base = {}, None
    for balance in ("off", "on"):
        options = MoEOptions(replica_policy="load_aware", grouped_matmul=matmul, shared_expert_balance=balance)
        fn = jax.jit(lambda *a, options=options: ep_moe_forward(config, mesh, *a, options=options, shared=shared))
        result = fn(*args)
        ms = 1e3 * _time(lambda: fn(*args).out, repeats)
        rows = np.asarray(result.rank_load) + (x.shape[0] // R if balance == "off" else 0)
        base = base or ms
        outs[balance] = np.asarray(result.out)
        print(f"{balance:>12} {rows.max() / rows.mean() - 1:>14.3f} {rows.max():>13} {ms:>8.1f} {base / ms:>6.2f}x",
              flush=True)
    scale = float(np.abs(outs["off"]).max()) or 1.0
    print(f"outputs on vs off: max |difference| {np.abs(outs['on'] - outs['off']).max() / scale:.1e} (relative)")


class Layer(NamedTuple):
    config: object  # MoEConfig (DeepSeek router)
    router: object  # RouterWeights whose selection bias skews routing like the recorded layer
    logical: object  # ExpertWeights [E, ...]
    x: object  # [tokens, H] input
    load: object  # [E] the recorded (or synthetic) per-expert load
    source: str


def recorded_layer(data: Path, num_experts: int, top_k: int, hidden: int, ffn: int, tokens: int) -> Layer:
    """A DeepSeek-style MoE layer (random weights; bfloat16 on GPU, float32 elsewhere) whose router's
    selection bias ``log(popularity)`` makes tokens pick experts with the frequencies of one recorded
    DeepSeek-V3 layer (layer 13 of ``data``; synthetic log-normal popularity if absent)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_eplb import load_sglang_json
    from jax_eplb._synthetic import expert_popularity
    from jax_eplb.moe import ExpertWeights, MoEConfig, RouterWeights

    E, H, F = num_experts, hidden, ffn
    if data.exists():
        load, source = load_sglang_json(data).total()[10, :E], f"{data.name} layer 13"  # one MoE layer
    else:
        load, source = expert_popularity(1, E)[0], "synthetic log-normal"
    config = MoEConfig(hidden_size=H, expert_ffn_size=F, num_experts=E, top_k=top_k, router="deepseek")
    keys = jax.random.split(jax.random.key(0), 5)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    logical = ExpertWeights(*(jax.random.normal(kk, s, dtype) * 0.05 for kk, s in
                              zip(keys[:3], [(E, H, F), (E, H, F), (E, F, H)])))
    router = RouterWeights(jax.random.normal(keys[3], (H, E)) / np.sqrt(H),
                           jnp.asarray(0.5 * np.log(load / load.sum() + 1e-9), jnp.float32))
    return Layer(config, router, logical, jax.random.normal(keys[4], (tokens, H), dtype), load, source)


def _traffic_of_batch(jax, jnp, np, config, router, x, tables, slot_to_expert, R, name, dtype):
    """The exchange's bytes for this batch's round-robin routing under ``slot_to_expert`` (bench_traffic.py)."""
    from bench_traffic import traffic_table

    from jax_eplb.moe import round_robin_slots, route

    expert_ids = np.asarray(route(config, router, x.astype(jnp.float32)).expert_ids).reshape(R, -1, config.top_k)
    rc, es = jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0])
    slot_ids = np.stack([np.asarray(round_robin_slots(jnp.asarray(ids), rc, es, len(slot_to_expert), rank,
                                                      implementation="xla").slot_ids)
                         for rank, ids in enumerate(expert_ids)])
    traffic_table(slot_ids, len(slot_to_expert) // R, x.shape[1], jnp.dtype(dtype).itemsize,
                  title=f" ({name}, this batch, round_robin routing)")


def grouped_matmul_table(jax, jnp, np, E, R, H, F, dtype, args, methods):
    """One rank's grouped expert matmul (m = slots_per_rank groups) vs a dense matmul of the same
    useful FLOPs ([rows, H] x [H, F], three of them as SwiGLU), TFLOP/s (rows * 6 * H * F / t)."""
    from jax_eplb.moe import expert_compute

    m = args.slots_per_rank
    print(f"\ngrouped SwiGLU over {m} local slots vs dense matmul (H={H} F={F}, {jnp.dtype(dtype).name})")
    print(f"{'rows':>7} " + " ".join(f"{name:>11}" for name in methods) + f" {'dense':>9}  (TFLOP/s)")
    keys = jax.random.split(jax.random.key(1), 4)
    w = [jax.random.normal(keys[0], (m, H, F), dtype), jax.random.normal(keys[1], (m, H, F), dtype),
         jax.random.normal(keys[2], (m, F, H), dtype)]
    for rows in args.matmul_rows:
        x = jax.random.normal(keys[3], (rows, H), dtype)
        row_slot = jnp.sort(jax.random.randint(keys[3], (rows,), 0, m))
        flops = rows * 6 * H * F
        cells = []
        for method in methods:
            fn = jax.jit(lambda x, s, a, b, c: expert_compute(x, s, a, b, c, grouped_matmul=method))
            try:
                cells.append(flops / _time(lambda: fn(x, row_slot, *w), args.repeats) / 1e12)
            except Exception as error:  # noqa: BLE001
                print(f"{method} at {rows} rows FAILED: {type(error).__name__}: {str(error)[:200]}")
                cells.append(float("nan"))
        dense = jax.jit(lambda x, a, b, c: jnp.dot(jax.nn.silu(jnp.dot(x, a)) * jnp.dot(x, b), c))
        cells.append(flops / _time(lambda: dense(x, w[0][0], w[1][0], w[2][0]), args.repeats) / 1e12)
        print(f"{rows:>7} " + " ".join(f"{c:>11.3f}" for c in cells[:-1]) + f" {cells[-1]:>9.3f}", flush=True)


def fp8_matmul_table(jax, jnp, H, F, args, methods):
    """One rank's grouped SwiGLU with FP8 expert weights (e4m3, float32 scale per 128x128 block,
    dequantized to bf16 inside the jitted call right before the matmuls, as the model's MoE layers
    do) vs the same weights held in bf16: ms per call and the ratio, in one run."""
    from jax_eplb.moe import BlockFp8, dequantize, expert_compute, scale_shape

    m = min(args.fp8_slots, args.slots_per_rank)
    print(f"\nFP8 expert weights dequantized in the step vs bf16 weights ({m} local slots, H={H} F={F}, bf16 compute)")
    print(f"{'rows':>7} {'matmul':>11} {'bf16 ms':>9} {'fp8 ms':>9} {'fp8/bf16':>9} {'weights MB bf16 -> fp8':>24} "
          f"{'diff':>8}")
    keys = jax.random.split(jax.random.key(2), 7)
    shapes = ((m, H, F), (m, H, F), (m, F, H))
    fp8 = [BlockFp8(jax.random.normal(keys[i], shape, jnp.float32).astype(jnp.float8_e4m3fn),
                    jax.random.uniform(keys[3 + i], scale_shape(shape, (128, 128)), jnp.float32, 0.01, 0.02))
           for i, shape in enumerate(shapes)]
    bf16 = [dequantize(w, jnp.bfloat16) for w in fp8]  # the same numbers
    megabytes = (sum(w.size * 2 for w in bf16) / 1e6, sum(w.nbytes for w in fp8) / 1e6)
    for rows in args.matmul_rows:
        x = jax.random.normal(keys[6], (rows, H), jnp.bfloat16)
        row_slot = jnp.sort(jax.random.randint(keys[6], (rows,), 0, m))
        for method in methods:
            plain = jax.jit(functools.partial(expert_compute, grouped_matmul=method))
            quantized = jax.jit(lambda x, s, a, b, c: expert_compute(
                x, s, *(dequantize(w, x.dtype) for w in (a, b, c)), grouped_matmul=method))
            try:
                t_bf16 = _time(lambda: plain(x, row_slot, *bf16), args.repeats)
                t_fp8 = _time(lambda: quantized(x, row_slot, *fp8), args.repeats)
                want, got = plain(x, row_slot, *bf16), quantized(x, row_slot, *fp8)
                diff = float(jnp.abs(got - want).max() / jnp.maximum(jnp.abs(want).max(), 1e-30))
            except Exception as error:  # noqa: BLE001
                print(f"{method} at {rows} rows FAILED: {type(error).__name__}: {str(error)[:200]}")
                continue
            print(f"{rows:>7} {method:>11} {t_bf16 * 1e3:>9.3f} {t_fp8 * 1e3:>9.3f} {t_fp8 / t_bf16:>9.2f} "
                  f"{megabytes[0]:>11.1f} -> {megabytes[1]:>9.1f} {diff:>8.1e}", flush=True)


def _time(call, repeats):
    call().block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call().block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
