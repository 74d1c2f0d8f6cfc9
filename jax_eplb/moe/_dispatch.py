"""Dispatch -> expert compute -> combine, per EP rank inside ``shard_map``.

Axis legend: T local tokens, K top-k, N = T*K entries, H hidden, R ranks, m local slots per
rank. Dropless: every entry of a rank could go to one destination, so a rank's receive buffer
holds N rows per source, ``[R, N, H]``.

Two transports share the routing metadata (:func:`dispatch_plan`):

* ``all_to_all``: fixed capacity; every rank ships ``[R, N, H]`` whatever the routing
  (runs everywhere, XLA:CPU included).
* ``ragged``: ``jax.lax.ragged_all_to_all`` ships only the real rows (GPU; XLA:CPU lacks it).
  Receive layout is the same ``[R, N, H]`` blocks, so expert compute and combine are shared.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jax_eplb.moe._experts import expert_compute
from jax_eplb.moe._types import TRANSPORTS


class DispatchPlan(NamedTuple):
    """Routing metadata of one rank's entries (pure function of the slot ids).

    destination: ``[N]`` rank of each entry's slot (R for invalid entries).
    position:    ``[N]`` row of the entry in its destination's receive block.
    local_slot:  ``[N]`` slot index on the destination rank (m for invalid entries).
    send_counts: ``[R]`` entries sent to each rank.
    """

    destination: jax.Array
    position: jax.Array
    local_slot: jax.Array
    send_counts: jax.Array


def dispatch_plan(slot_ids: jax.Array, num_ranks: int, slots_per_rank: int) -> DispatchPlan:
    """``[T, K]`` global slot ids (``R*m`` = invalid) -> where every entry goes."""
    flat = slot_ids.reshape(-1)
    num_slots = num_ranks * slots_per_rank
    valid = (flat >= 0) & (flat < num_slots)
    destination = jnp.where(valid, flat // slots_per_rank, num_ranks)
    onehot = (destination[:, None] == jnp.arange(num_ranks)[None, :]).astype(jnp.int32)  # [N, R]
    before = jnp.cumsum(onehot, axis=0) - onehot
    position = jnp.take_along_axis(before, jnp.minimum(destination, num_ranks - 1)[:, None], axis=1)[:, 0]
    local_slot = jnp.where(valid, flat % slots_per_rank, slots_per_rank)
    return DispatchPlan(destination, position, local_slot, onehot.sum(axis=0))


class RaggedOffsets(NamedTuple):
    """``ragged_all_to_all`` arguments of one rank, from the all-gathered ``[R, R]`` send counts.

    Dispatch: this rank's entries sorted by destination; the block for rank d starts at
    ``send_offsets[d]`` and lands at row ``rank * N`` of d's receive buffer.
    Return: the receive block from source s (rows ``s*N ...``) goes back to
    ``send_offsets`` of s for this rank.
    """

    send_offsets: jax.Array  # [R] where each destination's block starts in my sorted entries
    recv_counts: jax.Array  # [R] rows I receive from each source
    return_offsets: jax.Array  # [R] where my results for source s land in s's sorted entries


def ragged_offsets(all_send_counts: jax.Array, rank) -> RaggedOffsets:
    """``all_send_counts`` ``[R_src, R_dst]`` -> this rank's offsets (pure)."""
    exclusive = jnp.cumsum(all_send_counts, axis=1) - all_send_counts  # [src, dst] start in src's order
    return RaggedOffsets(exclusive[rank], all_send_counts[:, rank], exclusive[:, rank])


RaggedAllToAll = Callable[..., jax.Array]


