"""Online EP load balancing while serving: the update schedule (``_schedule``), device-resident
decayed statistics and host-thread planning (``_balancer``), the jitted rewrite of changed
slots (``_slot_writer``), and the saved state's geometry check (``_state``)."""

from jax_eplb.online._balancer import DECAY, OnlineBalancer, UpdateReport
from jax_eplb.online._schedule import OnlineSchedule, update_groups
from jax_eplb.online._slot_writer import LayerMove, SlotWriter
from jax_eplb.online._state import check_saved_state, saved_state, saved_state_shapes

__all__ = ["OnlineBalancer", "UpdateReport", "DECAY", "OnlineSchedule", "update_groups", "SlotWriter", "LayerMove",
           "check_saved_state", "saved_state", "saved_state_shapes"]
