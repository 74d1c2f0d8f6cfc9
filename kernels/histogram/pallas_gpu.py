"""Pallas routing histogram: per-program partial counts, summed by XLA.

Each program counts ``block * inner_steps`` ids into its own row of a ``[P, B_pad]`` partial
table (no atomics: int32 block-wide atomic_add is broken in the Triton lowering, and a shared
accumulator races across grid steps on GPU), then the rows are summed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax_eplb_kernels._dispatch import triton_compiler_params


@dataclasses.dataclass(frozen=True)
class HistogramBlockSizes:
    block: int = 256  # ids compared against all bins at once: [block, bins_padded]
    inner_steps: int = 16  # blocks accumulated per program (fewer partial rows)
    num_warps: int = 4
    num_stages: int = 1


def _kernel(ids_ref, out_ref, *, block: int, inner_steps: int, bins_padded: int):
    bins = jax.lax.broadcasted_iota(jnp.int32, (1, bins_padded), 1)

    def body(step, acc):
        ids = ids_ref[pl.ds(step * block, block)]
        return acc + (ids[:, None] == bins).astype(jnp.int32).sum(axis=0, keepdims=True)

    out_ref[...] = jax.lax.fori_loop(0, inner_steps, body, jnp.zeros((1, bins_padded), jnp.int32))


@functools.partial(jax.jit, static_argnames=("num_bins", "block_sizes", "interpret"))
def histogram_pallas(ids: jax.Array, num_bins: int, block_sizes: HistogramBlockSizes = HistogramBlockSizes(),
                     interpret: bool = False) -> jax.Array:
    """``ids`` (any shape) -> ``[num_bins]`` int32 counts; invalid ids ignored."""
    flat = ids.reshape(-1).astype(jnp.int32)
    per_program = block_sizes.block * block_sizes.inner_steps
    num_programs = max(1, pl.cdiv(flat.shape[0], per_program))
    padded = jnp.full((num_programs * per_program,), -1, jnp.int32).at[: flat.shape[0]].set(flat)
    bins_padded = pl.next_power_of_2(num_bins)
    # ids in [num_bins, bins_padded) land in padding bins that are sliced off; negatives match none.
    partial = pl.pallas_call(
        functools.partial(_kernel, block=block_sizes.block, inner_steps=block_sizes.inner_steps,
                          bins_padded=bins_padded),
        out_shape=jax.ShapeDtypeStruct((num_programs, bins_padded), jnp.int32),
        grid=(num_programs,),
        in_specs=[pl.BlockSpec((per_program,), lambda p: (p,))],
        out_specs=pl.BlockSpec((1, bins_padded), lambda p: (p, 0)),
        interpret=interpret,
        compiler_params=None if interpret else triton_compiler_params(block_sizes.num_warps, block_sizes.num_stages),
        name="routing_histogram",
    )(padded)
    return partial.sum(axis=0)[:num_bins]
