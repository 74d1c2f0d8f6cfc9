"""Expert -> slot routing (TensorRT-LLM's round-robin rule): reference (XLA), Pallas on Mosaic GPU and on
Triton, public api."""

from jax_eplb_kernels.slot_routing.api import SlotRouting, route_to_slots
from jax_eplb_kernels.slot_routing.mosaic_gpu import route_mosaic_gpu
from jax_eplb_kernels.slot_routing.pallas_gpu import RoutingBlockSizes, route_pallas
from jax_eplb_kernels.slot_routing.reference import ROUND_ROBIN_BLOCK, replica_occurrence, route_reference

__all__ = ["SlotRouting", "route_to_slots", "RoutingBlockSizes", "route_pallas", "route_mosaic_gpu",
           "ROUND_ROBIN_BLOCK", "replica_occurrence", "route_reference"]
