"""Dispatch -> grouped expert compute -> combine, per EP rank inside ``shard_map``.

Axis legend: T local tokens, K top-k, N = T*K entries, H hidden, F expert FFN, R ranks,
m local slots per rank. Dropless: every entry of a rank could go to one destination, so a
rank's receive buffer holds N rows per source, ``[R, N, H]``.

Two transports share the routing metadata (:func:`dispatch_plan`):

* ``all_to_all``: fixed capacity; every rank ships ``[R, N, H]`` whatever the routing
  (runs everywhere, XLA:CPU included).
* ``ragged``: ``jax.lax.ragged_all_to_all`` ships only the real rows (GPU; XLA:CPU lacks it).
  Receive layout is the same ``[R, N, H]`` blocks, so expert compute and combine are shared.

Grouped matmuls (``grouped_matmul=``): ``ragged_dot`` (XLA's grouped GEMM; on CPU a dense
masked loop over all m groups) and two over one tile-padded layout (rows sorted by slot, every
group padded to whole tiles, so about ``N*R + m*tile`` rows of work instead of ``m * N*R``):
``padded`` (XLA batched matmul with one weight copy gathered per tile: 8x faster than ragged_dot
on the CPU bench_moe layer, but meant for CPU-sized experts, not DeepSeek-sized ones on a GPU)
and ``pallas`` (the ``tile_grouped_matmul`` kernel reads each tile's slot weights in place and
skips unused tiles; ``pallas_interpret`` runs it on CPU for tests).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jax_eplb_kernels import tile_grouped_matmul

TRANSPORTS = ("all_to_all", "ragged")
GROUPED_MATMULS = ("ragged_dot", "padded", "pallas", "pallas_interpret")
PADDED_TILE = 64


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


def _swiglu_ragged_dot(x, w_gate, w_up, w_down, group_sizes):
    """Rows of ``x`` ``[rows, H]`` sorted by local slot; ``w_*`` ``[m, ...]``; -> ``[rows, H]`` f32."""
    gate = jax.lax.ragged_dot(x, w_gate, group_sizes, preferred_element_type=jnp.float32)
    up = jax.lax.ragged_dot(x, w_up, group_sizes, preferred_element_type=jnp.float32)
    hidden = (jax.nn.silu(gate) * up).astype(x.dtype)
    return jax.lax.ragged_dot(hidden, w_down, group_sizes, preferred_element_type=jnp.float32)


def _swiglu_padded(x, w_gate, w_up, w_down, group_sizes, tile: int, implementation: str):
    """Same contract as :func:`_swiglu_ragged_dot`, as tile-grouped matmuls (``implementation``:
    ``xla`` for ``padded``, else the Pallas kernel).

    Group g's rows go to tiles of ``tile`` rows, each tile holding one group only, so the
    number of tiles is at most ``ceil(rows / tile) + m`` (static) whatever the sizes.
    """
    rows, hidden = x.shape
    num_local = w_gate.shape[0]
    num_tiles = -(-rows // tile) + num_local
    tiles_per_group = -(-group_sizes // tile)  # [m]
    group_tile_start = jnp.cumsum(tiles_per_group) - tiles_per_group
    group_row_start = jnp.cumsum(group_sizes) - group_sizes
    row = jnp.arange(rows)
    row_group = jnp.clip(jnp.searchsorted(jnp.cumsum(group_sizes), row, side="right"), 0, num_local - 1)
    within = row - group_row_start[row_group]
    padded_row = (group_tile_start[row_group] + within // tile) * tile + within % tile
    in_group = row < group_sizes.sum()
    padded_row = jnp.where(in_group, padded_row, num_tiles * tile)  # rows past all groups: dropped
    buffer = jnp.zeros((num_tiles * tile, hidden), x.dtype).at[padded_row].set(x, mode="drop")
    tile_group = jnp.clip(jnp.searchsorted(jnp.cumsum(tiles_per_group), jnp.arange(num_tiles), side="right"),
                          0, num_local - 1)
    used_tiles = tiles_per_group.sum()
    matmul = functools.partial(tile_grouped_matmul, tile_group=tile_group, used_tiles=used_tiles,
                               implementation=implementation)
    act = (jax.nn.silu(matmul(buffer, w_gate)) * matmul(buffer, w_up)).astype(x.dtype)
    out = matmul(act, w_down)  # [num_tiles * tile, H]
    return jnp.where(in_group[:, None], out[jnp.minimum(padded_row, num_tiles * tile - 1)], 0.0)


def expert_compute(rows: jax.Array, row_slot: jax.Array, w_gate, w_up, w_down, *,
                   grouped_matmul: str = "ragged_dot", tile: int = PADDED_TILE) -> jax.Array:
    """Runs every received row through its local slot's SwiGLU expert.

    Args:
      rows: ``[P, H]``; row_slot: ``[P]`` local slot, m for empty rows (-> zeros).
      w_gate, w_up: ``[m, H, F]``; w_down: ``[m, F, H]``.
      grouped_matmul: ``ragged_dot``, ``padded``, ``pallas`` or ``pallas_interpret`` (module docstring).
    Returns ``[P, H]`` float32.
    """
    if grouped_matmul not in GROUPED_MATMULS:
        raise ValueError(f"grouped_matmul must be one of {GROUPED_MATMULS}, got {grouped_matmul!r}")
    num_local = w_gate.shape[0]
    order = jnp.argsort(row_slot, stable=True)
    group_sizes = jnp.zeros((num_local,), jnp.int32).at[row_slot].add(1, mode="drop")
    if grouped_matmul == "ragged_dot":
        out_sorted = _swiglu_ragged_dot(rows[order], w_gate, w_up, w_down, group_sizes)
    else:
        implementation = "xla" if grouped_matmul == "padded" else grouped_matmul
        # XLA: no tile larger than the rows; Pallas keeps whole tiles (power-of-two blocks for Triton).
        tile_rows = min(tile, rows.shape[0]) if implementation == "xla" else tile
        out_sorted = _swiglu_padded(rows[order], w_gate, w_up, w_down, group_sizes, tile_rows, implementation)
    out = jnp.zeros(out_sorted.shape, jnp.float32).at[order].set(out_sorted)
    return jnp.where((row_slot < num_local)[:, None], out, 0.0)


RaggedAllToAll = Callable[..., jax.Array]


def all_to_all_moe(x: jax.Array, weights: jax.Array, slot_ids: jax.Array, w_gate, w_up, w_down,
                   axis_name: str, *, transport: str = "all_to_all", grouped_matmul: str = "ragged_dot",
                   ragged_all_to_all: RaggedAllToAll | None = None):
    """One rank's MoE: x ``[T, H]``, weights/slot_ids ``[T, K]`` -> (``[T, H]`` f32, ``[R]`` sent).

    The second output is the number of entries this rank sent to each rank (``psum`` it for the
    per-rank load). ``ragged_all_to_all`` overrides the primitive of the ``ragged`` transport
    (tests substitute an emulation on backends that lack it).
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    num_tokens, hidden = x.shape
    top_k = slot_ids.shape[1]
    num_ranks = jax.lax.axis_size(axis_name)
    slots_per_rank = w_gate.shape[0]
    plan = dispatch_plan(slot_ids, num_ranks, slots_per_rank)
    capacity = num_tokens * top_k
    entries = x[jnp.arange(capacity) // top_k]  # [N, H]
    if transport == "all_to_all":
        with jax.named_scope("moe/dispatch"):
            send = jnp.zeros((num_ranks, capacity, hidden), x.dtype).at[plan.destination, plan.position].set(
                entries, mode="drop")
            send_slot = jnp.full((num_ranks, capacity), slots_per_rank, jnp.int32).at[
                plan.destination, plan.position].set(plan.local_slot, mode="drop")
            recv = jax.lax.all_to_all(send, axis_name, 0, 0)
            recv_slot = jax.lax.all_to_all(send_slot, axis_name, 0, 0)
        with jax.named_scope("moe/experts"):
            out = expert_compute(recv.reshape(-1, hidden), recv_slot.reshape(-1), w_gate, w_up, w_down,
                                 grouped_matmul=grouped_matmul)
        with jax.named_scope("moe/combine"):
            back = jax.lax.all_to_all(out.reshape(num_ranks, capacity, hidden), axis_name, 0, 0)
            mine = back[jnp.minimum(plan.destination, num_ranks - 1), plan.position]  # [N, H]
    else:
        exchange = ragged_all_to_all or jax.lax.ragged_all_to_all
        rank = jax.lax.axis_index(axis_name)
        with jax.named_scope("moe/dispatch"):
            offsets = ragged_offsets(jax.lax.all_gather(plan.send_counts, axis_name), rank)
            valid = plan.destination < num_ranks
            sorted_index = jnp.where(valid, offsets.send_offsets[jnp.minimum(plan.destination, num_ranks - 1)]
                                     + plan.position, capacity)
            send = jnp.zeros((capacity, hidden), x.dtype).at[sorted_index].set(entries, mode="drop")
            send_slot = jnp.zeros((capacity, 1), jnp.int32).at[sorted_index, 0].set(plan.local_slot, mode="drop")
            my_block = jnp.full((num_ranks,), rank * capacity, jnp.int32)
            recv = exchange(send, jnp.zeros((num_ranks * capacity, hidden), x.dtype), offsets.send_offsets,
                            plan.send_counts, my_block, offsets.recv_counts, axis_name=axis_name)
            recv_slot = exchange(send_slot, jnp.full((num_ranks * capacity, 1), slots_per_rank, jnp.int32),
                                 offsets.send_offsets, plan.send_counts, my_block, offsets.recv_counts,
                                 axis_name=axis_name)
        with jax.named_scope("moe/experts"):
            out = expert_compute(recv, recv_slot[:, 0], w_gate, w_up, w_down, grouped_matmul=grouped_matmul)
        with jax.named_scope("moe/combine"):
            source_block = jnp.arange(num_ranks, dtype=jnp.int32) * capacity
            back = exchange(out, jnp.zeros((capacity, hidden), jnp.float32), source_block, offsets.recv_counts,
                            offsets.return_offsets, plan.send_counts, axis_name=axis_name)
            mine = back[jnp.minimum(sorted_index, capacity - 1)]  # [N, H]
    with jax.named_scope("moe/combine"):
        mine = jnp.where((plan.destination < num_ranks)[:, None], mine, 0.0)
        combined = (mine.reshape(num_tokens, top_k, hidden) * weights.astype(jnp.float32)[..., None]).sum(axis=1)
    return combined, plan.send_counts


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """``jax.lax.ragged_all_to_all`` semantics from ``all_gather`` (for backends without it; tests).

    Every rank gathers all operands and offsets and copies the rows addressed to it.
    """
    del recv_sizes  # implied by the senders' send_sizes
    rank = jax.lax.axis_index(axis_name)
    num_ranks = jax.lax.axis_size(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)  # [R, rows_in, ...]
    starts = jax.lax.all_gather(input_offsets, axis_name)[:, rank]  # [R] per source
    sizes = jax.lax.all_gather(send_sizes, axis_name)[:, rank]
    targets = jax.lax.all_gather(output_offsets, axis_name)[:, rank]
    rows_in = operand.shape[0]
    index = jnp.arange(rows_in)
    for source in range(num_ranks):
        take = index < sizes[source]
        dst = jnp.where(take, targets[source] + index, output.shape[0])
        src = jnp.minimum(starts[source] + index, rows_in - 1)
        output = output.at[dst].set(operands[source][src], mode="drop")
    return output
