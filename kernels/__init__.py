"""Pallas kernels for jax_eplb. The source folder is ``kernels/``; it is installed under the import
name ``jax_eplb_kernels`` (pyproject.toml maps the package dir), because PyPI's ``kernels``
distribution owns the bare name ``kernels``: ``from jax_eplb_kernels import routing_histogram``.

Each kernel: a plain-XLA reference (oracle and CPU fallback), Pallas GPU implementations (the
routing histogram and the expert-to-slot routing on Mosaic GPU, the maintained Pallas GPU backend;
all three kernels on Triton,
which JAX deprecates from 0.11 on; ``*_interpret`` runs either on any backend), and one public
function with ``implementation=``: ``auto`` measures its candidates on a GPU at the call's shapes
and takes the fastest correct one (``_dispatch``, ``_probe``), XLA elsewhere; explicit choices are
taken as they are.
"""

from jax_eplb_kernels._dispatch import (IMPLEMENTATIONS, dtype_tolerance, on_platform, relative_close,
                                       resolve_implementation, triton_in_auto)
from jax_eplb_kernels._probe import fastest_correct, settle_choices
from jax_eplb_kernels.grouped_matmul import MatmulBlockSizes, tile_grouped_matmul, tile_grouped_matmul_reference
from jax_eplb_kernels.histogram import (HistogramBlockSizes, MosaicHistogramBlockSizes, histogram_reference,
                                        routing_histogram)
from jax_eplb_kernels.slot_routing import (ROUND_ROBIN_BLOCK, RoutingBlockSizes, SlotRouting, route_reference,
                                           route_to_slots)

__all__ = [
    "IMPLEMENTATIONS", "resolve_implementation", "fastest_correct", "settle_choices", "relative_close",
    "dtype_tolerance", "triton_in_auto", "on_platform",
    "routing_histogram", "histogram_reference", "HistogramBlockSizes", "MosaicHistogramBlockSizes",
    "route_to_slots", "route_reference", "SlotRouting", "RoutingBlockSizes", "ROUND_ROBIN_BLOCK",
    "tile_grouped_matmul", "tile_grouped_matmul_reference", "MatmulBlockSizes",
]
