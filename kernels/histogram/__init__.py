"""Routing histogram: reference (XLA), Pallas on Mosaic GPU and on Triton, public api."""

from jax_eplb_kernels.histogram.api import routing_histogram
from jax_eplb_kernels.histogram.mosaic_gpu import MosaicHistogramBlockSizes, histogram_mosaic_gpu
from jax_eplb_kernels.histogram.pallas_gpu import HistogramBlockSizes, histogram_pallas
from jax_eplb_kernels.histogram.reference import histogram_reference

__all__ = ["routing_histogram", "HistogramBlockSizes", "MosaicHistogramBlockSizes", "histogram_mosaic_gpu",
           "histogram_pallas", "histogram_reference"]
