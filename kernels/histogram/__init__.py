"""Routing histogram: reference (XLA), Pallas GPU implementation, public api."""

from jax_eplb_kernels.histogram.api import routing_histogram
from jax_eplb_kernels.histogram.pallas_gpu import HistogramBlockSizes, histogram_pallas
from jax_eplb_kernels.histogram.reference import histogram_reference

__all__ = ["routing_histogram", "HistogramBlockSizes", "histogram_pallas", "histogram_reference"]
