"""Dispatch -> grouped expert compute -> combine, per EP rank inside ``shard_map``.

Axis legend: T local tokens, K top-k, N = T*K entries, H hidden, F expert FFN, R ranks,
m local slots per rank, C = N capacity per (source, destination) pair (dropless: every entry
of a rank could go to one destination).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


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


def _swiglu_grouped(x, w_gate, w_up, w_down, group_sizes):
    """Rows of ``x`` ``[rows, H]`` sorted by local slot; ``w_*`` ``[m, ...]``; -> ``[rows, H]``."""
    gate = jax.lax.ragged_dot(x, w_gate, group_sizes, preferred_element_type=jnp.float32)
    up = jax.lax.ragged_dot(x, w_up, group_sizes, preferred_element_type=jnp.float32)
    hidden = (jax.nn.silu(gate) * up).astype(x.dtype)
    return jax.lax.ragged_dot(hidden, w_down, group_sizes, preferred_element_type=jnp.float32)


def expert_compute(rows: jax.Array, row_slot: jax.Array, w_gate, w_up, w_down) -> jax.Array:
    """Runs every received row through its local slot's SwiGLU expert.

    Args:
      rows: ``[P, H]``; row_slot: ``[P]`` local slot, m for empty rows (-> zeros).
      w_gate, w_up: ``[m, H, F]``; w_down: ``[m, F, H]``.
    Returns ``[P, H]`` float32.
    """
    num_local = w_gate.shape[0]
    order = jnp.argsort(row_slot, stable=True)
    group_sizes = jnp.zeros((num_local,), jnp.int32).at[row_slot].add(1, mode="drop")
    out_sorted = _swiglu_grouped(rows[order], w_gate, w_up, w_down, group_sizes)
    out = jnp.zeros(out_sorted.shape, jnp.float32).at[order].set(out_sorted)
    return jnp.where((row_slot < num_local)[:, None], out, 0.0)


def all_to_all_moe(x: jax.Array, weights: jax.Array, slot_ids: jax.Array, w_gate, w_up, w_down,
                   axis_name: str) -> jax.Array:
    """Fixed-capacity all_to_all transport. x ``[T, H]``, weights/slot_ids ``[T, K]`` -> ``[T, H]`` f32."""
    num_tokens, hidden = x.shape
    top_k = slot_ids.shape[1]
    num_ranks = jax.lax.axis_size(axis_name)
    slots_per_rank = w_gate.shape[0]
    plan = dispatch_plan(slot_ids, num_ranks, slots_per_rank)
    capacity = num_tokens * top_k
    token = jnp.arange(capacity) // top_k
    with jax.named_scope("moe/dispatch"):
        send = jnp.zeros((num_ranks, capacity, hidden), x.dtype).at[plan.destination, plan.position].set(
            x[token], mode="drop")
        send_slot = jnp.full((num_ranks, capacity), slots_per_rank, jnp.int32).at[
            plan.destination, plan.position].set(plan.local_slot, mode="drop")
        recv = jax.lax.all_to_all(send, axis_name, 0, 0)
        recv_slot = jax.lax.all_to_all(send_slot, axis_name, 0, 0)
    with jax.named_scope("moe/experts"):
        out = expert_compute(recv.reshape(-1, hidden), recv_slot.reshape(-1), w_gate, w_up, w_down)
    with jax.named_scope("moe/combine"):
        back = jax.lax.all_to_all(out.reshape(num_ranks, capacity, hidden), axis_name, 0, 0)
        valid = plan.destination < num_ranks
        mine = back[jnp.minimum(plan.destination, num_ranks - 1), plan.position]  # [N, H]
        mine = jnp.where(valid[:, None], mine, 0.0)
        combined = (mine.reshape(num_tokens, top_k, hidden) * weights.astype(jnp.float32)[..., None]).sum(axis=1)
    return combined
