#!/usr/bin/env python
"""Online rebalance cost: rewriting changed slots from the host master copy vs the bandwidth
floor (one host-to-device ``device_put`` of the same bytes) and vs re-laying the whole layer;
with experts held in the compute dtype and in FP8 (e4m3 values and 128x128 float32 block scales,
as DeepSeek-V3/R1 ship them: about half the bytes of bf16), side by side.

Default: DeepSeek-V3 expert shapes (H 7168, F 2048, bf16: 88 MB per expert-slot) on the first
``--ep`` devices; CPU runs use ``--hidden 512 --ffn 256``. The host master holds ``--experts``
distinct experts (only they are moved; enough for timing without a 45 GB host copy).

  python scripts/bench_rebalance.py [--ep 1] [--slots_per_rank 36] [--moved 4 8 16 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from jax_eplb.cli import HelpWithDefaults


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--slots_per_rank", type=int, default=36)
    parser.add_argument("--experts", type=int, default=40, help="distinct experts in the host master copy")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--moved", type=int, nargs="+", default=[4, 8, 16, 32], help="slots changed per layer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sources", nargs="+", choices=("host", "device"), default=["host", "device"],
                        help="host: every changed slot from the host master; device: from a device copy where "
                             "the expert is already resident (local copy or ppermute), else the host")
    parser.add_argument("--weights", nargs="+", choices=("native", "fp8"), default=["native", "fp8"],
                        help="native: experts in the compute dtype (bf16 on GPUs, float32 on CPU); fp8: e4m3 with "
                             "block scales")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from jax_eplb.moe import BlockFp8, ExpertWeights, scale_shape, slot_weights_from_logical
    from jax_eplb.online import SlotWriter

    devices = jax.devices()[:args.ep]
    mesh = Mesh(np.array(devices), ("ep",))
    dtype = jnp.bfloat16 if devices[0].platform == "gpu" else jnp.float32
    np_dtype = np.dtype(dtype)
    num_slots, h, f = args.slots_per_rank * args.ep, args.hidden, args.ffn
    rng = np.random.default_rng(0)

    def filled(shape, dtype):  # expert e holds the value e / E (cheap to make; values do not matter for timing)
        out = np.empty((1, args.experts) + shape, dtype)
        for e in range(args.experts):
            out[0, e] = e / args.experts
        return out

    def master_of(weights: str) -> ExpertWeights:
        shapes = ((h, f), (h, f), (f, h))
        if weights == "native":
            return ExpertWeights(*(filled(shape, np_dtype) for shape in shapes))
        return ExpertWeights(*(BlockFp8(filled(shape, jnp.float8_e4m3fn),
                                        np.ones((1, args.experts) + scale_shape(shape, (128, 128)), np.float32))
                               for shape in shapes))

    writer = SlotWriter(mesh, device_copies=True)  # each row below picks its sources explicitly
    print(f"device {devices[0].device_kind} x{args.ep}, jax {jax.__version__}; {num_slots} slots")
    print(f"{'weights':>8} {'MiB/slot':>8} {'moved':>6} {'sources':>7} {'on device':>9} {'MiB':>8} {'rewrite ms':>11} "
          f"{'GB/s':>7} {'device_put ms':>14} {'GB/s':>7} {'ratio':>6} {'full relayout ms':>17}")
    start_placement = np.arange(num_slots) % args.experts
    for weights in args.weights:
        master = master_of(weights)
        slot_bytes = sum(leaf[0, 0].nbytes for leaf in jax.tree.leaves(master))
        label = np_dtype.name if weights == "native" else "fp8"
        for moved in args.moved:
            for sources in args.sources:  # the same sequence of moves for each source mode
                rng = np.random.default_rng(moved)
                current = start_placement.copy()
                experts = writer.warm_up(slot_weights_from_logical(master, current[None], mesh))  # compiled first
                times, on_device = [], []
                for rep in range(args.repeats + 1):
                    new = current.copy()
                    changed = rng.choice(num_slots, size=min(moved, num_slots), replace=False)
                    shift = 1 + rng.integers(0, args.experts - 1, changed.size)
                    new[changed] = (current[changed] + shift) % args.experts
                    experts, move = writer.move_layer(experts, master, 0, current, new,
                                                      from_devices=sources == "device")
                    current = new
                    if rep:  # the first one compiles
                        times.append(move.seconds)
                        on_device.append(move.slots_from_devices / max(move.slots_moved, 1))
                rewrite = statistics.median(times)
                payload = [np.ascontiguousarray(leaf[0, :1].repeat(move.slots_moved, axis=0))
                           for leaf in jax.tree.leaves(master)]
                put_times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    jax.block_until_ready([jax.device_put(p, devices[0]) for p in payload])
                    put_times.append(time.perf_counter() - start)
                put = statistics.median(put_times)
                full = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(slot_weights_from_logical(master, current[None], mesh))
                    full.append(time.perf_counter() - start)
                mib = move.bytes_moved / 2**20
                print(f"{label:>8} {slot_bytes / 2**20:>8.2f} {move.slots_moved:>6} {sources:>7} "
                      f"{100 * np.mean(on_device):>8.0f}% {mib:>8.1f} {1e3 * rewrite:>11.2f} "
                      f"{move.bytes_moved / rewrite / 1e9:>7.2f} {1e3 * put:>14.2f} "
                      f"{move.bytes_moved / put / 1e9:>7.2f} "
                      f"{rewrite / put:>6.2f} {1e3 * statistics.median(full):>17.2f}", flush=True)
        del master, experts
    print("rewrite = SlotWriter.move_layer: changed slots only, from the host master (host) or, where the expert "
          "is already resident, copied on device (device; 'on device' = share of slots so copied); device_put = "
          "the same bytes host-to-device in one call (host-link floor); full relayout = slot_weights_from_logical "
          "of the whole layer")


if __name__ == "__main__":
    main()
