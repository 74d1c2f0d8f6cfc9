#!/usr/bin/env python
"""Loading a Hugging Face checkpoint into an EP-sharded model under an EPLB plan: seconds, GB/s and
peak RSS, ours (memory-mapped tensors, each device's slots read per shard, a replicated expert read
once) next to a whole-checkpoint load (every shard read into host memory first, then placed).

A random checkpoint of DeepSeek-V3 shapes (``create-checkpoint --hf_config deepseek_v3``, FP8,
fewer layers / experts / vocabulary so it fits a small machine) is written once, then each loader
runs in a fresh process (so peak RSS is its own).

  python scripts/bench_load.py [--num_layers 1] [--num_experts 8] [--vocab_size 8192] [--ep 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from jax_eplb.cli import HelpWithDefaults


class _MemorySampler:
    """Peak anonymous and file-backed RSS (from /proc/self/status, every 10 ms): memory-mapped
    checkpoint pages count as file-backed (the kernel can drop them), copies as anonymous."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> dict:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in self.peak:
                values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self):
        while not self._stop.wait(0.01):
            for key, value in self.sample().items():
                self.peak[key] = max(self.peak[key], value)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(args) -> dict:
    """In a fresh process: build the model from the checkpoint, report time and memory."""
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.ep}")
    import jax
    import numpy as np

    from jax_eplb import build_assignment_tables, plan_placement
    from jax_eplb._assignment import widest_replicas
    from jax_eplb.hf import HuggingFaceCheckpoint
    from jax_eplb.model import build_model
    from jax_eplb.sharding import ep_mesh

    mesh = ep_mesh(args.ep, None if jax.devices()[0].platform != "cpu" else args.ep)
    jax.block_until_ready(jax.device_put(np.zeros(8), mesh.devices.flat[0]))  # backends up before measuring
    sampler = _MemorySampler()
    before = sampler.sample()
    start = time.perf_counter()
    source = HuggingFaceCheckpoint(args.measure, max_seq_len=64)
    config = source.config
    if args.loader == "whole":
        source.tensors = _in_memory(source.tensors)
    source.check()
    loads = np.random.default_rng(0).lognormal(0, 1.5, (config.num_moe_layers, config.num_experts))
    slots = args.slots_per_rank * args.ep
    plan = plan_placement(loads, slots, args.ep).slot_to_expert
    tables = build_assignment_tables(plan, config.num_experts, widest_replicas(config.num_experts, slots))
    model = build_model(config, mesh, tables, source)
    jax.block_until_ready(jax.tree.leaves(model))
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    # What the devices hold: each device's shards (a replicated tensor once per device).
    per_device = sum(shard.data.nbytes for leaf in jax.tree.leaves(model) if hasattr(leaf, "addressable_shards")
                     for shard in leaf.addressable_shards)
    return {"seconds": seconds, "peak_anon": peak["RssAnon"] - before["RssAnon"],
            "peak_file": peak["RssFile"] - before["RssFile"], "device_bytes": per_device,
            "platform": mesh.devices.flat[0].platform}


def _in_memory(tensors):
    """The baseline: every shard read into host memory up front, tensors served from there."""
    from safetensors.numpy import load_file

    from jax_eplb.hf import SafetensorsCheckpoint

    class InMemory(SafetensorsCheckpoint):
        def __init__(self):
            self.__dict__.update(tensors.__dict__)
            self.loaded = {}
            for shard in sorted(set(tensors.weight_map.values())):
                self.loaded.update(load_file(str(tensors.directory / shard)))

        def raw(self, name):
            return self.loaded[name]

    return InMemory()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--hf_config", default="deepseek_v3")
    parser.add_argument("--num_layers", type=int, default=1)
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--slots_per_rank", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse (or write here) the checkpoint")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loader", choices=("ours", "whole"), default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    from jax_eplb.hf import create_hf_checkpoint

    checkpoint = args.checkpoint or Path(tempfile.mkdtemp(prefix="bench_load_")) / "checkpoint"
    if not checkpoint.exists():
        create_hf_checkpoint(args.hf_config, checkpoint, num_layers=args.num_layers, num_experts=args.num_experts,
                             vocab_size=args.vocab_size, fp8=True, dtype="bfloat16")
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    rows = {}
    for loader in ("ours", "whole"):
        proc = subprocess.run([sys.executable, __file__, "--measure", str(checkpoint), "--loader", loader,
                               "--ep", str(args.ep), "--slots_per_rank", str(args.slots_per_rank)],
                              capture_output=True, text=True, check=True)
        rows[loader] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, whole = rows["ours"], rows["whole"]
    on_cpu = ours["platform"] == "cpu"
    print(f"checkpoint {size / 2**20:.0f} MiB (FP8, {args.num_layers} layer(s), {args.num_experts} experts); ep "
          f"{args.ep}, {args.slots_per_rank * args.ep} slots; devices hold {ours['device_bytes'] / 2**20:.0f} MiB "
          f"(bf16, {ours['platform']}{': device memory is host memory here' if on_cpu else ''})")
    print(f"{'loader':<34} {'seconds':>8} {'GB/s':>7} {'peak anon MiB':>14} {'peak file MiB':>14}")
    for loader, label in (("ours", "ours (mmap, per shard)"), ("whole", "whole checkpoint into host first")):
        r = rows[loader]
        print(f"{label:<34} {r['seconds']:>8.2f} {size / r['seconds'] / 1e9:>7.2f} {r['peak_anon'] / 2**20:>14.0f} "
              f"{r['peak_file'] / 2**20:>14.0f}")
    print(f"whole / ours: time {whole['seconds'] / ours['seconds']:.2f}x, peak anonymous memory "
          f"{whole['peak_anon'] / max(ours['peak_anon'], 1):.2f}x (anonymous = copies; file = mapped checkpoint "
          f"pages the kernel can drop)")


if __name__ == "__main__":
    main()
