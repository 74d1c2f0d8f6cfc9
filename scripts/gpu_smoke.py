#!/usr/bin/env python
"""GPU smoke stage: every GPU kernel and transport runs once against its XLA reference.

One line per check as it finishes - ``PASS`` / ``FAIL`` / ``ERROR``, the largest difference from the
reference, the seconds (compile included), the first line of any error - and the same as JSON lines
in ``--json``. Then the lines ``auto`` prints for the EP block at DeepSeek-V3's shapes. Exit status 1
if anything failed. Checks (small shapes: about a minute in all, mostly compiles):

- the EP MoE layer with the ragged_all_to_all transport (and all_to_all) against a dense single-device
  MoE in float32 at the highest matmul precision, on every local GPU;
- the grouped SwiGLU (ragged_dot, tokamax, pallas) and the tile-grouped matmul (Triton) at DeepSeek-V3's
  hidden / FFN sizes in bf16, against a float32 reference at the highest matmul precision;
- routing histogram: Mosaic GPU (scan, per_bin; Lane and Warpgroup lowering), Triton (outer, compare);
- expert -> slot routing: Mosaic GPU, Triton (slot ids and slot histogram) - last, as a kernel that
  hangs (a barrier never reached) stops the stage at its limit.

  python scripts/gpu_smoke.py --json out/smoke.jsonl
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_eplb.cli import HelpWithDefaults

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)


class Smoke:
    def __init__(self, json_path: str | None):
        self.json_path, self.failed = json_path, 0

    def check(self, name: str, run, tolerance: float = 0.0) -> None:
        """``run()`` -> (got, want) pytrees; PASS when every leaf's largest difference, relative to the
        reference's largest magnitude, is <= ``tolerance`` (0: exactly equal)."""
        start = time.perf_counter()
        record = {"check": name}
        try:
            got, want = run()
            diff = max(_relative_difference(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
            record.update(status="PASS" if diff <= tolerance else "FAIL", max_difference=diff, tolerance=tolerance)
        except Exception as error:  # noqa: BLE001 - reported; the other checks still run
            record.update(status="ERROR", error=f"{type(error).__name__}: "
                                                f"{str(error).splitlines()[0][:300] if str(error) else ''}")
        record["seconds"] = round(time.perf_counter() - start, 2)
        self.failed += record["status"] != "PASS"
        detail = (f"max difference {record['max_difference']:.2e} (tolerance {tolerance:g})"
                  if "max_difference" in record else record["error"])
        print(f"{record['status']:5} {name}: {detail} [{record['seconds']} s]", flush=True)
        if self.json_path:
            with open(self.json_path, "a") as out:
                out.write(json.dumps(record) + "\n")


def _relative_difference(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
    return float(np.max(np.abs(got - want), initial=0.0)) / scale


def routing_checks(smoke: Smoke) -> None:
    from jax_eplb import build_assignment_tables
    from jax_eplb_kernels import (HistogramBlockSizes, MosaicHistogramBlockSizes, route_to_slots, routing_histogram,
                                  triton_in_auto)

    rng = np.random.default_rng(0)
    for num_ids, num_bins in ((65_536, 256), (1_000_003, 288)):
        ids = jnp.asarray(rng.integers(-1, num_bins + 2, size=num_ids), jnp.int32)
        want = routing_histogram(ids, num_bins, implementation="xla")
        for method in ("scan", "per_bin"):
            for semantics in ("lane", "warpgroup"):
                sizes = MosaicHistogramBlockSizes(method=method, semantics=semantics)
                smoke.check(f"histogram mosaic_gpu {method} {semantics} ({num_ids} ids, {num_bins} bins)",
                            lambda: (routing_histogram(ids, num_bins, implementation="mosaic_gpu",
                                                       mosaic_block_sizes=sizes), want))
        for method in ("outer", "compare"):
            smoke.check(f"histogram pallas (Triton{'' if triton_in_auto() else ', explicit'}) {method} "
                        f"({num_ids} ids, {num_bins} bins)",
                        lambda: (routing_histogram(ids, num_bins, implementation="pallas",
                                                   block_sizes=HistogramBlockSizes(method=method)), want))
    num_experts, extra = 256, 32
    slot_to_expert = rng.permutation(np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, extra)]))
    tables = build_assignment_tables(slot_to_expert, num_experts)
    expert_ids = jnp.asarray(rng.integers(-1, num_experts + 1, size=(4096, 8)), jnp.int32)
    args = (expert_ids, jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]), num_experts + extra)
    want = route_to_slots(*args, rank_offset=3, with_histogram=True, implementation="xla")
    for impl in ("mosaic_gpu", "pallas"):
        smoke.check(f"expert-to-slot routing {impl} (4096x8 ids, 256 experts, 288 slots)",
                    lambda: (tuple(route_to_slots(*args, rank_offset=3, with_histogram=True, implementation=impl)),
                             tuple(want)))


