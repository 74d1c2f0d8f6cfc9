"""Public routing histogram with an ``implementation=`` override."""

from __future__ import annotations

import jax
import numpy as np

from jax_eplb_kernels._dispatch import resolve_implementation
from jax_eplb_kernels.histogram.pallas_gpu import HistogramBlockSizes, histogram_pallas
from jax_eplb_kernels.histogram.reference import histogram_reference


def routing_histogram(ids: jax.Array, num_bins: int, *, implementation: str = "auto",
                      block_sizes: HistogramBlockSizes = HistogramBlockSizes()) -> jax.Array:
    """Counts routed ids ``[T, k]`` (any shape) into ``[num_bins]`` int32.

    Ids < 0 or >= num_bins (padding, dropped entries) are ignored.

    Args:
      implementation: ``auto`` (Pallas on GPU, XLA elsewhere), ``xla``, ``pallas`` (compiled;
        GPU only) or ``pallas_interpret`` (Pallas semantics on any backend; for tests).
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if not jax.numpy.issubdtype(ids.dtype, jax.numpy.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    impl = resolve_implementation(implementation, probe=lambda: _probe(num_bins, block_sizes),
                                  probe_key=("routing_histogram", num_bins, block_sizes))
    if impl == "xla":
        return histogram_reference(ids, num_bins)
    return histogram_pallas(ids, num_bins, block_sizes, interpret=impl == "pallas_interpret")


def _probe(num_bins: int, block_sizes: HistogramBlockSizes) -> bool:
    """Compiled Pallas == reference on ids with a hot bin, invalid ids and a partial last block."""
    rng = np.random.default_rng(0)
    ids = rng.integers(-2, num_bins + 2, size=3 * block_sizes.block + 5).astype(np.int32)
    ids[: block_sizes.block] = num_bins - 1
    want = histogram_reference(jax.numpy.asarray(ids), num_bins)
    return bool(jax.numpy.array_equal(histogram_pallas(jax.numpy.asarray(ids), num_bins, block_sizes), want))
