"""The runtime's load-aware split, per batch inside the step: how many of each replicated expert's
entries each replica takes - and, with shared-expert balancing, how many shared-expert rows each
rank computes - so that the busiest rank computes as few rows as possible.

Experts with one replica are fixed load. From the even split, every replicated expert re-pours its
entries into its replicas' ranks lowest-first (water-filling against the others' current shares;
its replicas on one rank fill that rank together), all at once; a step is ``2 / (n + 1)`` with n
the most experts pouring onto one of its ranks, so simultaneous pours do not overshoot. That is a
block-Jacobi step on the sum of squared rank loads, whose minimiser also has the lowest busiest
rank (the LP optimum of the split). Routed shares alone: the steps carry Nesterov momentum,
dropped whenever the sum of squares rises (a chain of ranks converges in passes ~ its length, not
its square). Shared rows: one more expert on every rank (``balanced_shares``); they link all ranks,
so plain damped steps converge fast and momentum would oscillate. The even split is kept where the
passes did not lower the busiest rank. ``planning.split_rank_loads`` is the same computation in
NumPy (the planner's objective; tests hold the two equal).

The passes work on a flat list of the P <= min(S, 2 (S - E)) slots of replicated experts (one share
per expert and rank), so their cost does not grow with the table's padded width M.
Axis legend: E experts, M table width, S slots, R ranks, P shares.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_eplb.planning._split import BETTER_BY, SPLIT_PASSES


class SplitShares(NamedTuple):
    """``replica`` ``[E, M]`` entries (fractional) each replica takes; ``shared`` ``[R]`` shared-expert
    rows each rank computes."""

    replica: jax.Array
    shared: jax.Array


class _Layout(NamedTuple):
    """One batch's split problem on the flat shares (``[P]`` unless noted)."""

    even: jax.Array  # [E, M] the even split
    slot: jax.Array  # the share's slot id (S: padding)
    first_there: jax.Array  # the flat index of the expert's first slot on the share's rank
    lead: jax.Array  # bool: the share that moves for its (expert, rank)
    together: jax.Array  # the expert's slots on that rank
    sibling: jax.Array  # [P, M] flat indices of the expert's leads (P: none), or [P, P] bool (q: a lead of p's expert)
    amount: jax.Array  # the expert's entries
    on_rank: jax.Array  # [P, R] one-hot rank of each lead
    start: jax.Array  # the even split
    fixed: jax.Array  # [R] the load of the experts that do not move
    even_load: jax.Array  # [R] rank loads under the even split
    serving: jax.Array  # [R] bool: ranks holding a slot


