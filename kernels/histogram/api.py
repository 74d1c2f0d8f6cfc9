"""Public routing histogram with an ``implementation=`` override."""

from __future__ import annotations

import jax
import numpy as np

from jax_eplb_kernels._dispatch import resolve_implementation, triton_in_auto
from jax_eplb_kernels._mosaic_gpu import mosaic_gpu_available
from jax_eplb_kernels.histogram.mosaic_gpu import MosaicHistogramBlockSizes, histogram_mosaic_gpu
from jax_eplb_kernels.histogram.pallas_gpu import HistogramBlockSizes, histogram_pallas
from jax_eplb_kernels.histogram.reference import histogram_reference


def routing_histogram(ids: jax.Array, num_bins: int, *, implementation: str = "auto",
                      block_sizes: HistogramBlockSizes = HistogramBlockSizes(),
                      mosaic_block_sizes: MosaicHistogramBlockSizes = MosaicHistogramBlockSizes()) -> jax.Array:
    """Counts routed ids ``[T, k]`` (any shape) into ``[num_bins]`` int32.

    Ids < 0 or >= num_bins (padding, dropped entries) are ignored.

    Args:
      implementation: ``auto`` (on a GPU the fastest correct of XLA, Pallas on Mosaic GPU and - on
        JAX < 0.11 only - Pallas on Triton, measured at this shape; XLA elsewhere), ``xla``,
        ``mosaic_gpu`` (Hopper and newer), ``pallas`` (Triton), or their ``*_interpret`` forms
        (the kernel's logic on any backend; for tests).
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if not jax.numpy.issubdtype(ids.dtype, jax.numpy.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    impl = resolve_implementation(
        implementation, trials=lambda: _trials(ids.size, num_bins, block_sizes, mosaic_block_sizes),
        key=("routing_histogram", ids.size, num_bins, block_sizes, mosaic_block_sizes),
        subject=f"routing histogram ({ids.size} ids, {num_bins} bins)")
    if impl == "xla":
        return histogram_reference(ids, num_bins)
    if impl.startswith("mosaic_gpu"):
        return histogram_mosaic_gpu(ids, num_bins, mosaic_block_sizes, interpret=impl == "mosaic_gpu_interpret")
    return histogram_pallas(ids, num_bins, block_sizes, interpret=impl == "pallas_interpret")


def _trials(num_ids: int, num_bins: int, block_sizes: HistogramBlockSizes,
            mosaic_block_sizes: MosaicHistogramBlockSizes) -> dict:
    """``auto``'s candidates on ids of this size: a hot bin, invalid ids, a partial last block."""
    rng = np.random.default_rng(0)
    ids = rng.integers(-2, num_bins + 2, size=max(num_ids, 1)).astype(np.int32)
    ids[: ids.size // 4] = num_bins - 1
    ids = jax.numpy.asarray(ids)
    reference = jax.jit(histogram_reference, static_argnums=1)  # timed as the model runs it: compiled
    runs = {"xla": lambda: reference(ids, num_bins)}
    if mosaic_gpu_available():
        runs["mosaic_gpu"] = lambda: histogram_mosaic_gpu(ids, num_bins, mosaic_block_sizes)
    if triton_in_auto():
        runs["pallas"] = lambda: histogram_pallas(ids, num_bins, block_sizes)
    return runs
