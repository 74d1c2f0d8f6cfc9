"""Replication: how many slots each expert gets, and the lower bound it implies.

Pure numpy, vectorised over layers. Axis legend: L layers, E experts, S slots, R ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class GreedyReplication(NamedTuple):
    """replica_count: ``[L, E]``; order: ``[L, S - E]`` expert that received each extra slot."""

    replica_count: np.ndarray
    order: np.ndarray


def greedy_replication(load: np.ndarray, num_slots: int, prefer_larger_id: bool, dtype=np.float64) -> GreedyReplication:
    """Gives each extra slot to the expert with the largest ``load / replica_count``.

    Starts at one replica each. ``prefer_larger_id`` breaks ties towards the larger expert id
    (TensorRT-LLM) instead of the smaller one (DeepSeek EPLB). Minimises the largest replica
    size ``max_e load_e / count_e`` over all counts with sum S and each >= 1.

    Args:
      load: ``[L, E]`` non-negative loads.
      dtype: arithmetic of ``load / count`` (float32 reproduces DeepSeek EPLB's torch float32).
    """
    load = np.asarray(load, dtype=dtype)
    num_layers, num_experts = load.shape
    count = np.ones((num_layers, num_experts), np.int64)
    rows = np.arange(num_layers)
    extra = num_slots - num_experts
    order = np.zeros((num_layers, extra), np.int64)
    for step in range(extra):
        ratio = load / count.astype(dtype)
        if prefer_larger_id:
            chosen = num_experts - 1 - np.argmax(ratio[:, ::-1], axis=1)
        else:
            chosen = np.argmax(ratio, axis=1)
        order[:, step] = chosen
        count[rows, chosen] += 1
    return GreedyReplication(count, order)


def trtllm_replication(load: np.ndarray, num_slots: int) -> np.ndarray:
    """TensorRT-LLM's replica counts ``[L, E]``, its special cases included.

    num_slots == E: one each. A layer with zero total load: ``S//E + (e < S%E)``.
    Otherwise greedy with ties towards the larger expert id. Loads are rounded to float32 first
    (TensorRT-LLM passes ``float`` load factors) and divided in double, as its C++ does.
    """
    load = np.asarray(load, dtype=np.float32).astype(np.float64)
    num_layers, num_experts = load.shape
    count = greedy_replication(load, num_slots, prefer_larger_id=True).replica_count
    zero = load.sum(axis=1) == 0
    if zero.any():
        even = num_slots // num_experts + (np.arange(num_experts) < num_slots % num_experts)
        count[zero] = even
    return count


class LowerBound(NamedTuple):
    """Lower bound on the max rank load of any plan (replicas split load evenly).

    max_rank_load: ``[L]`` = max(W / R, T*); T* = min over counts of max load_e / count_e.
    mean_rank_load: ``[L]`` = W / R.
    """

    max_rank_load: np.ndarray
    mean_rank_load: np.ndarray

    @property
    def imbalance(self) -> np.ndarray:
        """``[L]`` best achievable max/mean - 1 (0 where a layer has no load)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = self.max_rank_load / self.mean_rank_load
        return np.where(self.mean_rank_load > 0, ratio - 1.0, 0.0)


def lower_bound(load: np.ndarray, num_slots: int, ep_size: int) -> LowerBound:
    """The bound for ``[L, E]`` loads placed on ``num_slots`` slots over ``ep_size`` ranks."""
    load = np.asarray(load, dtype=np.float64)
    count = greedy_replication(load, num_slots, prefer_larger_id=False).replica_count
    largest_replica = (load / count).max(axis=1)
    mean = load.sum(axis=1) / ep_size
    return LowerBound(np.maximum(mean, largest_replica), mean)
