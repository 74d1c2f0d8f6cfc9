#!/usr/bin/env python
"""Bytes the EP exchange moves per rank per MoE layer: all_to_all vs ragged transport, entry vs token
dispatch, next to the real-row minimum (``jax_eplb.moe._traffic``; analytic, no devices needed).

Routings: DeepSeek-V3 decode, 256 tokens per rank, top-8, hidden 7168, bf16 activations; each
token's 8 experts drawn without replacement with the probabilities of a recorded layer's loads
(../shared/data; synthetic log-normal if absent: per-token co-occurrence is not recorded, so
this is an approximation); slots by the balanced plan, replicas taken round robin. bench_moe.py
prints the same table for its own batch, from its actual routing.

  python scripts/bench_traffic.py [--geometries 8/288,32/288] [--tokens_per_rank 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jax_eplb import build_assignment_tables, load_sglang_json, plan_placement
from jax_eplb._synthetic import expert_popularity
from jax_eplb.moe._traffic import layer_traffic
from jax_eplb.cli import HelpWithDefaults

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deepseek-v3-sglang"
MODES = [("all_to_all", "entry"), ("all_to_all", "token"), ("ragged", "entry"), ("ragged", "token")]


def traffic_table(slot_ids, slots_per_rank: int, hidden: int, value_bytes: int = 2, title: str = "") -> list[str]:
    """Prints (and returns) one row per (transport, dispatch) for ``[R, T, K]`` slot ids."""
    num_ranks, num_tokens, top_k = slot_ids.shape
    print(f"\nEP exchange per rank per MoE layer{title}: R={num_ranks} T={num_tokens} per rank, top-{top_k}, "
          f"H={hidden}, {value_bytes}-byte activations, float32 results; MiB (mean / max over ranks)")
    print(f"{'transport':>10} {'dispatch':>8} {'sent MiB':>9} {'max':>8} {'recv buffer MiB':>15} {'rows sent':>9}")
    minimum = layer_traffic(slot_ids, slots_per_rank, hidden, "ragged", "token", value_bytes)
    rows = []
    for transport, dispatch in MODES:
        traffic = layer_traffic(slot_ids, slots_per_rank, hidden, transport, dispatch, value_bytes)
        row = (f"{transport:>10} {dispatch:>8} {traffic.sent_bytes.mean() / 2**20:>9.1f} "
               f"{traffic.sent_bytes.max() / 2**20:>8.1f} {traffic.receive_buffer_bytes / 2**20:>15.1f} "
               f"{traffic.sent_rows.mean():>9.0f}")
        print(row)
        rows.append(row)
    entries = layer_traffic(slot_ids, slots_per_rank, hidden, "ragged", "entry", value_bytes).real_rows
    print(f"real rows to other ranks: {entries.mean():.0f} entries -> {minimum.real_rows.mean():.0f} token rows "
          f"({1 - minimum.real_rows.sum() / max(entries.sum(), 1):.0%} fewer with token dispatch)")
    return rows


def sampled_slot_ids(load, num_slots: int, ep_size: int, tokens_per_rank: int, top_k: int, seed: int = 0):
    """``[R, T, K]`` slot ids: tokens' experts drawn from ``load`` ``[E]``, replicas round robin."""
    rng = np.random.default_rng(seed)
    probability = load / load.sum()
    gumbel = rng.gumbel(size=(ep_size * tokens_per_rank, load.size))
    experts = np.argsort(-(np.log(probability + 1e-12) + gumbel), axis=1)[:, :top_k]  # without replacement
    tables = build_assignment_tables(plan_placement(load[None], num_slots, ep_size).slot_to_expert[0], load.size)
    replica = np.arange(experts.size).reshape(experts.shape) % tables.replica_count[0][experts]
    return tables.expert_slots[0][experts, replica].reshape(ep_size, tokens_per_rank, top_k)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--geometries", default="8/288,32/288")
    parser.add_argument("--tokens_per_rank", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "decode_in1000out1000.json")
    args = parser.parse_args()
    if args.data.exists():
        load, source = load_sglang_json(args.data).total()[10], f"{args.data.name} layer 13"
    else:
        load, source = expert_popularity(1, 256)[0] * 1e6, "synthetic log-normal"
    for geometry in args.geometries.split(","):
        ep_size, num_slots = (int(x) for x in geometry.split("/"))
        slot_ids = sampled_slot_ids(load, num_slots, ep_size, args.tokens_per_rank, args.top_k)
        traffic_table(slot_ids, num_slots // ep_size, args.hidden, title=f" (EP{ep_size}/{num_slots}, {source})")


if __name__ == "__main__":
    main()
