"""Packing replicas onto ranks: the greedy capacity-constrained packer shared by the planners.

Pure NumPy and a heap per row (layer). Axis legend: B rows, N items, P packs (ranks).
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

import numpy as np


class Packing(NamedTuple):
    """pack: ``[B, N]`` pack of each item; rank_in_pack: ``[B, N]`` its position in the pack."""

    pack: np.ndarray
    rank_in_pack: np.ndarray


def greedy_pack(item_size: np.ndarray, item_order: np.ndarray, num_packs: int, dtype=np.float64) -> Packing:
    """Visits items in ``item_order`` and puts each on the lightest pack that has room.

    Every pack takes exactly N / P items; ties go to the lower pack index; a pack's positions
    are filled in visiting order.

    Args:
      item_size: ``[B, N]`` item sizes.
      item_order: ``[B, N]`` item indices in visiting order.
      dtype: arithmetic of the pack loads (float32 reproduces DeepSeek EPLB's torch float32 sums).
    """
    item_size = np.asarray(item_size, dtype=dtype)
    num_rows, num_items = item_size.shape
    per_pack = num_items // num_packs
    pack = np.zeros((num_rows, num_items), np.int64)
    rank_in_pack = np.zeros((num_rows, num_items), np.int64)
    for row in range(num_rows):
        # (load, pack) heap of the packs with room: the lightest first, the lower index on ties.
        # Loads are NumPy scalars of ``dtype``, so the sums round exactly as a vectorised version would.
        open_packs = [(dtype(0), p) for p in range(num_packs)]
        fill = [0] * num_packs
        sizes = item_size[row]
        for item in item_order[row].tolist():
            level, chosen = heapq.heappop(open_packs)
            pack[row, item], rank_in_pack[row, item] = chosen, fill[chosen]
            fill[chosen] += 1
            if fill[chosen] < per_pack:
                heapq.heappush(open_packs, (level + sizes[item], chosen))
    return Packing(pack, rank_in_pack)


def descending_order(size: np.ndarray) -> np.ndarray:
    """``[B, N]`` indices sorting each row by size descending; ties keep index order."""
    size = np.asarray(size)
    return np.argsort(-size.astype(np.result_type(size.dtype, np.float32)), axis=1, kind="stable")


def expand_replicas(replica_count: np.ndarray) -> np.ndarray:
    """``[L, S]`` expert of each replica, experts ascending (expert e repeated count[e] times)."""
    ends = np.cumsum(replica_count, axis=1)  # [L, E]
    num_slots = int(ends[0, -1])
    slot = np.arange(num_slots)
    return (slot[None, :, None] >= ends[:, None, :]).sum(axis=2)


def pack_replicas(load: np.ndarray, replica_count: np.ndarray, ep_size: int) -> np.ndarray:
    """Greedy packing of replicas: ``[B, E]`` loads and counts -> ``[B, S]`` slot_to_expert.

    Replicas (load/count each) are visited by size descending, expert id ascending; each goes to
    the least-loaded rank with a free slot (ties: lower rank), filling its slots in order.
    """
    item_expert = expand_replicas(replica_count)  # [B, S], experts ascending
    item_size = np.take_along_axis(load / replica_count, item_expert, axis=1)
    packing = greedy_pack(item_size, descending_order(item_size), ep_size)
    slot = packing.pack * (item_expert.shape[1] // ep_size) + packing.rank_in_pack
    slot_to_expert = np.empty_like(item_expert)
    np.put_along_axis(slot_to_expert, slot, item_expert, axis=1)
    return slot_to_expert
