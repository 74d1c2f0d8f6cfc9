"""Routing histogram on Pallas' Mosaic GPU backend (Hopper and newer; JAX's maintained Pallas GPU path).

One program (a CUDA block of one warpgroup) per ``block`` ids: its ids are copied GMEM -> SMEM,
then, for every bin, the warpgroup compares its ids with the bin and sums the matches into its own
row of partial counts (no atomics: rows are per program), which XLA sums. The input is padded with
-1 to whole blocks; ids outside ``[0, num_bins)`` (padding, dropped entries) equal no counted bin.
The ids sit in SMEM as ``[block / 128, 128]`` and the counts as ``[bins / 16, 16]``: TMA copies at most
256 elements along a dimension, and a 16-int32 row is a whole number of its 16-byte granules.

Cost per program: ``bins_padded`` x (``block / 128`` compares per thread + one warpgroup sum). Which
of this and XLA's histogram is faster depends on the shape: ``auto`` measures both (``api.py``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax_eplb_kernels._mosaic_gpu import interpret_params

BIN_ALIGN = 16  # int32 bins per row: 64 bytes, a multiple of TMA's 16-byte granule
WARPGROUP = 128


@dataclasses.dataclass(frozen=True)
class MosaicHistogramBlockSizes:
    block: int = 2048  # ids per program: [block / 128, 128] in SMEM (whole warpgroup rows, <= 256 of them)

    def __post_init__(self):
        if self.block < WARPGROUP or self.block % WARPGROUP or self.block > 256 * WARPGROUP:
            raise ValueError(f"block must be a multiple of {WARPGROUP} in [{WARPGROUP}, {256 * WARPGROUP}], "
                             f"got {self.block}")


@functools.partial(jax.jit, static_argnames=("num_bins", "block_sizes", "interpret"))
def histogram_mosaic_gpu(ids: jax.Array, num_bins: int,
                         block_sizes: MosaicHistogramBlockSizes = MosaicHistogramBlockSizes(),
                         interpret: bool = False) -> jax.Array:
    """``ids`` (any shape) -> ``[num_bins]`` int32 counts; invalid ids ignored.

    ``interpret``: run the kernel in Mosaic GPU's interpreter (any backend; JAX >= 0.11).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    flat = ids.reshape(-1).astype(jnp.int32)
    if flat.shape[0] == 0:
        return jnp.zeros((num_bins,), jnp.int32)
    block = block_sizes.block
    num_programs = pl.cdiv(flat.shape[0], block)
    rows = block // WARPGROUP
    padded = jnp.pad(flat, (0, num_programs * block - flat.shape[0]), constant_values=-1)
    padded = padded.reshape(num_programs, rows, WARPGROUP)  # TMA copies <= 256 elements per dimension
    bin_rows = pl.cdiv(num_bins, BIN_ALIGN)

    def routing_histogram_mosaic_gpu(ids_gmem, counts_gmem, ids_smem, counts_smem, barrier):  # the kernel's name
        program = jax.lax.axis_index("program")
        plgpu.copy_gmem_to_smem(ids_gmem.at[program], ids_smem, barrier)
        plgpu.barrier_wait(barrier)
        block_ids = ids_smem[...]  # [rows, 128]

        @pl.loop(0, bin_rows * BIN_ALIGN)
        def _(b):
            counts_smem[b // BIN_ALIGN, b % BIN_ALIGN] = jnp.sum((block_ids == b).astype(jnp.int32))

        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(counts_smem, counts_gmem.at[program])
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        routing_histogram_mosaic_gpu,
        out_type=jax.ShapeDtypeStruct((num_programs, bin_rows, BIN_ALIGN), jnp.int32),
        scratch_types=[plgpu.SMEM((rows, WARPGROUP), jnp.int32), plgpu.SMEM((bin_rows, BIN_ALIGN), jnp.int32),
                       plgpu.Barrier()],
        grid=(num_programs,), grid_names=("program",), **({"interpret": interpret_params()} if interpret else {}))
    return kernel(padded).sum(axis=0).reshape(-1)[:num_bins]
