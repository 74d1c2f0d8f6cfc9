"""Pallas routing histogram: per-program partial counts, summed by XLA.

Each program counts ``block * inner_steps`` ids into its own partial table (no atomics: int32
block-wide atomic_add is broken in the Triton lowering, and a shared accumulator races across
grid steps on GPU), then the partials are summed. Two ways to count a block of ids:

- ``outer`` (default): ``onehot_hi^T @ onehot_lo`` on the matrix units (``_outer_count``):
  ``H + L`` compares per id (32 for 256 bins), the sum over ids inside a small matmul.
- ``compare``: every id against every bin, ``[block, bins_padded]`` compares, summed over the
  block (``bins_padded`` compares per id; the first version, kept for the benchmark).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jax_eplb_kernels._dispatch import triton_compiler_params
from jax_eplb_kernels._outer_count import EXACT_F32_COUNT, count_outer, outer_layout

METHODS = ("outer", "compare")


@dataclasses.dataclass(frozen=True)
class HistogramBlockSizes:
    block: int = 256  # ids counted at once
    inner_steps: int = 16  # blocks per program at most (fewer on small inputs, to fill the GPU)
    min_programs: int = 264  # 2 per H100/H200 multiprocessor: shrink inner_steps down to 1 to reach it
    method: str = "outer"  # 'outer' | 'compare' (see module docstring)
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.block < 1 or self.inner_steps < 1 or self.min_programs < 1:
            raise ValueError(f"block sizes must be >= 1, got {self}")

    def steps_for(self, num_ids: int) -> int:
        """Blocks per program for ``num_ids`` ids: at most ``inner_steps``, fewer to keep ``min_programs``."""
        wanted = pl.cdiv(num_ids, self.block * self.min_programs)
        return int(min(self.inner_steps, max(1, wanted)))


def _block_ids(ids_ref, step, first, *, block: int, num_ids: int, num_bins: int):
    """Block ``step`` of this program's ids (its first id is number ``first`` of the array), with
    validity: in range, and inside the array (the last program's blocks may run past the end:
    those lanes are not loaded)."""
    inside = first + step * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0) < num_ids
    ids = pltriton.load(ids_ref.at[pl.ds(step * block, block)], mask=inside, other=-1)  # no read past the end
    return ids, inside & (ids >= 0) & (ids < num_bins)


def _compare_kernel(ids_ref, out_ref, *, block: int, inner_steps: int, num_ids: int, num_bins: int,
                    bins_padded: int):
    bins = jax.lax.broadcasted_iota(jnp.int32, (1, bins_padded), 1)
    first = pl.program_id(0) * (inner_steps * block)  # outside the loop: interpret mode needs it there

    def body(step, acc):
        ids, valid = _block_ids(ids_ref, step, first, block=block, num_ids=num_ids, num_bins=num_bins)
        return acc + ((ids[:, None] == bins) & valid[:, None]).astype(jnp.int32).sum(axis=0, keepdims=True)

    out_ref[...] = jax.lax.fori_loop(0, inner_steps, body, jnp.zeros((1, bins_padded), jnp.int32))


def _outer_kernel(ids_ref, out_ref, *, block: int, inner_steps: int, num_ids: int, num_bins: int, layout):
    first = pl.program_id(0) * (inner_steps * block)

    def body(step, acc):
        ids, valid = _block_ids(ids_ref, step, first, block=block, num_ids=num_ids, num_bins=num_bins)
        return acc + count_outer(ids, valid, layout)

    acc = jax.lax.fori_loop(0, inner_steps, body, jnp.zeros((layout.hi_bins, layout.lo_bins), jnp.float32))
    out_ref[...] = acc.astype(jnp.int32)[None]


@functools.partial(jax.jit, static_argnames=("num_bins", "block_sizes", "interpret"))
def histogram_pallas(ids: jax.Array, num_bins: int, block_sizes: HistogramBlockSizes = HistogramBlockSizes(),
                     interpret: bool = False) -> jax.Array:
    """``ids`` (any shape) -> ``[num_bins]`` int32 counts; invalid ids ignored."""
    flat = ids.reshape(-1).astype(jnp.int32)  # no copy for int32 ids: the kernel reads them in place
    num_ids = flat.shape[0]
    if num_ids == 0:
        return jnp.zeros((num_bins,), jnp.int32)
    inner_steps = block_sizes.steps_for(num_ids)
    per_program = block_sizes.block * inner_steps
    num_programs = pl.cdiv(num_ids, per_program)
    common = dict(grid=(num_programs,), in_specs=[pl.BlockSpec((per_program,), lambda p: (p,))],
                  interpret=interpret, name=f"routing_histogram_{block_sizes.method}",
                  compiler_params=None if interpret else triton_compiler_params(block_sizes.num_warps,
                                                                                block_sizes.num_stages))
    if block_sizes.method == "outer" and per_program < EXACT_F32_COUNT:
        layout = outer_layout(num_bins)
        partial = pl.pallas_call(
            functools.partial(_outer_kernel, block=block_sizes.block, inner_steps=inner_steps, num_ids=num_ids,
                              num_bins=num_bins, layout=layout),
            out_shape=jax.ShapeDtypeStruct((num_programs, layout.hi_bins, layout.lo_bins), jnp.int32),
            out_specs=pl.BlockSpec((1, layout.hi_bins, layout.lo_bins), lambda p: (p, 0, 0)),
            **common,
        )(flat)
        return partial.sum(axis=0).reshape(-1)[:num_bins]
    partial = pl.pallas_call(
        functools.partial(_compare_kernel, block=block_sizes.block, inner_steps=inner_steps, num_ids=num_ids,
                          num_bins=num_bins, bins_padded=pl.next_power_of_2(num_bins)),
        out_shape=jax.ShapeDtypeStruct((num_programs, pl.next_power_of_2(num_bins)), jnp.int32),
        out_specs=pl.BlockSpec((1, pl.next_power_of_2(num_bins)), lambda p: (p, 0)),
        **common,
    )(flat)
    return partial.sum(axis=0)[:num_bins]
