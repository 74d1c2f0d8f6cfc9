"""Expert -> slot routing (TensorRT-LLM's round-robin rule): reference (XLA), Pallas GPU implementation, public api."""

from jax_eplb_kernels.slot_routing.api import SlotRouting, route_to_slots
from jax_eplb_kernels.slot_routing.pallas_gpu import RoutingBlockSizes, route_pallas
from jax_eplb_kernels.slot_routing.reference import ROUND_ROBIN_BLOCK, replica_occurrence, route_reference

__all__ = ["SlotRouting", "route_to_slots", "RoutingBlockSizes", "route_pallas", "ROUND_ROBIN_BLOCK",
           "replica_occurrence", "route_reference"]
