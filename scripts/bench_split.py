#!/usr/bin/env python
"""The load-aware split on the critical path: the vectorised passes (``moe.replica_quotas``) vs the
sequential water-filling it replaced (one replicated expert after another, two sweeps: kept here
as the baseline, without its final rounding, so slightly favoured), in-graph time per split
(64 splits in one jitted ``lax.map``, so call overhead is amortised; one device), with the
max/mean - 1 of the rank loads each gives on a batch drawn from real DeepSeek-V3 loads and the LP
optimum of the split for that plan.

bench_moe.py prints this table next to its whole MoE layer step; run alone:

  python scripts/bench_split.py [--geometries 8/288,36/288,64/320] [--tokens_per_rank 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_eplb import build_assignment_tables, load_sglang_json, plan_placement
from jax_eplb._synthetic import expert_popularity
from jax_eplb.moe import replica_quotas
from jax_eplb.cli import HelpWithDefaults

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deepseek-v3-sglang"
CALLS = 64  # splits per timed program


def sequential_quotas(expert_counts, replica_count, expert_slots, slots_per_rank, num_ranks, sweeps=2):
    """The baseline: each replicated expert in turn re-pours its entries onto its replicas' ranks
    lowest-first (``fori_loop`` over up to S - E experts, ``sweeps`` times); fractional shares."""
    num_experts, max_replicas = expert_slots.shape
    counts = expert_counts.astype(jnp.float32)
    valid = expert_slots >= 0
    replica_rank = jnp.where(valid, expert_slots // slots_per_rank, 0)
    share = jnp.where(valid, counts[:, None] / jnp.maximum(replica_count, 1)[:, None], 0.0)
    rank_load = jnp.zeros((num_ranks,), jnp.float32).at[replica_rank.reshape(-1)].add(share.reshape(-1))

    def pour(e, carry):
        share, rank_load = carry
        rank_load = rank_load.at[replica_rank[e]].add(-share[e])
        base = jnp.where(valid[e], rank_load[replica_rank[e]], jnp.inf)
        order = jnp.sort(base)
        finite = jnp.isfinite(order)
        level = (counts[e] + jnp.cumsum(jnp.where(finite, order, 0.0))) / jnp.arange(1, max_replicas + 1)
        level = jnp.min(jnp.where(finite & (level >= order), level, jnp.inf))
        new = jnp.where(valid[e], jnp.maximum(level - base, 0.0), 0.0)
        return share.at[e].set(new), rank_load.at[replica_rank[e]].add(new)

    candidates = min(num_experts, max(slots_per_rank * num_ranks - num_experts, 0))
    replicated = jnp.argsort(replica_count <= 1, stable=True)[:candidates]
    sweep = lambda _, carry: jax.lax.fori_loop(0, candidates, lambda i, c: pour(replicated[i], c), carry)
    return jax.lax.fori_loop(0, sweeps, sweep, (share, rank_load))[0]


def split_table(load, geometries, tokens_per_rank: int, top_k: int = 8, repeats: int = 20) -> list[str]:
    """Prints (and returns) one row per geometry, plan and method: us per split, imbalance, LP optimum."""
    print(f"\nload-aware split, in-graph time per split ({jax.devices()[0].device_kind}), one batch of "
          f"{tokens_per_rank} tokens x top-{top_k} per rank drawn from the layer's loads; imbalance = max/mean - 1 "
          f"of the rank loads (integer quotas for ours)")
    print(f"{'geometry':>9} {'plan':>8} {'method':>22} {'us/split':>8} {'imbalance':>9} {'LP optimum':>10}")
    rows = []
    rng = np.random.default_rng(0)
    for ep_size, num_slots in geometries:
        if num_slots < load.size or num_slots % ep_size:
            continue
        counts = rng.multinomial(ep_size * tokens_per_rank * top_k, load / load.sum())
        for plan_name in ("balanced", "flow"):
            plan = plan_placement(load[None], num_slots, ep_size, plan_name,
                                  entries_per_iteration=ep_size * tokens_per_rank * top_k).slot_to_expert[0]
            for name, seconds, imbalance, optimum in _split_rows(plan, counts, num_slots, ep_size, repeats):
                row = (f"{ep_size:>4}/{num_slots:<4} {plan_name:>8} {name:>22} {1e6 * seconds:>8.0f} "
                       f"{imbalance:>9.4f} {optimum:>10.4f}")
                print(row, flush=True)
                rows.append(row)
    return rows


def _split_rows(plan, counts, num_slots: int, ep_size: int, repeats: int):
    """(method, seconds per split, imbalance, LP optimum) for each method on one plan and batch."""
    from bench_iterations import lp_optimum

    tables = build_assignment_tables(plan, counts.size)
    args = (jnp.asarray(counts), jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]),
            num_slots // ep_size, ep_size)
    optimum = lp_optimum(plan, counts.astype(float), ep_size)
    methods = {"sequential, 2 sweeps": lambda *a: sequential_quotas(*a)}
    methods.update({f"vectorised, {p} passes": (lambda p: lambda *a: replica_quotas(*a, passes=p))(p)
                    for p in (8, 16)})
    slots = tables.expert_slots[0]
    for name, method in methods.items():
        shares = np.asarray(jax.jit(method, static_argnums=(3, 4))(*args))
        # In-graph cost: CALLS splits in one jitted lax.map, so dispatch overhead is amortised.
        many = jax.jit(lambda c, rc, es, method=method: jax.lax.map(
            lambda one: method(one, rc, es, *args[3:]), jnp.broadcast_to(c, (CALLS,) + c.shape)))
        seconds = _time(lambda: many(*args[:3]), repeats) / CALLS
        rank_load = np.zeros(ep_size)
        np.add.at(rank_load, slots[slots >= 0] // (num_slots // ep_size), shares[slots >= 0])
        yield name, seconds, rank_load.max() / rank_load.mean() - 1, optimum


def _time(call, repeats):
    jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def real_layer_load(data: Path, num_experts: int = 256) -> np.ndarray:
    """``[E]`` one recorded MoE layer's loads (layer 13 of ``data``), synthetic if absent."""
    if data.exists():
        return load_sglang_json(data).total()[10, :num_experts]
    return expert_popularity(1, num_experts)[0] * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--geometries", default="8/288,36/288,64/320")
    parser.add_argument("--tokens_per_rank", type=int, default=256)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "decode_in1000out1000.json")
    args = parser.parse_args()
    split_table(real_layer_load(args.data), [tuple(int(x) for x in g.split("/")) for g in args.geometries.split(",")],
                args.tokens_per_rank)


if __name__ == "__main__":
    main()