def _layout(expert_counts, replica_count, expert_slots, slots_per_rank: int, num_ranks: int) -> _Layout:
    num_experts, max_replicas = expert_slots.shape
    num_slots = slots_per_rank * num_ranks
    counts = expert_counts.astype(jnp.float32)
    valid = expert_slots >= 0  # [E, M]
    even = jnp.where(valid, counts[:, None] / jnp.maximum(replica_count, 1)[:, None], 0.0)
    size = min(num_slots, 2 * max(num_slots - num_experts, 0))  # S - E extra slots + one each of <= S - E experts
    slot_expert = jnp.full((num_slots,), num_experts, jnp.int32).at[jnp.where(valid, expert_slots, num_slots)].set(
        jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32)[:, None], valid.shape), mode="drop")  # [S]
    held = slot_expert < num_experts
    replicated = held & (replica_count[jnp.minimum(slot_expert, num_experts - 1)] > 1)
    slot = jnp.nonzero(replicated, size=size, fill_value=num_slots)[0]  # [P] ascending
    real = slot < num_slots
    expert = jnp.where(real, slot_expert[jnp.minimum(slot, num_slots - 1)], num_experts)
    safe_expert = jnp.minimum(expert, num_experts - 1)
    rank = jnp.where(real, slot // slots_per_rank, num_ranks)
    # The expert's slots as flat indices [P, M] (P: none): the pours look at these only.
    flat_of_slot = jnp.full((num_slots + 1,), size, jnp.int32).at[slot].set(jnp.arange(size, dtype=jnp.int32))
    sibling_slot = expert_slots[safe_expert]  # [P, M]
    has = real[:, None] & (sibling_slot >= 0)
    sibling = jnp.where(has, flat_of_slot[jnp.where(has, sibling_slot, num_slots)], size)
    # One expert's replicas on one rank fill it together: one share per (expert, rank), held by its
    # first slot there (the lead); the replicas split it evenly at the end.
    here = has & (sibling_slot // slots_per_rank == rank[:, None])  # [P, M]
    first_there = jnp.take_along_axis(sibling, jnp.argmax(here, axis=1)[:, None], axis=1)[:, 0]
    lead = real & (first_there == jnp.arange(size))
    together = jnp.sum(here, axis=1).astype(jnp.float32)
    sibling = jnp.where(jnp.append(lead, False)[sibling], sibling, size)  # only the expert's leads
    if 0 < size <= 2 * max_replicas:  # a wide (padded) table: a [P, P] mask is cheaper than [P, M] gathers
        sibling = (expert[:, None] == expert[None, :]) & lead[:, None] & lead[None, :] & real[:, None]
    amount = jnp.where(real, counts[safe_expert], 0.0)
    on_rank = jax.nn.one_hot(rank, num_ranks, dtype=jnp.float32) * lead[:, None]  # [P, R]
    replica_rank = jnp.where(valid, expert_slots // slots_per_rank, 0)
    even_load = jnp.zeros((num_ranks,), jnp.float32).at[replica_rank.reshape(-1)].add(even.reshape(-1))
    start = jnp.where(lead, amount / jnp.maximum(replica_count[safe_expert], 1) * together, 0.0)
    serving = held.reshape(num_ranks, slots_per_rank).any(axis=1)
    return _Layout(even, slot, first_there, lead, together, sibling, amount, on_rank, start,
                   even_load - start @ on_rank, even_load, serving)


def _of_siblings(layout: _Layout, values, fill):
    """``[P]`` -> ``[P, M]`` (or ``[P, P]``) the values at each share's expert's leads (``fill`` elsewhere)."""
    if layout.sibling.dtype == jnp.bool_:
        return jnp.where(layout.sibling, values[None, :], fill)
    return jnp.append(values, fill)[layout.sibling]


def _is_sibling(layout: _Layout):
    """``[P, M]`` (or ``[P, P]``) bool: which entries of ``_of_siblings`` are leads of the share's expert."""
    if layout.sibling.dtype == jnp.bool_:
        return layout.sibling
    return layout.sibling < layout.lead.shape[0]


def _pour(layout: _Layout, base):
    """``[P]`` levels (inf: no share) -> each expert's entries poured onto its shares lowest-first.

    The level when exactly the shares at or below ``base[p]`` are filled is ``(amount + sum of those
    bases) / their number``; over rising bases these levels fall while the next base is below the
    level and rise after, so the water level is the smallest of them (no under-water test that
    rounding could fail for every share)."""
    lead = layout.lead
    finite_base = jnp.where(lead, base, 0.0)
    sibling_base = _of_siblings(layout, finite_base, 0.0)
    below = _is_sibling(layout) & (sibling_base <= finite_base[:, None])  # [P, M]
    level = jnp.where(lead, (layout.amount + jnp.sum(jnp.where(below, sibling_base, 0.0), axis=1))
                      / jnp.maximum(jnp.sum(below, axis=1), 1), jnp.inf)
    water = jnp.min(_of_siblings(layout, level, jnp.inf), axis=1)
    return jnp.where(lead, jnp.maximum(water - finite_base, 0.0), 0.0)


def _steps(layout: _Layout, shared: bool):
    """``[P]`` step ``2 / (n + 1)`` (n: the most pouring experts on one of the expert's ranks; the
    shared rows count as one more on every serving rank) and the shared rows' step."""
    pouring = layout.lead.astype(jnp.float32) @ layout.on_rank + (layout.serving if shared else 0.0)  # [R]
    on_share_rank = layout.on_rank @ pouring  # [P]
    crowd = jnp.max(_of_siblings(layout, on_share_rank, 0.0), axis=1)
    return 2.0 / (jnp.maximum(crowd, 1.0) + 1.0), 2.0 / (jnp.max(pouring) + 1.0)


def _per_replica(layout: _Layout, share, replica_count, expert_slots, num_slots: int):
    """``[P]`` shares -> ``[E, M]``: each replica its part of its (expert, rank) share; others even."""
    valid = expert_slots >= 0
    per_slot = jnp.zeros((num_slots,), jnp.float32).at[layout.slot].set(
        share[layout.first_there] / jnp.maximum(layout.together, 1.0), mode="drop")  # [S]
    moved = valid & (replica_count > 1)[:, None]
    return jnp.where(moved, per_slot[jnp.where(valid, expert_slots, 0)], layout.even)


def replica_shares(expert_counts, replica_count, expert_slots, slots_per_rank: int, num_ranks: int,
                   passes: int = SPLIT_PASSES):
    """``[E, M]`` entries (fractional) each replica should take so that rank loads come out even.

    Args:
      expert_counts: ``[E]`` global entries per expert this batch.
      replica_count: ``[E]``; expert_slots: ``[E, M]`` (the layer's table).
    """
    layout = _layout(expert_counts, replica_count, expert_slots, slots_per_rank, num_ranks)
    if layout.slot.shape[0] == 0 or passes == 0:
        return layout.even
    lead, amount, on_rank, fixed = layout.lead, layout.amount, layout.on_rank, layout.fixed
    step = _steps(layout, shared=False)[0]
    # A pass needs each share's rank load and the sum of squared rank loads; with
    # load = fixed + on_rank.T @ share both come from one small matmul by pairs = on_rank @ on_rank.T.
    pairs = on_rank @ on_rank.T  # [P, P]: 1 where two shares sit on one rank
    fixed_there, fixed_square = on_rank @ fixed, fixed @ fixed

    def one_pass(_, state):  # [P] shares: the last plain step, the extrapolated point
        last, share, momentum, last_square = state
        others = pairs @ share
        square = fixed_square + share @ (2.0 * fixed_there + others)  # sum over ranks of load^2
        new = share + step * (_pour(layout, jnp.where(lead, fixed_there + others - share, jnp.inf)) - share)
        following = (1.0 + jnp.sqrt(1.0 + 4.0 * momentum * momentum)) / 2.0
        restart = square > last_square * (1.0 + BETTER_BY)  # the sum of squares rose: drop the momentum
        beta = jnp.where(restart, 0.0, (momentum - 1.0) / following)
        ahead = jnp.where(lead, jnp.maximum(new + beta * (new - last), 0.0), 0.0)
        ahead = ahead * amount / jnp.maximum(jnp.sum(_of_siblings(layout, ahead, 0.0), axis=1), 1e-30)
        return new, ahead, jnp.where(restart, 1.0, following), square

    start = layout.start
    share = jax.lax.fori_loop(0, passes, one_pass, (start, start, jnp.float32(1.0), jnp.float32(jnp.inf)),
                              unroll=True)[1]
    better = jnp.max(fixed + share @ on_rank) < jnp.max(layout.even_load) * (1.0 - BETTER_BY)
    return _per_replica(layout, jnp.where(better, share, start), replica_count, expert_slots,
                        slots_per_rank * num_ranks)


def balanced_shares(expert_counts, replica_count, expert_slots, shared_rows, slots_per_rank: int, num_ranks: int,
                    passes: int = SPLIT_PASSES) -> SplitShares:
    """The split with shared-expert rows in the balance: ``shared_rows`` ``[R]`` rows each rank brings
    (its tokens' shared-expert rows), which any serving rank may compute. Plain damped passes."""
    layout = _layout(expert_counts, replica_count, expert_slots, slots_per_rank, num_ranks)
    own = jnp.where(layout.serving, shared_rows.astype(jnp.float32), 0.0)
    total = jnp.sum(shared_rows.astype(jnp.float32))
    if passes == 0:
        return SplitShares(layout.even, own)
    lead, on_rank, fixed, serving = layout.lead, layout.on_rank, layout.fixed, layout.serving
    step, pool_step = _steps(layout, shared=True)

    def one_pass(_, state):  # [P] routed shares, [R] shared rows
        share, pool = state
        load = fixed + share @ on_rank + pool  # [R]
        new = share + step * (_pour(layout, jnp.where(lead, on_rank @ load - share, jnp.inf)) - share)
        new_pool = pool + pool_step * (_fill_ranks(total, jnp.where(serving, load - pool, jnp.inf)) - pool)
        return new, new_pool

    share, pool = jax.lax.fori_loop(0, passes, one_pass, (layout.start, own), unroll=True)
    better = jnp.max(fixed + share @ on_rank + pool) < jnp.max(layout.even_load + own) * (1.0 - BETTER_BY)
    share, pool = jnp.where(better, share, layout.start), jnp.where(better, pool, own)
    return SplitShares(_per_replica(layout, share, replica_count, expert_slots, slots_per_rank * num_ranks), pool)


def _fill_ranks(total, base):
    """``total`` poured onto levels ``base`` ``[R]`` (inf: not serving) lowest-first: the smallest
    candidate level, as in ``_pour`` (pairwise for up to 128 ranks, by a sort beyond)."""
    finite = jnp.isfinite(base)
    level_base = jnp.where(finite, base, 0.0)
    if base.shape[0] <= 128:
        below = (base[None, :] <= base[:, None]) & finite[None, :]  # [R, R]
        level = (total + jnp.sum(jnp.where(below, level_base[None, :], 0.0), axis=1)) / jnp.maximum(
            jnp.sum(below, axis=1), 1)
        level = jnp.min(jnp.where(finite, level, jnp.inf))
    else:
        order = jnp.sort(base)
        ordered = jnp.isfinite(order)
        level = (total + jnp.cumsum(jnp.where(ordered, order, 0.0))) / jnp.maximum(jnp.cumsum(ordered), 1)
        level = jnp.min(jnp.where(ordered, level, jnp.inf))
    return jnp.where(finite, jnp.maximum(level - level_base, 0.0), 0.0)


def rounded(shares, totals):
    """``[..., M]`` fractional shares whose rows sum to ``totals`` ``[...]`` -> int32 parts that sum to
    them exactly, each within one of its share (the rounded running sum)."""
    running = jnp.minimum(jnp.round(jnp.cumsum(shares, axis=-1)), totals.astype(jnp.float32)[..., None])
    return jnp.diff(running, axis=-1, prepend=0.0).astype(jnp.int32)


def replica_quotas(expert_counts, replica_count, expert_slots, slots_per_rank: int, num_ranks: int,
                   passes: int = SPLIT_PASSES):
    """``[E, M]`` integer entries per replica: ``replica_shares`` rounded so that each expert's
    quotas sum exactly to its count (each within one of its share)."""
    quota = replica_shares(expert_counts, replica_count, expert_slots, slots_per_rank, num_ranks, passes)
    return jnp.where(expert_slots >= 0, rounded(quota, expert_counts), 0)