def matmul_checks(smoke: Smoke, rows: int, local_slots: int) -> None:
    from jax_eplb.moe import expert_compute, tokamax_unavailable
    from jax_eplb_kernels import tile_grouped_matmul

    hidden, ffn = 7168, 2048  # DeepSeek-V3's expert
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (rows, hidden), jnp.bfloat16)
    row_slot = jnp.sort(jax.random.randint(keys[1], (rows,), 0, local_slots + 1))  # m: empty rows
    weights = [(jax.random.normal(k, (local_slots,) + s) / np.sqrt(s[0])).astype(jnp.bfloat16)
               for k, s in zip(keys[2:], ((hidden, ffn), (hidden, ffn), (ffn, hidden)))]
    with jax.default_matmul_precision("highest"):
        want = jax.jit(functools.partial(expert_compute, grouped_matmul="ragged_dot"))(
            x.astype(jnp.float32), row_slot, *(w.astype(jnp.float32) for w in weights))
    methods = ["ragged_dot", "pallas"] + (["tokamax"] if tokamax_unavailable() is None else [])
    for method in methods:
        compute = jax.jit(functools.partial(expert_compute, grouped_matmul=method))
        smoke.check(f"grouped SwiGLU {method} ({rows} rows, {local_slots} slots, H {hidden}, F {ffn}, bf16)",
                    lambda: (compute(x, row_slot, *weights), want), tolerance=2e-2)
    if tokamax_unavailable() is not None:
        print(f"skip  grouped SwiGLU tokamax: {tokamax_unavailable()}", flush=True)
    tile = 64
    tiles = rows // tile
    tile_group = jnp.sort(jax.random.randint(keys[1], (tiles,), 0, local_slots))
    x_tiles = x[: tiles * tile]
    with jax.default_matmul_precision("highest"):
        want_tiles = tile_grouped_matmul(x_tiles.astype(jnp.float32), weights[0].astype(jnp.float32), tile_group,
                                         tiles - 1, implementation="xla")
    smoke.check(f"tile-grouped matmul pallas (Triton) ({tiles} tiles of {tile}, {local_slots} groups, bf16)",
                lambda: (tile_grouped_matmul(x_tiles, weights[0], tile_group, tiles - 1, implementation="pallas"),
                         want_tiles), tolerance=2e-2)


def transport_checks(smoke: Smoke) -> None:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jax_eplb import build_assignment_tables, default_slot_to_expert
    from jax_eplb.moe import (ExpertWeights, MoEConfig, MoEOptions, RouterWeights, ep_moe_forward,
                              slot_weights_from_logical)

    devices = jax.devices()
    ranks = len(devices)
    mesh = Mesh(np.array(devices), ("ep",))
    experts, hidden, ffn = 16, 256, 128
    config = MoEConfig(hidden_size=hidden, expert_ffn_size=ffn, num_experts=experts, top_k=4, router="deepseek")
    keys = jax.random.split(jax.random.key(1), 5)
    logical = ExpertWeights(*(jax.random.normal(k, s) * 0.1 for k, s in
                              zip(keys[:3], ((experts, hidden, ffn), (experts, hidden, ffn), (experts, ffn, hidden)))))
    router = RouterWeights(jax.random.normal(keys[3], (hidden, experts)) / 16, jnp.zeros((experts,)))
    x = jax.random.normal(keys[4], (64 * ranks, hidden))
    slot_to_expert = default_slot_to_expert(experts, -(-(experts + 4) // ranks) * ranks, ranks)  # replicas too
    tables = build_assignment_tables(slot_to_expert, experts)
    slots = slot_weights_from_logical(logical, slot_to_expert, mesh)
    with jax.default_matmul_precision("highest"):
        want = _dense_moe(config, router, logical, x)
    for transport in ("ragged", "all_to_all"):
        for policy in ("round_robin", "load_aware"):
            options = MoEOptions(replica_policy=policy, transport=transport, grouped_matmul="ragged_dot")

            def run():
                with jax.default_matmul_precision("highest"):
                    out = jax.jit(functools.partial(ep_moe_forward, config, mesh, options=options))(
                        router, slots, jax.device_put(x, NamedSharding(mesh, P("ep"))),
                        jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0])).out
                return out, want

            smoke.check(f"EP MoE layer {transport} {policy} (ep {ranks}, float32) vs dense MoE", run, tolerance=1e-5)


