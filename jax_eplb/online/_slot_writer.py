"""The jitted rebalance step: rewrite only the slots whose expert changed, in place.

The master copy of all logical experts stays in host memory (NumPy, ``[Lm, E, ...]``). For one
layer, each rank's changed local slots are written in rounds; a round moves one expert row to
every rank that still has a changed slot (ranks with none rewrite a row with itself), through a
``shard_map``-ed ``dynamic_update_slice`` on the donated slot buffers. Shapes never depend on
the plan, so the step compiles once; no device ever holds more than its own slots plus one
incoming row per tensor. Every expert-local tensor (all leaves of the expert pytree: weights,
and scales or biases if a model has them) moves together.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_eplb.moe import EP_AXIS


class LayerMove(NamedTuple):
    slots_moved: int
    bytes_moved: int
    rounds: int
    seconds: float


def _write_body(experts, layer, local_slot, rows):
    """Per rank: experts leaves ``[Lm, m, ...]``, layer ``[]``, local_slot ``[1]`` (m = none),
    rows leaves ``[1, ...]``."""
    def write(w, row):
        m = w.shape[1]
        slot = local_slot[0]
        valid = slot < m
        index = jnp.minimum(slot, m - 1)
        old = jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False),
                                           index, 1, axis=0)
        new = jnp.where(valid, row.astype(w.dtype), old)
        start = (layer, index) + (0,) * (w.ndim - 2)
        return jax.lax.dynamic_update_slice(w, new[None], start)

    return jax.tree.map(write, experts, rows)


class SlotWriter:
    """Writes changed slots of one layer from the host master copy (one compiled step)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.num_ranks = int(mesh.shape[EP_AXIS])
        spec = P(None, EP_AXIS)
        fn = jax.shard_map(_write_body, mesh=mesh, in_specs=(spec, P(), P(EP_AXIS), P(EP_AXIS)), out_specs=spec,
                           check_vma=False)
        self._step = jax.jit(fn, donate_argnums=(0,))
        self._row_sharding = NamedSharding(mesh, P(EP_AXIS))

    def compilations(self) -> int:
        return self._step._cache_size()

    def move_layer(self, experts, master, layer: int, old_slots: np.ndarray, new_slots: np.ndarray):
        """experts: slot pytree ``[Lm, S, ...]`` (donated); master: host pytree ``[Lm, E, ...]``.

        Returns (new experts, LayerMove)."""
        start = time.perf_counter()
        num_slots = old_slots.shape[0]
        per_rank = num_slots // self.num_ranks
        changed = np.flatnonzero(old_slots != new_slots)
        queues = [[s % per_rank for s in changed if s // per_rank == r] for r in range(self.num_ranks)]
        rounds = max((len(q) for q in queues), default=0)
        leaves, treedef = jax.tree.flatten(master)
        for step in range(rounds):
            local = np.array([q[step] if step < len(q) else per_rank for q in queues], np.int32)
            experts_for_rank = [int(new_slots[r * per_rank + local[r]]) if local[r] < per_rank else 0
                                for r in range(self.num_ranks)]
            # Each rank's shard is a view of its row in the master copy: copied once, host to device.
            rows = [jax.make_array_from_callback(
                (self.num_ranks,) + leaf.shape[2:], self._row_sharding,
                lambda idx, leaf=leaf: leaf[layer, experts_for_rank[range(self.num_ranks)[idx[0]][0]]][None])
                for leaf in leaves]
            experts = self._step(experts, jnp.int32(layer), jax.device_put(local, self._row_sharding),
                                 jax.tree.unflatten(treedef, rows))
        jax.block_until_ready(experts)
        bytes_per_slot = sum(int(np.prod(leaf.shape[2:])) * leaf.dtype.itemsize for leaf in leaves)
        return experts, LayerMove(int(changed.size), int(changed.size) * bytes_per_slot, rounds,
                                  time.perf_counter() - start)
