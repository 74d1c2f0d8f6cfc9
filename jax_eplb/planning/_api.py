"""The planner API: ``[L, E]`` loads -> a placement ``[L, S]``, by any algorithm.

Axis legend: L layers, E experts, S slots, R ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jax_eplb._assignment import AssignmentTables, build_assignment_tables, check_slot_geometry
from jax_eplb.planning._balanced import balanced_plan
from jax_eplb.planning._baselines import deepseek_plan, trtllm_plan
from jax_eplb._errors import EplbInputError
from jax_eplb.planning._migration import align_to_previous, slots_moved
from jax_eplb._metrics import duplicate_count, rank_loads

ALGORITHMS = ("balanced", "trtllm", "deepseek")


class PlacementPlan(NamedTuple):
    """A plan for L layers.

    slot_to_expert: ``[L, S]`` int32 expert of each global slot (rank r owns S/R consecutive slots).
    rank_load: ``[L, R]`` load each rank carries under the planning loads.
    duplicates: ``[L]`` replicas sharing a rank with another replica of the same expert.
    slots_moved: ``[L]`` slots changed relative to the previous plan (None without one).
    """

    slot_to_expert: np.ndarray
    rank_load: np.ndarray
    duplicates: np.ndarray
    slots_moved: np.ndarray | None

    @property
    def imbalance(self) -> np.ndarray:
        """``[L]`` max/mean rank load - 1 under the planning loads (0 for unloaded layers)."""
        mean = self.rank_load.mean(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(mean > 0, self.rank_load.max(axis=1) / mean - 1.0, 0.0)

    def tables(self, num_experts: int, max_replicas: int | None = None) -> AssignmentTables:
        return build_assignment_tables(self.slot_to_expert, num_experts, max_replicas)


def plan_placement(load, num_slots: int, ep_size: int, algorithm: str = "balanced", *,
                   num_groups: int = 1, num_nodes: int = 1, previous=None,
                   migration_tolerance: float = 0.0) -> PlacementPlan:
    """Plans all layers at once.

    Args:
      load: ``[L, E]`` (or ``[E]``) non-negative expert loads, e.g. counts summed over a window.
      num_slots: S >= E, divisible by ep_size.
      algorithm: ``balanced`` (ours), ``trtllm`` (TensorRT-LLM's greedy, exactly) or
        ``deepseek`` (DeepSeek EPLB; hierarchical when num_groups % num_nodes == 0 and
        num_nodes > 1, global otherwise).
      previous: ``[L, S]`` plan in force; the new plan keeps experts in place where that costs
        no balance (beyond ``migration_tolerance``, relative) and reports slots moved.
    """
    load = np.asarray(load, dtype=np.float64)
    if load.ndim == 1:
        load = load[None]
    if load.ndim != 2 or load.shape[1] == 0:
        raise EplbInputError(f"load must be [layers, experts], got shape {load.shape}")
    if not np.all(np.isfinite(load)) or np.any(load < 0):
        raise EplbInputError("load must be finite and non-negative")
    num_experts = load.shape[1]
    check_slot_geometry(num_experts, num_slots, ep_size)
    if algorithm == "balanced":
        plan = balanced_plan(load, num_slots, ep_size)
    elif algorithm == "trtllm":
        plan = trtllm_plan(load, num_slots, ep_size)
    elif algorithm == "deepseek":
        plan = deepseek_plan(load, num_slots, ep_size, num_groups, num_nodes)
    else:
        raise EplbInputError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    moved = None
    if previous is not None:
        previous = np.asarray(previous)
        if previous.shape != plan.shape:
            raise EplbInputError(f"previous plan has shape {previous.shape}, expected {plan.shape}")
        build_assignment_tables(previous, num_experts)  # validates ids and coverage
        plan = align_to_previous(load, plan, previous, ep_size, migration_tolerance)
        moved = slots_moved(plan, previous)
    plan = plan.astype(np.int32)
    return PlacementPlan(plan, rank_loads(load, plan, ep_size), duplicate_count(plan, ep_size), moved)
