"""Pallas kernels for jax_eplb. The source folder is ``kernels/``; it is installed under the import
name ``jax_eplb_kernels`` (pyproject.toml maps the package dir), because PyPI's ``kernels``
distribution owns the bare name ``kernels``: ``from jax_eplb_kernels import routing_histogram``.

Each kernel: a plain-XLA reference (oracle and CPU fallback), a Pallas GPU implementation
(Triton lowering with explicit compiler params; ``interpret=True`` runs it on any backend),
and one public function with ``implementation=``: ``auto`` picks Pallas on a GPU once a
one-time probe of that kernel configuration has compiled and matched the reference there (else
XLA, with a warning); explicit choices are taken as they are.
"""

from jax_eplb_kernels._dispatch import IMPLEMENTATIONS, probe_passes, resolve_implementation
from jax_eplb_kernels.grouped_matmul import MatmulBlockSizes, tile_grouped_matmul, tile_grouped_matmul_reference
from jax_eplb_kernels.histogram import HistogramBlockSizes, histogram_reference, routing_histogram
from jax_eplb_kernels.slot_routing import (ROUND_ROBIN_BLOCK, RoutingBlockSizes, SlotRouting, route_reference,
                                           route_to_slots)

__all__ = [
    "IMPLEMENTATIONS", "resolve_implementation", "probe_passes",
    "routing_histogram", "histogram_reference", "HistogramBlockSizes",
    "route_to_slots", "route_reference", "SlotRouting", "RoutingBlockSizes", "ROUND_ROBIN_BLOCK",
    "tile_grouped_matmul", "tile_grouped_matmul_reference", "MatmulBlockSizes",
]
