"""Expert -> slot routing on Pallas' Mosaic GPU backend, with the fused slot histogram.

One program per ``block``-entry block (TensorRT-LLM's rule counts occurrences per block): the block's
expert ids, the replica counts, the flattened ``[E * M]`` slot table and the rank offset are copied
GMEM -> SMEM, then the entries are visited in order; for each, its occurrence index is read from a
per-expert counter in SMEM and incremented, the replica is ``(block + rank_offset + occurrence) %
count``, the slot is read from the table, and the slot's count in the program's own histogram row is
incremented (no atomics: XLA sums the rows). Lane semantics, so every SMEM store is preceded by a
warpgroup barrier: the read-modify-writes of the counters are ordered across the warps.

Limits (beyond them the kernel raises ``ValueError`` and ``auto`` keeps XLA): ``E * M <= 32768``
(the table is one TMA copy of at most 256 rows of 128), ``block`` a multiple of 128 and at most
32768. Cost: one sequential pass of a few SMEM reads and writes per entry; ``auto`` measures it
against the XLA reference (a stable argsort per block).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax_eplb_kernels._mosaic_gpu import interpret_params

ROW = 128  # int32 per SMEM row: 512 bytes, whole TMA rows
HIST_ROW = 32  # int32 per histogram row: 128 bytes (Lane-semantics copies move multiples of 128 bytes)
MAX_ROWS = 256  # TMA copies at most 256 elements along a dimension


@functools.partial(jax.jit, static_argnames=("num_slots", "block", "interpret"))
def route_mosaic_gpu(expert_ids, replica_count, expert_slots, rank_offset, num_slots: int, block: int = 1024,
                     interpret: bool = False):
    """Returns (``[T, K]`` slot ids, ``[S]`` int32 histogram of the chosen slots), as ``route_reference``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    num_experts, max_replicas = expert_slots.shape
    if block % ROW or not ROW <= block <= MAX_ROWS * ROW:
        raise ValueError(f"the Mosaic GPU routing kernel needs a block that is a multiple of {ROW} in "
                         f"[{ROW}, {MAX_ROWS * ROW}], got {block}")
    if num_experts * max_replicas > MAX_ROWS * ROW:
        raise ValueError(f"the Mosaic GPU routing kernel holds the slot table in one TMA copy: E x M = "
                         f"{num_experts} x {max_replicas} > {MAX_ROWS * ROW}")
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    if n == 0:
        return flat.reshape(expert_ids.shape), jnp.zeros((num_slots,), jnp.int32)
    num_blocks = pl.cdiv(n, block)
    ids = jnp.pad(flat, (0, num_blocks * block - n), constant_values=-1).reshape(num_blocks, block // ROW, ROW)
    table_rows = pl.cdiv(num_experts * max_replicas, ROW)
    table = jnp.pad(expert_slots.astype(jnp.int32).reshape(-1), (0, table_rows * ROW - num_experts * max_replicas),
                    constant_values=-1).reshape(table_rows, ROW)
    count_rows = pl.cdiv(num_experts, ROW)
    count = jnp.pad(replica_count.astype(jnp.int32), (0, count_rows * ROW - num_experts)).reshape(count_rows, ROW)
    hist_rows = pl.cdiv(num_slots, HIST_ROW)
    offset = jnp.full((1, HIST_ROW), rank_offset, jnp.int32)

    def expert_to_slot_routing_mosaic_gpu(ids_g, count_g, table_g, offset_g, slots_g, hist_g,  # the kernel's name
                                          ids_s, count_s, table_s, offset_s, slots_s, hist_s, seen_s, barriers):
        program = jax.lax.axis_index("block")
        for i, (src, dst) in enumerate(((ids_g.at[program], ids_s), (count_g, count_s), (table_g, table_s),
                                        (offset_g, offset_s))):
            plgpu.copy_gmem_to_smem(src, dst, barriers.at[i])
        for i in range(4):
            plgpu.barrier_wait(barriers.at[i])

        @pl.loop(0, hist_rows * HIST_ROW)
        def _(s):
            hist_s[s // HIST_ROW, s % HIST_ROW] = jnp.int32(0)

        @pl.loop(0, count_rows * ROW)
        def _(e):
            seen_s[e // ROW, e % ROW] = jnp.int32(0)

        base = program + offset_s[0, 0]

        @pl.loop(0, block)
        def _(i):
            expert = ids_s[i // ROW, i % ROW]
            valid = (expert >= 0) & (expert < num_experts)
            safe = jnp.where(valid, expert, 0)
            occurrence = seen_s[safe // ROW, safe % ROW]
            replica = (base + occurrence) % jnp.maximum(count_s[safe // ROW, safe % ROW], 1)
            entry = safe * max_replicas + replica
            slot = jnp.where(valid, table_s[entry // ROW, entry % ROW], num_slots)
            slots_s[i // ROW, i % ROW] = slot
            seen_s[safe // ROW, safe % ROW] = occurrence + valid.astype(jnp.int32)
            counted = jnp.where(valid, slot, 0)
            hist_s[counted // HIST_ROW, counted % HIST_ROW] = (hist_s[counted // HIST_ROW, counted % HIST_ROW]
                                                               + valid.astype(jnp.int32))

        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(slots_s, slots_g.at[program])
        plgpu.copy_smem_to_gmem(hist_s, hist_g.at[program])
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        expert_to_slot_routing_mosaic_gpu,
        out_type=(jax.ShapeDtypeStruct((num_blocks, block // ROW, ROW), jnp.int32),
                  jax.ShapeDtypeStruct((num_blocks, hist_rows, HIST_ROW), jnp.int32)),
        scratch_types=[plgpu.SMEM((block // ROW, ROW), jnp.int32), plgpu.SMEM((count_rows, ROW), jnp.int32),
                       plgpu.SMEM((table_rows, ROW), jnp.int32), plgpu.SMEM((1, HIST_ROW), jnp.int32),
                       plgpu.SMEM((block // ROW, ROW), jnp.int32), plgpu.SMEM((hist_rows, HIST_ROW), jnp.int32),
                       plgpu.SMEM((count_rows, ROW), jnp.int32), plgpu.Barrier(num_barriers=4)],
        grid=(num_blocks,), grid_names=("block",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        **({"interpret": interpret_params()} if interpret else {}))
    slots, partial = kernel(ids, count, table, offset)
    return slots.reshape(-1)[:n].reshape(expert_ids.shape), partial.sum(axis=0).reshape(-1)[:num_slots]
