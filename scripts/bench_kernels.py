#!/usr/bin/env python
"""Routing-histogram speed in-device: Pallas on Mosaic GPU and on Triton (two methods) vs jnp.bincount vs
segment_sum vs one-hot sum; then expert -> slot routing: XLA vs Pallas on Triton and on Mosaic GPU.

Each figure is the time of one histogram measured inside one jitted fori_loop of ``--reps``
dependent repetitions (host dispatch excluded); an empty-body loop is printed as the floor. Effective
GB/s = bytes of ids read / time, next to a measured copy bandwidth.

  python scripts/bench_kernels.py            # GPU sizes: 65,536 and 8,388,608 ids, 256/288 bins
  python scripts/bench_kernels.py --quick    # tiny CPU run that only checks the harness
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_eplb_kernels import HistogramBlockSizes, MosaicHistogramBlockSizes, histogram_reference, routing_histogram
from jax_eplb.cli import HelpWithDefaults


def candidates(num_bins, on_gpu):
    c = {
        "bincount": lambda ids: jnp.bincount(ids.reshape(-1), length=num_bins).astype(jnp.int32),
        "segment_sum": lambda ids: jax.ops.segment_sum(jnp.ones(ids.size, jnp.int32), ids.reshape(-1), num_bins),
        "xla_scatter": lambda ids: histogram_reference(ids, num_bins),
    }
    c["onehot_sum"] = lambda ids: (ids.reshape(-1, 1) == jnp.arange(num_bins)).sum(0, dtype=jnp.int32)
    impl = "pallas" if on_gpu else "pallas_interpret"
    variants = {  # Pallas: one-hot outer product on the matrix units / compare with all bins
        "pallas_outer": HistogramBlockSizes(method="outer"),
        "pallas_compare": HistogramBlockSizes(method="compare"),
        # few long programs (one at 65,536 ids): no partial-sum pass, less parallelism
        "pallas_outer_few": HistogramBlockSizes(method="outer", inner_steps=1024, min_programs=1),
    }
    for name, sizes in variants.items():
        c[name] = functools.partial(routing_histogram, num_bins=num_bins, implementation=impl, block_sizes=sizes)
    from jax_eplb_kernels._mosaic_gpu import interpret_available

    if on_gpu or interpret_available():  # Mosaic GPU: compiled on Hopper, else its interpreter (JAX >= 0.11)
        for method, block in (("scan", 2048), ("scan", 8192), ("per_bin", 2048)):
            c[f"mosaic_{method}_{block}"] = functools.partial(
                routing_histogram, num_bins=num_bins, implementation="mosaic_gpu" if on_gpu else "mosaic_gpu_interpret",
                mosaic_block_sizes=MosaicHistogramBlockSizes(block=block, method=method))
    return c


def in_device_seconds(fn, ids, reps):
    """Time per call of ``fn`` inside one jitted loop; each rep depends on the previous one."""
    @jax.jit
    def loop(ids):
        def body(_, carry):
            acc, x = carry
            h = fn(x)
            # Make the next input depend on this result (counts are >= 0, so the ids do not
            # change), so XLA cannot hoist the histogram out of the loop as loop-invariant.
            return acc + h[0], x + jnp.minimum(h[0], 0)
        return jax.lax.fori_loop(0, reps, body, (jnp.int32(0), ids))[0]
    loop(ids).block_until_ready()
    start = time.perf_counter()
    loop(ids).block_until_ready()
    return (time.perf_counter() - start) / reps


def copy_bandwidth(nbytes, reps):
    """Read+write bytes per second of an elementwise pass over ``nbytes`` carried through a loop."""
    @jax.jit
    def loop(x):
        return jax.lax.fori_loop(0, reps, lambda _, v: v * 1.0001, x)
    x = jnp.ones((nbytes // 4,), jnp.float32)
    loop(x).block_until_ready()
    start = time.perf_counter()
    loop(x).block_until_ready()
    return 2 * nbytes * reps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    sizes = [4096] if args.quick else [65_536, 8_388_608]
    bins_list = [256] if args.quick else [256, 288]
    reps = args.reps or (3 if args.quick else 200)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, reps {reps}")
    bw = copy_bandwidth(1 << (24 if args.quick else 30), reps)
    print(f"measured copy bandwidth: {bw / 1e9:.1f} GB/s (read+write)")
    floor = in_device_seconds(lambda x: x[:1, 0], jnp.zeros((8, 8), jnp.int32), reps)
    print(f"loop floor (trivial body): {floor * 1e6:.1f} us")
    rows = []
    print(f"{'ids':>10} {'bins':>5} {'impl':>17} {'us/call':>10} {'GB/s':>8} {'% copy bw':>9} {'vs bincount':>11}")
    for n in sizes:
        for num_bins in bins_list:
            ids = jnp.asarray(np.random.default_rng(0).integers(0, num_bins, size=(n // 8, 8)), jnp.int32)
            expected = np.bincount(np.asarray(ids).reshape(-1), minlength=num_bins)
            base = None
            for name, fn in candidates(num_bins, on_gpu).items():
                if name == "onehot_sum" and n * num_bins > 2**31 // 4:
                    continue
                try:  # one broken candidate (e.g. a kernel that fails to compile) must not hide the others
                    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(ids)), expected)
                    t = in_device_seconds(fn, ids, reps)
                except Exception as error:  # noqa: BLE001 - reported in the table, run goes on
                    print(f"{n:>10} {num_bins:>5} {name:>17} FAILED: {type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200] if str(error) else ''}", flush=True)
                    rows.append(dict(ids=n, bins=num_bins, impl=name, error=f"{type(error).__name__}: {error}"[:2000]))
                    continue
                base = t if name == "bincount" else base
                gbs = ids.nbytes / t / 1e9
                row = dict(ids=n, bins=num_bins, impl=name, us=t * 1e6, gbs=gbs, pct_bw=100 * ids.nbytes / t / bw,
                           speedup_vs_bincount=base / t)
                rows.append(row)
                print(f"{n:>10} {num_bins:>5} {name:>17} {t * 1e6:>10.1f} {gbs:>8.1f} {row['pct_bw']:>8.1f}% "
                      f"{row['speedup_vs_bincount']:>10.2f}x", flush=True)
    routing_rows = routing_table([4096] if args.quick else [65_536, 1_048_576], reps, on_gpu)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "copy_bw": bw,
                       "floor_us": floor * 1e6, "rows": rows, "routing_rows": routing_rows}, f, indent=1)


def routing_table(sizes, reps, on_gpu, num_experts=256, num_slots=288):
    """Expert -> slot routing (TensorRT-LLM's round-robin rule) with the fused slot histogram:
    the Pallas kernel vs the XLA reference (a stable argsort per block), in-device."""
    from jax_eplb_kernels import route_to_slots

    rng = np.random.default_rng(1)
    slot_expert = np.concatenate([np.arange(num_experts), rng.integers(0, 16, num_slots - num_experts)])
    count = np.bincount(slot_expert, minlength=num_experts)
    table = np.full((num_experts, int(count.max())), -1, np.int32)
    for e in range(num_experts):
        table[e, : count[e]] = np.flatnonzero(slot_expert == e)
    count, table = jnp.asarray(count, jnp.int32), jnp.asarray(table)
    from jax_eplb_kernels._mosaic_gpu import interpret_available

    impls = ("xla", "pallas" if on_gpu else "pallas_interpret")
    if on_gpu or interpret_available():
        impls += ("mosaic_gpu" if on_gpu else "mosaic_gpu_interpret",)
    print(f"\nexpert -> slot routing + slot histogram, E={num_experts} S={num_slots}")
    print(f"{'entries':>10} {'impl':>16} {'us/call':>10} {'vs xla':>7}")
    rows = []
    for n in sizes:
        ids = jnp.asarray(rng.integers(0, num_experts, size=(n // 8, 8)), jnp.int32)
        reference = route_to_slots(ids, count, table, num_slots, rank_offset=1, with_histogram=True,
                                   implementation="xla")
        base = None
        for impl in impls:
            def fn(x, impl=impl):
                r = route_to_slots(x, count, table, num_slots, rank_offset=1, with_histogram=True,
                                   implementation=impl)
                return r.slot_counts + r.slot_ids[0, 0]  # both outputs used
            try:
                got, want = route_to_slots(ids, count, table, num_slots, rank_offset=1, with_histogram=True,
                                           implementation=impl), reference
                assert np.array_equal(got.slot_ids, want.slot_ids) and np.array_equal(got.slot_counts,
                                                                                       want.slot_counts), "mismatch"
                t = in_device_seconds(fn, ids, reps)
            except Exception as error:  # noqa: BLE001 - reported, the table goes on
                print(f"{n:>10} {impl:>16} FAILED: {type(error).__name__}: {str(error)[:200]}")
                continue
            base = t if impl == "xla" else base
            rows.append(dict(entries=n, impl=impl, us=t * 1e6))
            print(f"{n:>10} {impl:>16} {t * 1e6:>10.1f} {base / t:>6.2f}x", flush=True)
    return rows


if __name__ == "__main__":
    main()
