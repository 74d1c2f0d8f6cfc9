"""The two reference planners, reproduced exactly: TensorRT-LLM's greedy and DeepSeek EPLB.

Pure numpy, vectorised over layers. Axis legend: L layers, E experts, S slots (physical
experts), R ranks (GPUs), N nodes, G expert groups.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jax_eplb._errors import EplbInputError
from jax_eplb.planning._introsort import torch_descending_order
from jax_eplb.planning._packing import Packing, greedy_pack, pack_replicas
from jax_eplb.planning._replication import greedy_replication, trtllm_replication


def trtllm_plan(load: np.ndarray, num_slots: int, ep_size: int) -> np.ndarray:
    """TensorRT-LLM's placement: ``[L, E]`` loads -> ``[L, S]`` slot_to_expert.

    Replicas (load/count each) are visited by size descending, expert id ascending; each goes
    to the least-loaded rank with a free slot (ties: lower rank). As TensorRT-LLM's C++
    ``doReplication`` / ``doPlacement``: load factors are ``float`` (float32), sizes and rank
    loads ``double``.
    """
    load = np.asarray(load, dtype=np.float32).astype(np.float64)
    return pack_replicas(load, trtllm_replication(load, num_slots), ep_size)


# ----------------------------------------------------------------------------- DeepSeek EPLB


class DeepSeekPlan(NamedTuple):
    """phy2log: ``[L, S]``; log2phy: ``[L, E, S - E + 1]`` (-1 padded); logcnt: ``[L, E]``."""

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray


def _balanced_packing(weight: np.ndarray, num_packs: int) -> Packing:
    num_rows, num_items = weight.shape
    if num_items // num_packs == 1:
        return Packing(np.broadcast_to(np.arange(num_items), weight.shape).copy(),
                       np.zeros(weight.shape, np.int64))
    # eplb.py: weight.float().sort(descending=True) (torch's order on ties), float32 pack sums.
    return greedy_pack(weight, torch_descending_order(weight), num_packs, dtype=np.float32)


def _replicate(weight: np.ndarray, num_phy: int):
    """phy2log [B, num_phy], phy_rank [B, num_phy], logcnt [B, n]."""
    num_rows, num_log = weight.shape
    greedy = greedy_replication(weight, num_phy, prefer_larger_id=False, dtype=np.float32)
    extra = greedy.order  # [B, X]
    phy2log = np.concatenate([np.broadcast_to(np.arange(num_log), (num_rows, num_log)), extra], axis=1)
    earlier = np.tril(np.ones((extra.shape[1], extra.shape[1]), bool), k=-1)  # [X, X], j' < j
    same = extra[:, :, None] == extra[:, None, :]
    extra_rank = 1 + (same & earlier[None]).sum(axis=2)
    phy_rank = np.concatenate([np.zeros((num_rows, num_log), np.int64), extra_rank], axis=1)
    return phy2log, phy_rank, greedy.replica_count


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int):
    num_layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_phy // num_gpus
    take = lambda a, idx: np.take_along_axis(a, idx, axis=1)

    # 1. expert groups -> nodes.
    # torch sums float32 on CPU in double and rounds once
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(axis=2, dtype=np.float64)
    tokens_per_group = tokens_per_group.astype(np.float32)
    group_packing = _balanced_packing(tokens_per_group, num_nodes)
    group_start = (group_packing.pack * groups_per_node + group_packing.rank_in_pack) * group_size
    log2mlog = (group_start[:, :, None] + np.arange(group_size)).reshape(num_layers, num_log)
    mlog2log = _inverse(log2mlog)
    # 2. replicate inside each node.
    tokens_per_mlog = take(weight, mlog2log).reshape(num_layers * num_nodes, num_log // num_nodes)
    phy2mlog, phy_rank, mlogcnt = _replicate(tokens_per_mlog, num_phy // num_nodes)
    # 3. node's replicas -> its GPUs.
    tokens_per_phy = take(tokens_per_mlog / mlogcnt.astype(np.float32), phy2mlog)
    gpu_packing = _balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(gpu_packing.pack * phy_per_gpu + gpu_packing.rank_in_pack)
    pphy2mlog = take(phy2mlog, pphy2phy)
    node_offset = np.arange(0, num_log, num_log // num_nodes)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1) + node_offset).reshape(num_layers, -1)
    pphy2log = take(mlog2log, pphy2mlog)
    pphy_rank = take(phy_rank, pphy2phy).reshape(num_layers, -1)
    logcnt = take(mlogcnt.reshape(num_layers, -1), log2mlog)
    return pphy2log, pphy_rank, logcnt


def deepseek_rebalance(weight: np.ndarray, num_replicas: int, num_groups: int = 1, num_nodes: int = 1,
                       num_gpus: int = 1) -> DeepSeekPlan:
    """DeepSeek EPLB's ``rebalance_experts``; hierarchical when num_groups % num_nodes == 0.

    Args:
      weight: ``[L, E]`` loads.
      num_replicas: S physical experts; a multiple of num_gpus.
    """
    weight = np.asarray(weight, dtype=np.float32)  # eplb.py: weight.float()
    num_layers, num_log = weight.shape
    if num_replicas < num_log or num_replicas % num_gpus:
        raise EplbInputError(
            f"num_replicas ({num_replicas}) must be >= experts ({num_log}) and divisible by num_gpus ({num_gpus})")
    if num_groups % num_nodes == 0:
        if num_log % num_groups or num_gpus % num_nodes or num_replicas % num_nodes:
            raise EplbInputError(
                f"hierarchical placement needs experts ({num_log}) divisible by num_groups ({num_groups}) "
                f"and num_gpus ({num_gpus}) divisible by num_nodes ({num_nodes})")
        phy2log, phy_rank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phy_rank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_count = num_replicas - num_log + 1
    log2phy = np.full((num_layers, num_log * max_count), -1, np.int64)
    np.put_along_axis(log2phy, phy2log * max_count + phy_rank,
                      np.broadcast_to(np.arange(num_replicas), phy2log.shape), axis=1)
    return DeepSeekPlan(phy2log, log2phy.reshape(num_layers, num_log, max_count), logcnt)


def deepseek_plan(load: np.ndarray, num_slots: int, ep_size: int, num_groups: int = 1,
                  num_nodes: int = 1) -> np.ndarray:
    """``[L, S]`` slot_to_expert from DeepSeek EPLB (global policy with the defaults)."""
    return deepseek_rebalance(load, num_slots, num_groups, num_nodes, ep_size).phy2log
