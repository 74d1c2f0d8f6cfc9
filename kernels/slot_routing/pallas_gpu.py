"""Pallas expert -> slot routing, one program per 1024-entry block, fused slot histogram.

Inside a block, entries are visited in chunks of ``chunk``: an entry's occurrence index is
the per-expert count of earlier chunks (a running ``[E_pad]`` counter, read through a one-hot
product) plus the earlier same-expert entries of its own chunk (a ``[chunk, chunk]`` compare).
The replica count is read the same way; the slot id by a gather from the flattened
``[E * M]`` table. Each program also writes its own ``[H, L]`` table of slot counts (no atomics),
counted as an outer product of one-hots on the matrix units (``_outer_count``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jax_eplb_kernels._dispatch import triton_compiler_params
from jax_eplb_kernels._outer_count import count_outer, outer_layout
from jax_eplb_kernels.slot_routing.reference import ROUND_ROBIN_BLOCK


@dataclasses.dataclass(frozen=True)
class RoutingBlockSizes:
    chunk: int = 32
    num_warps: int = 4
    num_stages: int = 1


def _kernel(offset_ref, ids_ref, count_ref, slots_ref, slot_out_ref, hist_out_ref, *, block, chunk,
            num_entries, num_experts, experts_padded, max_replicas, num_slots, slot_layout):
    program = pl.program_id(0)
    bins = jax.lax.broadcasted_iota(jnp.int32, (1, experts_padded), 1)
    count_row = count_ref[...][None, :]  # [1, E_pad]
    row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    base = program + offset_ref[0]
    first = program * block
    lane = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)

    def body(step, carry):
        counter, hist = carry
        inside = first + step * chunk + lane < num_entries  # the last block may run past the end
        ids = pltriton.load(ids_ref.at[pl.ds(step * chunk, chunk)], mask=inside, other=-1)  # [c]
        valid = (ids >= 0) & (ids < num_experts)
        onehot = ((ids[:, None] == bins) & valid[:, None]).astype(jnp.int32)  # [c, E_pad]
        prior = (onehot * counter).sum(axis=1)
        same = (ids[:, None] == ids[None, :]) & (col < row)
        occurrence = prior + same.astype(jnp.int32).sum(axis=1)
        count = jnp.maximum((onehot * count_row).sum(axis=1), 1)
        replica = (base + occurrence) % count
        safe = jnp.where(valid, ids, 0)
        slot = slots_ref[safe * max_replicas + replica]
        slot = jnp.where(valid, slot, num_slots)
        pltriton.store(slot_out_ref.at[pl.ds(step * chunk, chunk)], slot, mask=inside)
        hist = hist + count_outer(slot, valid, slot_layout)
        return counter + onehot.sum(axis=0, keepdims=True), hist

    init = (jnp.zeros((1, experts_padded), jnp.int32),
            jnp.zeros((slot_layout.hi_bins, slot_layout.lo_bins), jnp.float32))
    _, hist = jax.lax.fori_loop(0, block // chunk, body, init)
    hist_out_ref[...] = hist.astype(jnp.int32)[None]


@functools.partial(jax.jit, static_argnames=("num_slots", "block", "block_sizes", "interpret"))
def route_pallas(expert_ids, replica_count, expert_slots, rank_offset, num_slots: int,
                 block: int = ROUND_ROBIN_BLOCK, block_sizes: RoutingBlockSizes = RoutingBlockSizes(),
                 interpret: bool = False):
    """Returns (``[T, K]`` slot ids, ``[S]`` int32 histogram of the chosen slots)."""
    num_experts, max_replicas = expert_slots.shape
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    if n == 0:
        return flat.reshape(expert_ids.shape), jnp.zeros((num_slots,), jnp.int32)
    num_blocks = pl.cdiv(n, block)
    experts_padded = pl.next_power_of_2(num_experts)
    slot_layout = outer_layout(num_slots)
    count = jnp.zeros((experts_padded,), jnp.int32).at[:num_experts].set(replica_count.astype(jnp.int32))
    table = expert_slots.astype(jnp.int32).reshape(-1)
    offset = jnp.asarray(rank_offset, jnp.int32).reshape(1)
    chunk = min(block_sizes.chunk, block)
    slots, partial = pl.pallas_call(
        functools.partial(_kernel, block=block, chunk=chunk, num_experts=num_experts,
                          num_entries=n, experts_padded=experts_padded, max_replicas=max_replicas, num_slots=num_slots,
                          slot_layout=slot_layout),
        out_shape=(jax.ShapeDtypeStruct((n,), jnp.int32),
                   jax.ShapeDtypeStruct((num_blocks, slot_layout.hi_bins, slot_layout.lo_bins), jnp.int32)),
        grid=(num_blocks,),
        in_specs=[pl.BlockSpec((1,), lambda b: (0,)),
                  pl.BlockSpec((block,), lambda b: (b,)),
                  pl.BlockSpec((experts_padded,), lambda b: (0,)),
                  pl.BlockSpec((table.shape[0],), lambda b: (0,))],
        out_specs=(pl.BlockSpec((block,), lambda b: (b,)),
                   pl.BlockSpec((1, slot_layout.hi_bins, slot_layout.lo_bins), lambda b: (b, 0, 0))),
        interpret=interpret,
        compiler_params=None if interpret else triton_compiler_params(block_sizes.num_warps, block_sizes.num_stages),
        name="expert_to_slot_routing",
    )(offset, flat, count, table)
    return slots.reshape(expert_ids.shape), partial.sum(axis=0).reshape(-1)[:num_slots]
