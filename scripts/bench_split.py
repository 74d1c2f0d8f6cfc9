#!/usr/bin/env python
"""The load-aware split on the critical path: the runtime's accelerated passes (``moe.replica_quotas``)
vs the 16 damped passes it replaced (kept here as the baseline, without the final rounding, so
slightly favoured), in-graph time per split (64 splits in one jitted ``lax.map``, so call overhead is
amortised; one device), with the mean max/mean - 1 of the rank loads each gives on batches drawn
from real DeepSeek-V3 loads, the LP optimum of the split for that plan and batch, and the ratio of
times (ours / baseline).

bench_moe.py prints this table next to its whole MoE layer step; run alone:

  python scripts/bench_split.py [--geometries 8/288,32/288,36/288,64/320] [--tokens_per_rank 256]
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
from jax_eplb._assignment import widest_replicas
from jax_eplb._synthetic import expert_popularity
from jax_eplb.moe import balanced_shares, replica_quotas
from jax_eplb.planning import SPLIT_PASSES
from jax_eplb.cli import HelpWithDefaults

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deepseek-v3-sglang"
CALLS = 64  # splits per timed program
SHARED_ROWS = 256  # decode: one shared-expert row per token


def damped_shares(expert_counts, replica_count, expert_slots, slots_per_rank, num_ranks, passes: int = 16):
    """The baseline (the runtime's split until 2026-12-04): ``passes`` damped Jacobi water-filling
    passes from the even split, no momentum, the last pass returned; fractional shares."""
    num_experts, max_replicas = expert_slots.shape
    counts = expert_counts.astype(jnp.float32)
    valid = expert_slots >= 0  # [E, M]
    replica_rank = jnp.where(valid, expert_slots // slots_per_rank, 0)  # [E, M]
    even = jnp.where(valid, counts[:, None] / jnp.maximum(replica_count, 1)[:, None], 0.0)  # [E, M]
    # Only replicated experts have a choice, and at most S - E experts are replicated.
    candidates = min(num_experts, max(slots_per_rank * num_ranks - num_experts, 0))
    if candidates == 0 or passes == 0:
        return even
    chosen = jnp.argsort(replica_count <= 1, stable=True)[:candidates]  # [X] replicated experts first
    rank_x, valid_x, counts_x = replica_rank[chosen], valid[chosen], counts[chosen]  # [X, M], [X]
    fixed = (jnp.zeros((num_ranks,), jnp.float32).at[replica_rank.reshape(-1)].add(even.reshape(-1))
             .at[rank_x.reshape(-1)].add(-even[chosen].reshape(-1)))  # [R] load of the others
    # One expert's replicas on one rank fill it together: each counts 1/(their number) of the rank.
    same_rank = (valid_x[:, :, None] & valid_x[:, None, :]
                 & (rank_x[:, :, None] == rank_x[:, None, :])).astype(jnp.float32)  # [X, M, M]
    weight = jnp.where(valid_x, 1.0 / jnp.maximum(same_rank.sum(axis=2), 1.0), 0.0)  # [X, M]
    moving = jnp.where((replica_count[chosen] > 1)[:, None], weight, 0.0)
    experts_on = jnp.zeros((num_ranks,), jnp.float32).at[rank_x.reshape(-1)].add(moving.reshape(-1))  # [R]
    crowd = jnp.max(jnp.where(moving > 0, experts_on[rank_x], 0.0), axis=1)  # [X]
    step = (2.0 / (jnp.maximum(jnp.round(crowd), 1.0) + 1.0))[:, None]  # [X, 1]

    on_rank = jax.nn.one_hot(rank_x.reshape(-1), num_ranks, dtype=jnp.float32) * valid_x.reshape(-1, 1)  # [X*M, R]

    def one_pass(_, share):  # share [X, M]; rank sums and gathers as small matmuls (no scatter)
        rank_load = fixed + share.reshape(-1) @ on_rank
        own = jnp.einsum("xmn,xn->xm", same_rank, share)  # the expert's own load on that rank
        base = jnp.where(valid_x, (on_rank @ rank_load).reshape(share.shape) - own, jnp.inf)
        return share + step * (_weighted_water_fill(counts_x, base, weight) - share)

    return even.at[chosen].set(jax.lax.fori_loop(0, passes, one_pass, even[chosen]))


def _weighted_water_fill(amount, base, weight):
    """The baseline's pour: ``amount`` ``[X]`` onto levels ``base`` ``[X, M]`` lowest-first, replicas on
    one rank filling it together (``weight``: 1 / their number)."""
    finite = jnp.isfinite(base)
    level_base = jnp.where(finite, base, 0.0)
    below = (base[:, None, :] <= base[:, :, None]) & finite[:, None, :]
    total = jnp.sum(jnp.where(below, (weight * level_base)[:, None, :], 0.0), axis=2)
    width = jnp.sum(jnp.where(below, weight[:, None, :], 0.0), axis=2)
    level = jnp.min(jnp.where(finite, (amount[:, None] + total) / jnp.maximum(width, 1e-30), jnp.inf), axis=1)
    return jnp.where(finite, jnp.maximum(level[:, None] - level_base, 0.0) * weight, 0.0)


def split_table(load, geometries, tokens_per_rank: int, top_k: int = 8, repeats: int = 40,
                batches: int = 8) -> list[str]:
    """Prints (and returns) one row per geometry, plan, table width and method: us per split, imbalance,
    LP optimum, time ratio to the baseline at the same width."""
    print(f"\nload-aware split, in-graph time per split ({jax.devices()[0].device_kind}); {batches} batches of "
          f"{tokens_per_rank} tokens x top-{top_k} per rank drawn from the layer's loads; imbalance = mean "
          f"max/mean - 1 of the rank loads (integer quotas for ours); table width M: 'tight' = the plan's most "
          f"replicas, 'serving' = S - E + 1 (what bench/serving pad to, so no plan recompiles)")
    print(f"{'geometry':>9} {'plan':>8} {'width':>7} {'method':>24} {'us/split':>8} {'imbalance':>9} "
          f"{'LP optimum':>10} {'time vs baseline':>16}")
    rows = []
    rng = np.random.default_rng(0)
    for ep_size, num_slots in geometries:
        if num_slots < load.size or num_slots % ep_size:
            continue
        counts = rng.multinomial(ep_size * tokens_per_rank * top_k, load / load.sum(), size=batches)
        for plan_name in ("balanced", "trtllm", "flow"):
            plan = plan_placement(load[None], num_slots, ep_size, plan_name,
                                  entries_per_iteration=ep_size * tokens_per_rank * top_k).slot_to_expert[0]
            for width in ("tight", "serving"):
                baseline = None
                for name, seconds, imbalance, optimum in _split_rows(plan, counts, num_slots, ep_size, repeats,
                                                                     width == "serving"):
                    baseline = baseline or seconds
                    row = (f"{ep_size:>4}/{num_slots:<4} {plan_name:>8} {width:>7} {name:>24} {1e6 * seconds:>8.0f} "
                           f"{imbalance:>9.4f} {optimum:>10.4f} {seconds / baseline:>15.2f}x")
                    print(row, flush=True)
                    rows.append(row)
    return rows


def _split_rows(plan, counts, num_slots: int, ep_size: int, repeats: int, padded: bool):
    """(method, seconds per split, mean imbalance, mean LP optimum) for each method on one plan and
    ``[B, E]`` batches; the baseline first."""
    from bench_iterations import lp_optimum

    num_experts = counts.shape[1]
    tables = build_assignment_tables(plan, num_experts, widest_replicas(num_experts, num_slots) if padded else None)
    args = (jnp.asarray(counts), jnp.asarray(tables.replica_count[0]), jnp.asarray(tables.expert_slots[0]),
            num_slots // ep_size, ep_size)
    optimum = np.mean([lp_optimum(plan, batch.astype(float), ep_size) for batch in counts])
    optimum_shared = np.mean([lp_optimum(plan, batch.astype(float), ep_size, SHARED_ROWS) for batch in counts])
    no_shared = jnp.zeros((ep_size,))
    methods = {"baseline: damped, 16": lambda *a: (damped_shares(*a), no_shared)}
    methods.update({f"accelerated, {p} passes": (lambda p: lambda *a: (replica_quotas(*a, passes=p), no_shared))(p)
                    for p in sorted({16, SPLIT_PASSES})})
    methods[f"+{SHARED_ROWS} shared rows/rank"] = lambda *a: tuple(balanced_shares(
        a[0], a[1], a[2], jnp.full((ep_size,), float(SHARED_ROWS)), *a[3:]))
    slots = tables.expert_slots[0]
    rank = slots[slots >= 0] // (num_slots // ep_size)
    calls, figures = {}, {}
    for name, method in methods.items():
        split = jax.jit(jax.vmap(method, in_axes=(0, None, None, None, None)), static_argnums=(3, 4))
        shares, shared = (np.asarray(a, np.float64) for a in split(*args))  # [B, E, M], [B, R]
        rank_load = shared.copy()
        for b in range(len(counts)):
            np.add.at(rank_load[b], rank, shares[b][slots >= 0])
        figures[name] = np.mean(rank_load.max(1) / rank_load.mean(1) - 1)
        # In-graph cost: CALLS splits in one jitted lax.map, so dispatch overhead is amortised.
        many = jax.jit(lambda c, rc, es, method=method: jax.lax.map(
            lambda one: method(one, rc, es, *args[3:]), jnp.broadcast_to(c, (CALLS,) + c.shape)))
        calls[name] = lambda many=many: many(args[0][0], *args[1:3])
    seconds = _time_interleaved(calls, repeats)
    for name in methods:
        yield name, seconds[name] / CALLS, figures[name], optimum_shared if "shared" in name else optimum


def _time_interleaved(calls: dict, repeats: int) -> dict:
    """Median seconds of each call, the calls taking turns (so a busy spell of the machine hits all)."""
    times = {name: [] for name in calls}
    for call in calls.values():
        jax.block_until_ready(call())
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def real_layer_load(data: Path, num_experts: int = 256) -> np.ndarray:
    """``[E]`` one recorded MoE layer's loads (layer 13 of ``data``), synthetic if absent."""
    if data.exists():
        return load_sglang_json(data).total()[10, :num_experts]
    return expert_popularity(1, num_experts)[0] * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--geometries", default="8/288,32/288,36/288,64/320")
    parser.add_argument("--tokens_per_rank", type=int, default=256)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "decode_in1000out1000.json")
    args = parser.parse_args()
    split_table(real_layer_load(args.data), [tuple(int(x) for x in g.split("/")) for g in args.geometries.split(",")],
                args.tokens_per_rank)


if __name__ == "__main__":
    main()
