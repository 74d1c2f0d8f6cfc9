"""Tile-grouped matmul: reference (XLA), Pallas GPU implementation, public api."""

from jax_eplb_kernels.grouped_matmul.api import tile_grouped_matmul
from jax_eplb_kernels.grouped_matmul.pallas_gpu import MatmulBlockSizes, tile_grouped_matmul_pallas
from jax_eplb_kernels.grouped_matmul.reference import tile_grouped_matmul_reference

__all__ = ["tile_grouped_matmul", "MatmulBlockSizes", "tile_grouped_matmul_pallas", "tile_grouped_matmul_reference"]
