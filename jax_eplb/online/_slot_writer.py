"""The jitted rebalance step: rewrite only the slots whose expert changed, in place.

Logical experts are read on the host from an ``ExpertSource`` (in-memory arrays, or a
memory-mapped checkpoint), one row at a time. A changed slot is filled from a device copy when
one exists (ours; TensorRT-LLM always copies from host memory): some slot that holds the expert
now and keeps it through this update (a "stable" source, so no write of the update can clobber
it). A source on the same rank is a local copy; one on rank ``src`` feeding rank ``dst`` is
moved by a ``ppermute`` with the static shift ``(dst - src) mod R``, one row per rank per round
(each shift compiles once, so at most ``R`` small programs whatever the plans). Slots with no
such source are written from the host source: a round moves one expert row to every rank that
still has one (ranks with none write nothing), through a ``shard_map``-ed
``dynamic_update_slice`` on the donated slot buffers.

Device-to-device links (NVLink) are much faster than the host link (PCIe), and with
migration-aware plans most moves are new replicas of experts already resident; so device copies
are the default on GPUs. On CPU, host and device memory are one memory and the copy rounds only
add steps (``scripts/bench_rebalance.py``), so the default is the host path. Shapes never depend
on the plan; no device holds more than its own slots plus one incoming row per tensor. Every
expert-local tensor (all leaves of the expert pytree) moves together.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jax_eplb.moe import ExpertSource, as_expert_source
from jax_eplb.sharding import EP_AXIS, num_ranks, over_ranks, platform


class LayerMove(NamedTuple):
    slots_moved: int
    bytes_moved: int
    rounds: int
    seconds: float
    slots_from_devices: int = 0  # of slots_moved, copied from a slot already on a device


def _as_bits(x):
    """FP8 leaves as their bytes (uint8): XLA:CPU moves float8 arrays through slow emulated
    elementwise code (a 12 MB rewrite took seconds); the bytes are the same."""
    if jnp.dtype(x.dtype).itemsize == 1 and jnp.issubdtype(x.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(x, jnp.uint8)
    return x


def _write_body(experts, layer, local_slot, rows):
    """Per rank: experts leaves ``[Lm, m, ...]``, layer ``[]``, local_slot ``[1]`` (m = none),
    rows leaves ``[1, ...]``."""
    def write(w, row):
        if _as_bits(w) is not w:
            return jax.lax.bitcast_convert_type(write(_as_bits(w), _as_bits(row.astype(w.dtype))), w.dtype)
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


def _peer_body(experts, layer, source_local, target_local, *, shift: int, num_ranks: int):
    """Per rank: send local slot ``source_local[0]`` (m = none) ``shift`` ranks ahead; write what
    arrives into local slot ``target_local[0]`` (m = none)."""
    def row_of(w):
        if _as_bits(w) is not w:
            return jax.lax.bitcast_convert_type(row_of(_as_bits(w)), w.dtype)
        m = w.shape[1]
        slot = jnp.minimum(source_local[0], m - 1)
        row = jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False), slot, 1, 0)
        if shift:
            row = jax.lax.ppermute(row, EP_AXIS, [(r, (r + shift) % num_ranks) for r in range(num_ranks)])
        return row

    return _write_body(experts, layer, target_local, jax.tree.map(row_of, experts))


class SlotWriter:
    """Writes changed slots of one layer: device copies where possible, else the host master copy.

    Args:
      device_copies: fill slots from resident copies (default: on GPU meshes only; see above).
    """

    def __init__(self, mesh, device_copies: bool | None = None):
        self.mesh = mesh
        self.device_copies = platform(mesh) == "gpu" if device_copies is None else device_copies
        self.num_ranks = num_ranks(mesh)
        spec = P(None, EP_AXIS)
        fn = jax.shard_map(_write_body, mesh=mesh, in_specs=(spec, P(), P(EP_AXIS), P(EP_AXIS)), out_specs=spec,
                           check_vma=False)
        self._step = jax.jit(fn, donate_argnums=(0,))
        self._row_sharding = over_ranks(mesh)
        self._peer_steps = {}  # shift -> jitted ppermute-and-write step

    def compilations(self) -> int:
        """Compiled programs: the host-row write, plus one per rank shift used by device copies."""
        return self._step._cache_size() + sum(step._cache_size() for step in self._peer_steps.values())

    def _peer_step(self, shift: int):
        if shift not in self._peer_steps:
            spec = P(None, EP_AXIS)
            fn = jax.shard_map(functools.partial(_peer_body, shift=shift, num_ranks=self.num_ranks), mesh=self.mesh,
                               in_specs=(spec, P(), P(EP_AXIS), P(EP_AXIS)), out_specs=spec, check_vma=False)
            self._peer_steps[shift] = jax.jit(fn, donate_argnums=(0,))
        return self._peer_steps[shift]

    def warm_up(self, experts):
        """Compiles every program a rebalance can need (each rank shift of device copies) by running
        them as no-ops on ``experts`` (donated; returned), so no rebalance stalls on a compile."""
        per_rank = jax.tree.leaves(experts)[0].shape[1] // self.num_ranks
        none = jax.device_put(np.full(self.num_ranks, per_rank, np.int32), self._row_sharding)
        for shift in range(self.num_ranks) if self.device_copies else ():
            experts = self._peer_step(shift)(experts, jnp.int32(0), none, none)
        return jax.block_until_ready(experts)

    def _device_sources(self, old_slots: np.ndarray, new_slots: np.ndarray, changed: np.ndarray):
        """-> ({shift: [per source rank: [(source local, target local), ...]]}, slots left for the host)."""
        per_rank = old_slots.shape[0] // self.num_ranks
        stable = np.flatnonzero(old_slots == new_slots)
        queues = {}
        from_host = []
        for slot in changed:
            sources = stable[old_slots[stable] == new_slots[slot]]
            if sources.size == 0:
                from_host.append(slot)
                continue
            target_rank = slot // per_rank
            # A source on the same rank first (local copy), else the one whose shift queue is shortest.
            def cost(source):
                shift = (target_rank - source // per_rank) % self.num_ranks
                return (shift != 0, len(queues.get(shift, {}).get(source // per_rank, ())))
            source = min(sources, key=cost)
            shift = (target_rank - source // per_rank) % self.num_ranks
            queues.setdefault(shift, {}).setdefault(source // per_rank, []).append((source % per_rank, slot % per_rank))
        return queues, np.asarray(from_host, np.int64)

    def _copy_from_devices(self, experts, layer: int, queues, per_rank: int):
        rounds = 0
        for shift, by_source in sorted(queues.items()):
            for step in range(max(len(q) for q in by_source.values())):
                source_local = np.full(self.num_ranks, per_rank, np.int32)
                target_local = np.full(self.num_ranks, per_rank, np.int32)
                for source_rank, queue in by_source.items():
                    if step < len(queue):
                        source_local[source_rank] = queue[step][0]
                        target_local[(source_rank + shift) % self.num_ranks] = queue[step][1]
                experts = self._peer_step(shift)(experts, jnp.int32(layer),
                                                 jax.device_put(source_local, self._row_sharding),
                                                 jax.device_put(target_local, self._row_sharding))
                rounds += 1
        return experts, rounds

    def move_layer(self, experts, source: ExpertSource, layer: int, old_slots: np.ndarray, new_slots: np.ndarray, *,
                   from_devices: bool | None = None):
        """experts: slot pytree ``[Lm, S, ...]`` (donated); source: host experts (``ExpertSource``, or
        logical arrays ``[Lm, E, ...]``).

        ``from_devices``: fill a slot from a device copy of its expert where one exists (else every
        changed slot comes from the host source); default ``device_copies``.
        Returns (new experts, LayerMove)."""
        start = time.perf_counter()
        from_devices = self.device_copies if from_devices is None else from_devices
        per_rank = old_slots.shape[0] // self.num_ranks
        changed = np.flatnonzero(old_slots != new_slots)
        peer_rounds = 0
        from_host = changed
        if from_devices and changed.size:
            peer_queues, from_host = self._device_sources(old_slots, new_slots, changed)
            experts, peer_rounds = self._copy_from_devices(experts, layer, peer_queues, per_rank)
        experts, rounds = self._copy_from_host(experts, as_expert_source(source), layer, from_host, new_slots, per_rank)
        jax.block_until_ready(experts)
        bytes_per_slot = sum(int(np.prod(leaf.shape[2:])) * leaf.dtype.itemsize for leaf in jax.tree.leaves(experts))
        return experts, LayerMove(int(changed.size), int(changed.size) * bytes_per_slot, rounds + peer_rounds,
                                  time.perf_counter() - start, int(changed.size - from_host.size))

    def _copy_from_host(self, experts, source: ExpertSource, layer: int, slots: np.ndarray, new_slots: np.ndarray,
                        per_rank: int):
        """Writes ``slots`` from the host source, one row per rank per round."""
        queues = [[s % per_rank for s in slots if s // per_rank == r] for r in range(self.num_ranks)]
        rounds = max((len(q) for q in queues), default=0)
        shapes = jax.tree.leaves(source.expert_shapes())
        for step in range(rounds):
            local = np.array([q[step] if step < len(q) else per_rank for q in queues], np.int32)
            # Each rank's row: its expert read from the source (ranks with nothing to write get zeros,
            # which the write masks out), copied once host to device.
            rows = [jax.tree.leaves(source.rows(layer, np.array([new_slots[r * per_rank + local[r]]])))
                    if local[r] < per_rank else [np.zeros((1,) + tuple(s.shape), s.dtype) for s in shapes]
                    for r in range(self.num_ranks)]
            leaves = [jax.make_array_from_callback(
                (self.num_ranks,) + tuple(shape.shape), self._row_sharding,
                lambda idx, i=i: rows[range(self.num_ranks)[idx[0]][0]][i]) for i, shape in enumerate(shapes)]
            experts = self._step(experts, jnp.int32(layer), jax.device_put(local, self._row_sharding),
                                 jax.tree.unflatten(jax.tree.structure(experts), leaves))
        return experts, rounds
