"""Assignment tables: the device-ready form of a placement plan.

Axis legend: L MoE layers, E experts, S global slots (rank r owns slots [r*S/R, (r+1)*S/R)),
R ranks, M max replicas of one expert.

A slot holding ``UNUSED_SLOT`` (-1, vLLM's convention) serves nothing: no expert lists it, no
token is sent to it (a failed rank's slots, or spare capacity).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jax_eplb._errors import EplbInputError
from jax_eplb._metrics import replica_counts

UNUSED_SLOT = -1


class AssignmentTables(NamedTuple):
    """int32 tables derived from ``slot_to_expert``; ready for ``jax.device_put``.

    slot_to_expert: ``[L, S]`` expert held by each global slot (``UNUSED_SLOT``: none).
    replica_count:  ``[L, E]`` number of slots holding each expert (>= 1).
    expert_slots:   ``[L, E, M]`` global slot ids of each expert's replicas, ascending, -1 padded.
    """

    slot_to_expert: np.ndarray
    replica_count: np.ndarray
    expert_slots: np.ndarray

    @property
    def num_slots(self) -> int:
        return self.slot_to_expert.shape[-1]

    @property
    def num_experts(self) -> int:
        return self.replica_count.shape[-1]

    @property
    def max_replicas(self) -> int:
        return self.expert_slots.shape[-1]

    def layer(self, index: int) -> "AssignmentTables":
        """One layer's tables: ``slot_to_expert [S]``, ``replica_count [E]``, ``expert_slots [E, M]``."""
        return AssignmentTables(*(table[index] for table in self))


def widest_replicas(num_experts: int, num_slots: int) -> int:
    """The most replicas one expert can have (S - E + 1): a table width every plan of this geometry fits,
    so tables of all plans share one shape and a jitted step never recompiles for a new plan."""
    return num_slots - num_experts + 1


def default_slot_to_expert(num_experts: int, num_slots: int, ep_size: int) -> np.ndarray:
    """TensorRT-LLM's layout without a plan: rank r holds experts r*E//R, r*E//R+1, ... (mod E).

    Returns ``[S]`` int32.
    """
    check_slot_geometry(num_experts, num_slots, ep_size)
    slots_per_rank = num_slots // ep_size
    rank = np.arange(ep_size)[:, None]
    local = np.arange(slots_per_rank)[None, :]
    return ((rank * num_experts // ep_size + local) % num_experts).reshape(-1).astype(np.int32)


def check_slot_geometry(num_experts: int, num_slots: int, ep_size: int) -> None:
    if ep_size < 1:
        raise EplbInputError(f"ep_size must be >= 1, got {ep_size}")
    if num_slots < num_experts:
        raise EplbInputError(f"num_slots ({num_slots}) must be >= the number of experts ({num_experts})")
    if num_slots % ep_size:
        raise EplbInputError(f"num_slots ({num_slots}) must be divisible by ep_size ({ep_size})")


def build_assignment_tables(slot_to_expert, num_experts: int, max_replicas: int | None = None) -> AssignmentTables:
    """Derives the tables from ``slot_to_expert`` ``[L, S]`` (or ``[S]``, treated as one layer).

    Raises EplbInputError if an id is out of range (``UNUSED_SLOT`` allowed) or an expert has no replica.
    ``max_replicas`` pads M to a fixed size (so tables of several plans share one shape and a
    jitted step does not recompile); by default M = max replica count (at least 1).
    """
    slot_to_expert = np.asarray(slot_to_expert)
    if slot_to_expert.ndim == 1:
        slot_to_expert = slot_to_expert[None]
    if slot_to_expert.ndim != 2:
        raise EplbInputError(f"slot_to_expert must be [layers, slots], got shape {slot_to_expert.shape}")
    if not np.issubdtype(slot_to_expert.dtype, np.integer):
        raise EplbInputError(f"slot_to_expert must hold integers, got {slot_to_expert.dtype}")
    num_layers, num_slots = slot_to_expert.shape
    bad = (slot_to_expert < UNUSED_SLOT) | (slot_to_expert >= num_experts)
    if bad.any():
        layer, slot = np.argwhere(bad)[0]
        raise EplbInputError(
            f"layer row {layer}: slot {slot} holds expert {slot_to_expert[layer, slot]}, "
            f"expected 0..{num_experts - 1} (or {UNUSED_SLOT}: unused)")
    used = slot_to_expert != UNUSED_SLOT
    rows = np.broadcast_to(np.arange(num_layers)[:, None], slot_to_expert.shape)
    replica_count = replica_counts(slot_to_expert, num_experts)
    if (replica_count == 0).any():
        layer, expert = np.argwhere(replica_count == 0)[0]
        raise EplbInputError(f"layer row {layer}: expert {expert} has no slot")
    needed = int(replica_count.max())
    width = needed if max_replicas is None else int(max_replicas)
    if width < needed:
        raise EplbInputError(f"max_replicas={width} but an expert has {needed} replicas")
    # Stable sort by expert (unused slots last) keeps slot ids ascending within each expert's run.
    sort_key = np.where(used, slot_to_expert, num_experts)
    order = np.argsort(sort_key, axis=1, kind="stable")  # [L, S] slot ids grouped by expert
    run_start = np.cumsum(replica_count, axis=1) - replica_count  # [L, E]
    sorted_expert = np.take_along_axis(sort_key, order, axis=1)
    serving = sorted_expert < num_experts
    rank_in_run = np.arange(num_slots)[None, :] - np.take_along_axis(
        run_start, np.minimum(sorted_expert, num_experts - 1), axis=1)
    expert_slots = np.full((num_layers, num_experts, width), -1, np.int32)
    expert_slots[rows[serving], sorted_expert[serving], rank_in_run[serving]] = order[serving]
    return AssignmentTables(slot_to_expert.astype(np.int32), replica_count, expert_slots)