def _dense_moe(config, router, logical, x):
    """Every token through its k experts on one device (the float32 oracle)."""
    from jax_eplb.moe import route, swiglu

    routing = route(config, router, x)
    out = jnp.zeros(x.shape, jnp.float32)
    for k in range(config.top_k):
        expert = routing.expert_ids[:, k]
        y = jax.vmap(lambda row, e: swiglu(row[None], logical.gate[e], logical.up[e], logical.down[e])[0])(x, expert)
        out = out + routing.weights[:, k, None] * y
    return out


def auto_lines() -> None:
    """What ``auto`` chooses in the EP block at DeepSeek-V3's decode shapes on this GPU (lines on stderr)."""
    from jax_eplb.moe import ExpertShapes, MoEOptions, resolve_grouped_matmul, resolve_transport
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()), ("ep",))
    for tokens, slots in ((256, 36), (2048, 288 // len(jax.devices()))):
        shapes = ExpertShapes(rows=tokens * 8, hidden=7168, ffn=2048, local_slots=slots, dtype="bfloat16")
        print(f"auto at {tokens} tokens x top-8 per rank, {slots} local slots: transport "
              f"{resolve_transport(MoEOptions(), mesh, shapes, 8).transport}, grouped matmul "
              f"{resolve_grouped_matmul('auto', 'gpu', shapes, jax.devices()[0])}", flush=True)


def fp8_checks(smoke: Smoke, rows: int, local_slots: int) -> None:
    """FP8 weights on the device: block dequantization (partial edge blocks) equals NumPy's bit for bit,
    and the grouped SwiGLU over FP8 weights dequantized in the jitted call equals it over the same
    numbers held in bf16."""
    from jax_eplb.moe import BlockFp8, dequantize, expert_compute, scale_shape
    from jax_eplb.moe._fp8 import dequantize_numpy

    keys = jax.random.split(jax.random.key(3), 4)
    shape = (2, 576, 7168 + 64)  # DeepSeek-V3's kv_a rows, a partial last column block
    weight = BlockFp8(jax.random.normal(keys[0], shape).astype(jnp.float8_e4m3fn),
                      jax.random.uniform(keys[1], scale_shape(shape, (128, 128)), jnp.float32, 1e-3, 1.0))
    host = BlockFp8(np.asarray(weight.values), np.asarray(weight.scale_inv))
    smoke.check(f"FP8 block dequantization {list(shape)} (128x128, partial edges) vs NumPy",
                lambda: (jax.jit(dequantize, static_argnums=1)(weight, jnp.float32), dequantize_numpy(host)))
    hidden, ffn = 7168, 2048
    x = jax.random.normal(keys[2], (rows, hidden), jnp.bfloat16)
    row_slot = jnp.sort(jax.random.randint(keys[3], (rows,), 0, local_slots + 1))
    fp8 = [BlockFp8(jax.random.normal(k, (local_slots,) + s).astype(jnp.float8_e4m3fn),
                    jnp.full(scale_shape((local_slots,) + s, (128, 128)), 1 / np.sqrt(s[0]), jnp.float32))
           for k, s in zip(jax.random.split(keys[3], 3), ((hidden, ffn), (hidden, ffn), (ffn, hidden)))]
    bf16 = [dequantize(w, jnp.bfloat16) for w in fp8]
    quantized = jax.jit(lambda x, s, a, b, c: expert_compute(x, s, *(dequantize(w, x.dtype) for w in (a, b, c))))
    smoke.check(f"grouped SwiGLU ragged_dot over FP8 weights dequantized in the step ({rows} rows, {local_slots} "
                f"slots) vs bf16 weights", lambda: (quantized(x, row_slot, *fp8), jax.jit(expert_compute)(
                    x, row_slot, *bf16)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--json", default=None, help="append one JSON line per check here")
    parser.add_argument("--rows", type=int, default=2048, help="grouped matmul rows")
    parser.add_argument("--local_slots", type=int, default=8, help="grouped matmul groups")
    parser.add_argument("--allow_cpu", action="store_true", help="run on a non-GPU backend too (harness check)")
    args = parser.parse_args()
    if jax.default_backend() != "gpu" and not args.allow_cpu:
        print(f"error: JAX's backend is {jax.default_backend()!r}, not 'gpu': nothing to check", file=sys.stderr)
        return 2
    smoke = Smoke(args.json)
    transport_checks(smoke)  # XLA's own paths first; the Pallas kernels (a hang there stops the rest) last
    matmul_checks(smoke, args.rows, args.local_slots)
    fp8_checks(smoke, args.rows, args.local_slots)
    routing_checks(smoke)
    try:
        auto_lines()
    except Exception as error:  # noqa: BLE001 - reported
        smoke.failed += 1
        print(f"ERROR auto at DeepSeek-V3 shapes: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
    print(f"smoke: {smoke.failed} not passed", flush=True)
    return 1 if smoke.failed else 0


if __name__ == "__main__":
    sys.exit(main())
