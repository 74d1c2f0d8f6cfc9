"""Online EP load balancing: schedule, device-resident statistics, jitted slot rewrites."""

from jax_eplb.online._balancer import DECAY, OnlineBalancer, UpdateReport
from jax_eplb.online._schedule import OnlineSchedule, update_groups
from jax_eplb.online._slot_writer import LayerMove, SlotWriter
