"""Load metrics as TensorRT-LLM's report defines them, and the metrics of a plan.

Per layer and iteration, over ranks (or slots/experts with ``per_expert``): mean, unbiased std
(N-1) and imbalance = max/mean - 1; each averaged over the iterations.
Axis legend: I iterations, L layers, E experts, S slots, R ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jax_eplb._errors import EplbInputError


class LoadMetrics(NamedTuple):
    """Each ``[L]``, averaged over iterations."""

    mean: np.ndarray
    std: np.ndarray
    imbalance: np.ndarray


def rank_loads_from_counts(counts: np.ndarray, ep_size: int) -> np.ndarray:
    """``[..., X]`` per-expert or per-slot counts -> ``[..., R]`` sums of contiguous blocks."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape[-1] % ep_size:
        raise EplbInputError(f"{counts.shape[-1]} experts/slots cannot be split evenly over ep_size={ep_size}")
    return counts.reshape(*counts.shape[:-1], ep_size, -1).sum(axis=-1)


def imbalance(loads: np.ndarray) -> np.ndarray:
    """``[..., N]`` loads -> ``[...]`` max/mean - 1 (0 where nothing is loaded)."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, loads.max(axis=-1) / mean - 1.0, 0.0)


def load_metrics(loads: np.ndarray, float32: bool = False) -> LoadMetrics:
    """``[I, L, N]`` loads of N units (ranks or slots) -> metrics per layer.

    ``float32``: TensorRT-LLM's report arithmetic (torch on ``.float()`` loads): each iteration's
    mean, std (accumulated in double) and imbalance rounded to float32, their mean over iterations
    too. For integer loads below 2^24 this gives the peer's numbers exactly (its float32 sums are
    exact then, whatever order torch adds in).
    """
    if float32:
        return _float32_metrics(np.asarray(loads, dtype=np.float64))
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean(axis=-1)
    std = loads.std(axis=-1, ddof=1) if loads.shape[-1] > 1 else np.zeros_like(mean)
    return LoadMetrics(mean.mean(axis=0), std.mean(axis=0), imbalance(loads).mean(axis=0))


def _float32_metrics(loads: np.ndarray) -> LoadMetrics:
    f32, count = np.float32, loads.shape[-1]
    values = loads.astype(f32)
    mean = (values.astype(np.float64).sum(axis=-1).astype(f32) / f32(count)).astype(f32)  # [I, L]
    std = (values.astype(np.float64).std(axis=-1, ddof=1) if count > 1 else np.zeros(mean.shape)).astype(f32)
    with np.errstate(invalid="ignore", divide="ignore"):
        imbalance = np.where(mean > 0, values.max(axis=-1) / mean - f32(1), f32(0)).astype(f32)

    def over_iterations(x):
        return (x.astype(np.float64).sum(axis=0).astype(f32) / f32(x.shape[0])).astype(f32).astype(np.float64)

    return LoadMetrics(over_iterations(mean), over_iterations(std), over_iterations(imbalance))


def replica_counts(slot_to_expert: np.ndarray, num_experts: int) -> np.ndarray:
    """``[B, S]`` placements -> ``[B, E]`` int32 slots holding each expert (an unused slot, -1, none)."""
    slot_to_expert = np.asarray(slot_to_expert)
    used = slot_to_expert >= 0
    rows = np.broadcast_to(np.arange(slot_to_expert.shape[0])[:, None], slot_to_expert.shape)
    counts = np.zeros((slot_to_expert.shape[0], num_experts), np.int32)
    np.add.at(counts, (rows[used], slot_to_expert[used]), 1)
    return counts


def project_onto_plan(counts: np.ndarray, slot_to_expert: np.ndarray) -> np.ndarray:
    """Expert counts ``[I, L, E]`` -> slot counts ``[I, L, S]``: each expert's count split evenly
    over its replicas in ``slot_to_expert`` ``[L, S]`` (an unused slot, -1, carries 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    slot_to_expert = np.asarray(slot_to_expert)
    used = slot_to_expert >= 0
    per_replica = counts / np.maximum(replica_counts(slot_to_expert, counts.shape[-1]), 1)[None]
    index = np.broadcast_to(np.where(used, slot_to_expert, 0), (counts.shape[0],) + slot_to_expert.shape)
    return np.where(used, np.take_along_axis(per_replica, index, axis=2), 0.0)


def replica_sizes(load: np.ndarray, slot_to_expert: np.ndarray) -> np.ndarray:
    """``[B, S]`` load carried by each slot when an expert's load splits evenly over its replicas."""
    return project_onto_plan(np.asarray(load)[None], slot_to_expert)[0]


def rank_loads(load: np.ndarray, slot_to_expert: np.ndarray, ep_size: int) -> np.ndarray:
    """``[B, R]`` load of each rank under a plan."""
    return rank_loads_from_counts(replica_sizes(load, slot_to_expert), ep_size)


def duplicate_count(slot_to_expert: np.ndarray, ep_size: int) -> np.ndarray:
    """``[B]`` number of replicas that share a rank with another replica of the same expert."""
    bins = np.sort(slot_to_expert.reshape(slot_to_expert.shape[0], ep_size, -1), axis=2)
    return ((bins[..., 1:] == bins[..., :-1]) & (bins[..., 1:] >= 0)).sum(axis=(1, 2))
