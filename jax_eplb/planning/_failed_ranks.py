"""Plans with failed ranks: their slots hold ``UNUSED_SLOT`` (-1) and serve nothing.

Two ways, as the peers have them: TensorRT-LLM's mask-only reconfiguration (``mask_failed_ranks``:
the plan in force, the failed ranks' slots dropped, each of their experts served by its remaining
replicas) and a re-plan onto the serving ranks (``plan_placement(..., failed_ranks=...)``).
Axis legend: L layers, S slots, R ranks, m = S/R slots per rank.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from jax_eplb._assignment import UNUSED_SLOT
from jax_eplb._errors import EplbInputError


def serving_ranks(ep_size: int, failed_ranks: Iterable[int]) -> np.ndarray:
    """``[R']`` ascending ranks that still serve; failed ids must be distinct ranks, one rank must remain."""
    failed = [int(r) for r in failed_ranks]
    bad = [r for r in failed if not 0 <= r < ep_size]
    if bad:
        raise EplbInputError(f"failed rank(s) {bad} are not ranks of ep_size={ep_size} (0..{ep_size - 1})")
    if len(set(failed)) != len(failed):
        raise EplbInputError(f"failed ranks {failed} name a rank twice")
    serving = np.setdiff1d(np.arange(ep_size), failed)
    if serving.size == 0:
        raise EplbInputError(f"every rank of ep_size={ep_size} failed; nothing can serve")
    return serving


def mask_failed_ranks(slot_to_expert, ep_size: int, failed_ranks: Iterable[int]) -> np.ndarray:
    """TensorRT-LLM's mask-only reconfiguration of ``slot_to_expert`` ``[L, S]``: the failed ranks'
    slots become ``UNUSED_SLOT``; nothing else moves.

    Raises EplbInputError naming the layer row and experts whose last replica was on a failed rank.
    """
    plan = np.array(slot_to_expert, dtype=np.int32, ndmin=2)
    if plan.shape[1] % ep_size:
        raise EplbInputError(f"{plan.shape[1]} slots cannot be split over ep_size={ep_size}")
    serving = serving_ranks(ep_size, failed_ranks)
    by_rank = plan.reshape(plan.shape[0], ep_size, -1)
    dead = np.ones(ep_size, bool)
    dead[serving] = False
    by_rank[:, dead] = UNUSED_SLOT
    for layer, (before, after) in enumerate(zip(np.array(slot_to_expert, ndmin=2), plan)):
        lost = np.setdiff1d(before[before >= 0], after)
        if lost.size:
            raise EplbInputError(
                f"layer row {layer}: expert(s) {lost[:8].tolist()} have no replica outside failed rank(s) "
                f"{np.flatnonzero(dead).tolist()}; re-plan onto the serving ranks instead")
    return plan


def serving_columns(slot_to_expert: np.ndarray, ep_size: int, ranks: np.ndarray) -> np.ndarray:
    """``[L, S]`` -> ``[L, R' * m]``: the slots of ``ranks``."""
    by_rank = np.asarray(slot_to_expert).reshape(slot_to_expert.shape[0], ep_size, -1)
    return by_rank[:, ranks].reshape(slot_to_expert.shape[0], -1)


def spread_to_ranks(plan: np.ndarray, ep_size: int, ranks: np.ndarray) -> np.ndarray:
    """``[L, R' * m]`` planned over ``ranks`` -> ``[L, S]`` with ``UNUSED_SLOT`` on the other ranks."""
    per_rank = plan.shape[1] // len(ranks)
    out = np.full((plan.shape[0], ep_size, per_rank), UNUSED_SLOT, np.int32)
    out[:, ranks] = plan.reshape(plan.shape[0], len(ranks), per_rank)
    return out.reshape(plan.shape[0], -1)