def all_to_all_moe(x: jax.Array, weights: jax.Array, slot_ids: jax.Array, w_gate, w_up, w_down,
                   axis_name: str, *, transport: str = "all_to_all", grouped_matmul: str = "ragged_dot",
                   ragged_all_to_all: RaggedAllToAll | None = None):
    """One rank's MoE: x ``[T, H]``, weights/slot_ids ``[T, K]`` -> (``[T, H]`` f32, ``[R]`` sent).

    The second output is the number of entries this rank sent to each rank (``psum`` it for the
    per-rank load). ``ragged_all_to_all`` overrides the primitive of the ``ragged`` transport
    (backends that lack it can pass an emulation).
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    num_tokens, hidden = x.shape
    top_k = slot_ids.shape[1]
    plan = dispatch_plan(slot_ids, jax.lax.axis_size(axis_name), w_gate.shape[0])
    entries = x[jnp.arange(num_tokens * top_k) // top_k]  # [N, H]

    def experts(rows, row_slot):
        with jax.named_scope("moe/experts"):
            return expert_compute(rows, row_slot, w_gate, w_up, w_down, grouped_matmul=grouped_matmul)

    if transport == "all_to_all":
        mine = _fixed_capacity_exchange(entries, plan, experts, axis_name, w_gate.shape[0])
    else:
        mine = _ragged_exchange(entries, plan, experts, axis_name, w_gate.shape[0],
                                ragged_all_to_all or jax.lax.ragged_all_to_all)
    with jax.named_scope("moe/combine"):
        mine = jnp.where((plan.destination < plan.send_counts.shape[0])[:, None], mine, 0.0)
        combined = (mine.reshape(num_tokens, top_k, hidden) * weights.astype(jnp.float32)[..., None]).sum(axis=1)
    return combined, plan.send_counts


def _fixed_capacity_exchange(entries, plan: DispatchPlan, experts, axis_name: str, slots_per_rank: int):
    """``[N, H]`` entries -> their expert outputs ``[N, H]`` f32 through two fixed ``[R, N, H]`` all_to_alls."""
    capacity, hidden = entries.shape
    num_ranks = plan.send_counts.shape[0]
    with jax.named_scope("moe/dispatch"):
        send = jnp.zeros((num_ranks, capacity, hidden), entries.dtype).at[plan.destination, plan.position].set(
            entries, mode="drop")
        send_slot = jnp.full((num_ranks, capacity), slots_per_rank, jnp.int32).at[
            plan.destination, plan.position].set(plan.local_slot, mode="drop")
        recv = jax.lax.all_to_all(send, axis_name, 0, 0)
        recv_slot = jax.lax.all_to_all(send_slot, axis_name, 0, 0)
    out = experts(recv.reshape(-1, hidden), recv_slot.reshape(-1))
    with jax.named_scope("moe/combine"):
        back = jax.lax.all_to_all(out.reshape(num_ranks, capacity, hidden), axis_name, 0, 0)
        return back[jnp.minimum(plan.destination, num_ranks - 1), plan.position]  # [N, H]


def _ragged_exchange(entries, plan: DispatchPlan, experts, axis_name: str, slots_per_rank: int,
                     exchange: RaggedAllToAll):
    """Same contract as :func:`_fixed_capacity_exchange`, moving only the real rows."""
    capacity, hidden = entries.shape
    num_ranks = plan.send_counts.shape[0]
    rank = jax.lax.axis_index(axis_name)
    with jax.named_scope("moe/dispatch"):
        offsets = ragged_offsets(jax.lax.all_gather(plan.send_counts, axis_name), rank)
        valid = plan.destination < num_ranks
        sorted_index = jnp.where(valid, offsets.send_offsets[jnp.minimum(plan.destination, num_ranks - 1)]
                                 + plan.position, capacity)
        send = jnp.zeros((capacity, hidden), entries.dtype).at[sorted_index].set(entries, mode="drop")
        send_slot = jnp.zeros((capacity, 1), jnp.int32).at[sorted_index, 0].set(plan.local_slot, mode="drop")
        my_block = jnp.full((num_ranks,), rank * capacity, jnp.int32)
        recv = exchange(send, jnp.zeros((num_ranks * capacity, hidden), entries.dtype), offsets.send_offsets,
                        plan.send_counts, my_block, offsets.recv_counts, axis_name=axis_name)
        recv_slot = exchange(send_slot, jnp.full((num_ranks * capacity, 1), slots_per_rank, jnp.int32),
                             offsets.send_offsets, plan.send_counts, my_block, offsets.recv_counts,
                             axis_name=axis_name)
    out = experts(recv, recv_slot[:, 0])
    with jax.named_scope("moe/combine"):
        source_block = jnp.arange(num_ranks, dtype=jnp.int32) * capacity
        back = exchange(out, jnp.zeros((capacity, hidden), jnp.float32), source_block, offsets.recv_counts,
                        offsets.return_offsets, plan.send_counts, axis_name=axis_name)
        return back[jnp.minimum(sorted_index, capacity - 1)]  # [N, H]
