"""Routing histogram on Pallas' Mosaic GPU backend (Hopper and newer; JAX's maintained Pallas GPU path).

One program (a CUDA block of one warpgroup) per ``block`` ids: its ids are copied GMEM -> SMEM (as
``[block / 128, 128]``: TMA copies at most 256 elements along a dimension), counted into the program's
own row of partial counts (no atomics), and XLA sums the rows. The input is padded with -1 to whole
blocks; ids outside ``[0, num_bins)`` (padding, dropped entries) equal no counted bin. Two methods:

- ``scan`` (default): the bins are spread over the warpgroup's threads (``[bins / 128, 128]``, one
  bin per thread per row); the program walks its ids in order, each id one SMEM read broadcast to
  every thread and one compare-and-add per bin row. No reduction, no synchronisation: about
  ``block x bins / 128`` compare-and-adds per thread.
- ``per_bin``: for every bin the warpgroup compares all of its ids with it and sums the matches (a
  warpgroup reduction per bin): ``bins x block / 128`` compares per thread plus ``bins`` reductions.

Both do one compare per id and bin (the Triton ``compare`` method's arithmetic; the matrix-unit
``outer`` method did not pass Mosaic GPU's layout inference). Which of these and XLA's histogram is
faster depends on the GPU and the shape: ``auto`` measures (``api.py``); ``scripts/bench_kernels.py``
times both methods.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax_eplb_kernels._mosaic_gpu import interpret_params

BIN_ALIGN = 16  # per_bin: int32 bins per count row, 64 bytes, a multiple of TMA's 16-byte granule
WARPGROUP = 128
METHODS = ("scan", "per_bin")
SEMANTICS = ("lane", "warpgroup")


@dataclasses.dataclass(frozen=True)
class MosaicHistogramBlockSizes:
    block: int = 2048  # ids per program: [block / 128, 128] in SMEM (whole warpgroup rows, <= 256 of them)
    method: str = "scan"  # 'scan' | 'per_bin' (module docstring)
    unroll: int = 8  # scan: ids read per loop step (independent SMEM reads in flight)
    # Mosaic GPU's lowering semantics, set explicitly: the default changed from Lane (JAX <= 0.10) to
    # Warpgroup (0.11 on). 'lane' as the slot-routing kernel; scripts/gpu_smoke.py runs both on a GPU.
    semantics: str = "lane"

    def __post_init__(self):
        if self.block < WARPGROUP or self.block % WARPGROUP or self.block > 256 * WARPGROUP:
            raise ValueError(f"block must be a multiple of {WARPGROUP} in [{WARPGROUP}, {256 * WARPGROUP}], "
                             f"got {self.block}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {self.semantics!r}")
        if self.unroll < 1 or self.block % self.unroll:
            raise ValueError(f"unroll must be >= 1 and divide block ({self.block}), got {self.unroll}")


@functools.partial(jax.jit, static_argnames=("num_bins", "block_sizes", "interpret"))
def histogram_mosaic_gpu(ids: jax.Array, num_bins: int,
                         block_sizes: MosaicHistogramBlockSizes = MosaicHistogramBlockSizes(),
                         interpret: bool = False) -> jax.Array:
    """``ids`` (any shape) -> ``[num_bins]`` int32 counts; invalid ids ignored.

    ``interpret``: run the kernel in Mosaic GPU's interpreter (any backend; JAX >= 0.11).
    """
    flat = ids.reshape(-1).astype(jnp.int32)
    if flat.shape[0] == 0:
        return jnp.zeros((num_bins,), jnp.int32)
    block = block_sizes.block
    num_programs = pl.cdiv(flat.shape[0], block)
    rows = block // WARPGROUP
    padded = jnp.pad(flat, (0, num_programs * block - flat.shape[0]), constant_values=-1)
    padded = padded.reshape(num_programs, rows, WARPGROUP)  # TMA copies <= 256 elements per dimension
    run = _per_bin if block_sizes.method == "per_bin" else _scan
    partial = run(padded, num_bins, block_sizes, interpret)  # [P, rows of bins, width]
    return partial.sum(axis=0).reshape(-1)[:num_bins]


def _per_bin(padded, num_bins: int, block_sizes: MosaicHistogramBlockSizes, interpret: bool):
    bin_rows = pl.cdiv(num_bins, BIN_ALIGN)

    def count(ids_smem, counts_smem):
        block_ids = ids_smem[...]  # [rows, 128]

        @pl.loop(0, bin_rows * BIN_ALIGN)
        def _(b):
            counts_smem[b // BIN_ALIGN, b % BIN_ALIGN] = jnp.sum((block_ids == b).astype(jnp.int32))

    return _launch(count, padded, (), (bin_rows, BIN_ALIGN), block_sizes.semantics, interpret)


def _scan(padded, num_bins: int, block_sizes: MosaicHistogramBlockSizes, interpret: bool):
    block, unroll = padded.shape[1] * WARPGROUP, block_sizes.unroll
    bin_rows = pl.cdiv(num_bins, WARPGROUP)
    if bin_rows > 256:
        raise ValueError(f"the scan method holds at most {256 * WARPGROUP} bins, got {num_bins}")
    # The bin ids come in as data: a loaded array has a layout Mosaic GPU infers on every JAX line (an
    # iota needs an explicit layout on some).
    bin_ids = jnp.arange(bin_rows * WARPGROUP, dtype=jnp.int32).reshape(bin_rows, WARPGROUP)

    def count(ids_smem, bins_smem, counts_smem):
        bins = bins_smem[...]  # [bin rows, 128]: one bin per thread per row

        def step(j, counts):
            for u in range(unroll):  # independent reads in flight
                i = j * unroll + u
                counts = counts + (bins == ids_smem[i // WARPGROUP, i % WARPGROUP]).astype(jnp.int32)
            return counts

        counts_smem[...] = jax.lax.fori_loop(0, block // unroll, step, bins * 0)  # zeros in the bins' layout

    return _launch(count, padded, (bin_ids,), (bin_rows, WARPGROUP), block_sizes.semantics, interpret)


def _launch(count, padded, tables: tuple, counts_shape: tuple[int, int], semantics: str, interpret: bool):
    """One program per block of ``padded`` ``[P, rows, 128]``: its ids and every table (whole) GMEM -> SMEM,
    ``count(ids_smem, *table_smems, counts_smem)``, the counts SMEM -> row ``program`` of ``[P, *counts_shape]``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    num_programs, rows, _ = padded.shape
    copies = 1 + len(tables)

    def routing_histogram_mosaic_gpu(*refs):  # the kernel's name
        gmem_in, counts_gmem, smem_in, counts_smem, barriers = (
            refs[:copies], refs[copies], refs[copies + 1:2 * copies + 1], refs[2 * copies + 1], refs[-1])
        program = jax.lax.axis_index("program")
        for i, (source, target) in enumerate(zip((gmem_in[0].at[program], *gmem_in[1:]), smem_in)):
            plgpu.copy_gmem_to_smem(source, target, barriers.at[i])
        for i in range(copies):
            plgpu.barrier_wait(barriers.at[i])
        count(*smem_in, counts_smem)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(counts_smem, counts_gmem.at[program])
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        routing_histogram_mosaic_gpu,
        out_type=jax.ShapeDtypeStruct((num_programs, *counts_shape), jnp.int32),
        scratch_types=[plgpu.SMEM((rows, WARPGROUP), jnp.int32), *(plgpu.SMEM(t.shape, t.dtype) for t in tables),
                       plgpu.SMEM(counts_shape, jnp.int32), plgpu.Barrier(num_barriers=copies)],
        grid=(num_programs,), grid_names=("program",),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=getattr(plgpu.LoweringSemantics, semantics.capitalize())),
        **({"interpret": interpret_params()} if interpret else {}))
    return kernel(padded, *tables)
