"""The planner API: ``[L, E]`` loads -> a placement ``[L, S]``, by any algorithm.

Axis legend: L layers, E experts, S slots, R ranks.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from jax_eplb._assignment import UNUSED_SLOT, AssignmentTables, build_assignment_tables, check_slot_geometry
from jax_eplb.planning._balanced import balanced_plan
from jax_eplb.planning._baselines import deepseek_plan, trtllm_plan
from jax_eplb._errors import EplbInputError
from jax_eplb.planning._flow import DECODE_TOKENS_PER_RANK, flow_plan, sample_iterations
from jax_eplb.planning._failed_ranks import serving_columns, serving_ranks, spread_to_ranks
from jax_eplb.planning._migration import align_to_previous, slots_moved
from jax_eplb._metrics import duplicate_count, rank_loads

ALGORITHMS = ("balanced", "flow", "trtllm", "deepseek")


class PlacementPlan(NamedTuple):
    """A plan for L layers.

    slot_to_expert: ``[L, S]`` int32 expert of each global slot (rank r owns S/R consecutive slots;
      ``UNUSED_SLOT`` on failed ranks).
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
        """``[L]`` max/mean rank load - 1 under the planning loads (0 for unloaded layers), over the
        ranks that serve (a failed rank, every slot unused, is left out)."""
        layers, ranks = self.rank_load.shape
        serving = (self.slot_to_expert.reshape(layers, ranks, -1) != UNUSED_SLOT).any(axis=2)
        mean = np.where(serving, self.rank_load, 0.0).sum(axis=1) / np.maximum(serving.sum(axis=1), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(mean > 0, self.rank_load.max(axis=1) / mean - 1.0, 0.0)

    def tables(self, num_experts: int, max_replicas: int | None = None) -> AssignmentTables:
        return build_assignment_tables(self.slot_to_expert, num_experts, max_replicas)

    @classmethod
    def of(cls, slot_to_expert, load, ep_size: int, previous=None) -> "PlacementPlan":
        """A given ``[L, S]`` placement's figures under ``load`` ``[L, E]`` (and moves from ``previous``)."""
        plan = np.asarray(slot_to_expert).astype(np.int32)
        load = np.asarray(load, dtype=np.float64)
        moved = None if previous is None else slots_moved(plan, previous)
        return cls(plan, rank_loads(load, plan, ep_size), duplicate_count(plan, ep_size), moved)


def plan_placement(load, num_slots: int, ep_size: int, algorithm: str = "balanced", *,
                   num_groups: int = 1, num_nodes: int = 1, previous=None, migration_tolerance: float = 0.0,
                   failed_ranks: Sequence[int] = (), samples=None, entries_per_iteration=None,
                   shared_rows: float = 0.0) -> PlacementPlan:
    """Plans all layers at once.

    Args:
      load: ``[L, E]`` (or ``[E]``) non-negative expert loads, e.g. counts summed over a window.
      num_slots: S >= E, divisible by ep_size.
      algorithm: ``balanced`` (ours, for the window's total), ``flow`` (ours, for each iteration's
        load under the load-aware split), ``trtllm`` (TensorRT-LLM's greedy, exactly) or
        ``deepseek`` (DeepSeek EPLB; hierarchical when num_groups % num_nodes == 0 and
        num_nodes > 1, global otherwise).
      previous: ``[L, S]`` plan in force; the new plan keeps experts in place where that costs
        no balance (beyond ``migration_tolerance``, relative) and reports slots moved.
      failed_ranks: ranks that serve nothing: the plan uses only the other ranks' slots (the failed
        ranks' slots hold ``UNUSED_SLOT``); ``rank_load`` is 0 and ``imbalance`` ignores them.
      samples: ``flow``: per-iteration counts ``[K, L, E]`` to plan for (recorded iterations);
        default: drawn by the noise model around ``load`` with ``entries_per_iteration`` (token,
        expert) entries per iteration (``[L]`` or one number; default 256 tokens per rank x 8).
      shared_rows: ``flow``: shared-expert rows per serving rank per iteration that the split may
        move between ranks (the MoE layer's ``shared_expert_balance``; 0: the model has none or
        does not balance them); the plans are scored with them.
    """
    load = _checked(load, "load")
    num_experts = load.shape[1]
    check_slot_geometry(num_experts, num_slots, ep_size)
    if algorithm not in ALGORITHMS:
        raise EplbInputError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    ranks = serving_ranks(ep_size, failed_ranks)
    serving_slots = num_slots // ep_size * len(ranks)
    if serving_slots < num_experts:
        raise EplbInputError(f"the {len(ranks)} serving ranks have {serving_slots} slots, fewer than the "
                             f"{num_experts} experts")
    serving_previous = None
    if previous is not None:
        previous = np.asarray(previous)
        if previous.shape != (load.shape[0], num_slots):
            raise EplbInputError(f"previous plan has shape {previous.shape}, expected {(load.shape[0], num_slots)}")
        build_assignment_tables(previous, num_experts)  # validates ids and coverage
        serving_previous = serving_columns(previous, ep_size, ranks)
    if algorithm == "flow":
        samples = _flow_samples(load, samples, entries_per_iteration, len(ranks))
        if not np.isfinite(shared_rows) or shared_rows < 0:
            raise EplbInputError(f"shared_rows must be finite and >= 0, got {shared_rows}")
        plan = flow_plan(load, samples, serving_slots, len(ranks), serving_previous, migration_tolerance,
                         shared_rows=shared_rows)
    else:
        plan = _plan_layers(load, serving_slots, len(ranks), algorithm, num_groups, num_nodes)
        if previous is not None:
            plan = _aligned(load, plan, serving_previous, len(ranks), migration_tolerance)
    return PlacementPlan.of(spread_to_ranks(plan, ep_size, ranks), load, ep_size, previous)


def _checked(load, name: str) -> np.ndarray:
    load = np.asarray(load, dtype=np.float64)
    if load.ndim == 1:
        load = load[None]
    if load.ndim != 2 or load.shape[1] == 0:
        raise EplbInputError(f"{name} must be [layers, experts], got shape {load.shape}")
    if not np.all(np.isfinite(load)) or np.any(load < 0):
        raise EplbInputError(f"{name} must be finite and non-negative")
    return load


def _flow_samples(load, samples, entries_per_iteration, serving_ranks: int) -> np.ndarray:
    if samples is None:
        entries = serving_ranks * DECODE_TOKENS_PER_RANK * 8 if entries_per_iteration is None else entries_per_iteration
        return sample_iterations(load, entries)
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 3 or samples.shape[1:] != load.shape or samples.shape[0] == 0:
        raise EplbInputError(f"samples must be [iterations, {load.shape[0]}, {load.shape[1]}], got {samples.shape}")
    if not np.all(np.isfinite(samples)) or np.any(samples < 0):
        raise EplbInputError("samples must be finite and non-negative")
    return samples


def _plan_layers(load, num_slots: int, ep_size: int, algorithm: str, num_groups: int, num_nodes: int) -> np.ndarray:
    if algorithm == "balanced":
        return balanced_plan(load, num_slots, ep_size)
    if algorithm == "trtllm":
        return trtllm_plan(load, num_slots, ep_size)
    return deepseek_plan(load, num_slots, ep_size, num_groups, num_nodes)


def _aligned(load, plan: np.ndarray, previous: np.ndarray, ep_size: int, tolerance: float) -> np.ndarray:
    """``plan`` aligned to ``previous`` (both ``[L, S']`` on the serving ranks); layers where the previous
    plan has unused slots there keep the fresh plan."""
    usable = (previous != UNUSED_SLOT).all(axis=1)
    out = plan.copy()
    if usable.any():
        out[usable] = align_to_previous(load[usable], plan[usable], previous[usable], ep_size, tolerance)
    return out
