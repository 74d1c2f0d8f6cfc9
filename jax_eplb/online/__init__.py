"""Online EP load balancing while serving: the update schedule (``_schedule``), device-resident
decayed statistics and host-thread planning (``_balancer``), and the jitted rewrite of changed
slots (``_slot_writer``)."""

from jax_eplb.online._balancer import DECAY, OnlineBalancer, UpdateReport
from jax_eplb.online._schedule import OnlineSchedule, update_groups
from jax_eplb.online._slot_writer import LayerMove, SlotWriter

__all__ = ["OnlineBalancer", "UpdateReport", "DECAY", "OnlineSchedule", "update_groups", "SlotWriter", "LayerMove"]
