#!/usr/bin/env python
"""Online rebalance cost: rewriting changed slots from the host master copy vs the bandwidth
floor (one host-to-device ``device_put`` of the same bytes) and vs re-laying the whole layer.

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
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jax_eplb.moe import slot_weights_from_logical
    from jax_eplb.moe import ExpertWeights
    from jax_eplb.online import SlotWriter

    devices = jax.devices()[:args.ep]
    mesh = Mesh(np.array(devices), ("ep",))
    dtype = jnp.bfloat16 if devices[0].platform == "gpu" else jnp.float32
    np_dtype = np.dtype(dtype)
    num_slots, h, f = args.slots_per_rank * args.ep, args.hidden, args.ffn
    rng = np.random.default_rng(0)

    def filled(shape):  # expert e holds the value e / E (cheap to make; values do not matter for timing)
        out = np.empty((1, args.experts) + shape, np_dtype)
        for e in range(args.experts):
            out[0, e] = e / args.experts
        return out

    master = ExpertWeights(*(filled(shape) for shape in ((h, f), (h, f), (f, h))))
    sharding = NamedSharding(mesh, P(None, "ep"))
    experts = ExpertWeights(*(jax.device_put(jnp.zeros((1, num_slots) + leaf.shape[2:], dtype), sharding)
                              for leaf in master))
    writer = SlotWriter(mesh, device_copies=True)  # each row below picks its sources explicitly
    slot_bytes = sum(leaf[0, 0].nbytes for leaf in master)
    print(f"device {devices[0].device_kind} x{args.ep}, jax {jax.__version__}; {num_slots} slots, "
          f"{slot_bytes / 2**20:.1f} MiB per slot ({np_dtype.name})")
    print(f"{'moved':>6} {'sources':>7} {'on device':>9} {'MiB':>8} {'rewrite ms':>11} {'GB/s':>7} "
          f"{'device_put ms':>14} {'GB/s':>7} {'ratio':>6} {'full relayout ms':>17}")
    start_placement = np.arange(num_slots) % args.experts
    for moved in args.moved:
        for sources in args.sources:  # the same sequence of moves for each source mode
            rng = np.random.default_rng(moved)
            current = start_placement.copy()
            experts = writer.warm_up(slot_weights_from_logical(master, current[None], mesh))  # compiled before timing
            times, on_device = [], []
            for rep in range(args.repeats + 1):
                new = current.copy()
                changed = rng.choice(num_slots, size=min(moved, num_slots), replace=False)
                new[changed] = (current[changed] + 1 + rng.integers(0, args.experts - 1, changed.size)) % args.experts
                experts, move = writer.move_layer(experts, master, 0, current, new,
                                                  from_devices=sources == "device")
                current = new
                if rep:  # the first one compiles
                    times.append(move.seconds)
                    on_device.append(move.slots_from_devices / max(move.slots_moved, 1))
            rewrite = statistics.median(times)
            payload = [np.ascontiguousarray(leaf[0, :1].repeat(move.slots_moved, axis=0)) for leaf in master]
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
            print(f"{move.slots_moved:>6} {sources:>7} {100 * np.mean(on_device):>8.0f}% {mib:>8.1f} "
                  f"{1e3 * rewrite:>11.2f} {move.bytes_moved / rewrite / 1e9:>7.2f} {1e3 * put:>14.2f} "
                  f"{move.bytes_moved / put / 1e9:>7.2f} {rewrite / put:>6.2f} {1e3 * statistics.median(full):>17.2f}",
                  flush=True)
    print("rewrite = SlotWriter.move_layer: changed slots only, from the host master (host) or, where the expert "
          "is already resident, copied on device (device; 'on device' = share of slots so copied); device_put = "
          "the same bytes host-to-device in one call (host-link floor); full relayout = slot_weights_from_logical "
          "of the whole layer")


if __name__ == "__main__":
    main()
