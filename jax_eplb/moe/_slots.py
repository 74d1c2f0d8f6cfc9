"""Laying experts into slots: host experts (any ``ExpertSource``) -> slot weights sharded over ``ep``.

Axis legend: L MoE layers, E experts, S slots, n rows read at once.

Each device's shard is read from the source for that device's own slots only (a replicated
expert is read once per layer and process), one layer at a time into a preallocated device
buffer: no device ever holds all experts, and the host holds at most one layer's experts.
Experts are pytrees: each of gate, up, down an array or a ``BlockFp8`` (FP8 values and block
scales, moved together leaf by leaf).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jax_eplb._assignment import UNUSED_SLOT
from jax_eplb.moe._types import ExpertWeights
from jax_eplb.sharding import over_ranks, stacked_over_ranks


class ExpertSource(Protocol):
    """Host copies of the logical experts of every MoE layer, read by rows."""

    def expert_shapes(self) -> ExpertWeights:
        """``jax.ShapeDtypeStruct`` leaves of one expert's gate, up ``[H, F]`` and down ``[F, H]`` (an
        FP8 source: ``BlockFp8`` of the values' and the scales' shapes)."""

    def rows(self, layer: int, experts: np.ndarray) -> ExpertWeights:
        """Host arrays ``[n, ...]`` of ``experts`` ``[n]`` of MoE layer ``layer`` (0-based), in the
        structure of ``expert_shapes``."""


class HostExperts(NamedTuple):
    """An ``ExpertSource`` over in-memory arrays ``[L, E, ...]``."""

    experts: ExpertWeights

    def expert_shapes(self) -> ExpertWeights:
        return jax.tree.map(lambda w: jax.ShapeDtypeStruct(np.shape(w)[2:], np.asarray(w).dtype), self.experts)

    def rows(self, layer: int, experts: np.ndarray) -> ExpertWeights:
        return jax.tree.map(lambda w: np.asarray(w[layer])[experts], self.experts)


def as_expert_source(experts) -> ExpertSource:
    """An ``ExpertSource`` as it is; logical ``ExpertWeights`` ``[L, E, ...]`` wrapped as host arrays."""
    if isinstance(experts, ExpertWeights):
        return HostExperts(jax.tree.map(np.asarray, experts))
    return experts


def slot_weights_from_logical(experts, slot_to_expert, mesh) -> ExpertWeights:
    """Slot weights sharded over ``ep`` on the slot axis.

    ``slot_to_expert`` ``[L, S]`` -> ``[L, S, ...]`` from an ``ExpertSource`` (or logical
    ``ExpertWeights`` ``[L, E, ...]``); ``[S]`` -> ``[S, ...]`` from logical ``[E, ...]`` (one layer).
    """
    index = np.asarray(slot_to_expert)
    if index.ndim == 1 and jax.process_count() == 1 and all(_on_platform_of(w, mesh) for w in jax.tree.leaves(experts)):
        index = jnp.asarray(index, jnp.int32)  # gathered on the devices: no host round trip
        return jax.tree.map(lambda w: _gather_on_device(w, index, over_ranks(mesh)), experts)
    if index.ndim == 1:
        one_layer = jax.tree.map(lambda w: np.asarray(w)[None], experts)
        return _layer_slots(HostExperts(one_layer), 0, index, mesh)
    source = as_expert_source(experts)
    buffers = zero_slot_buffers(source.expert_shapes(), index.shape, mesh)
    for layer in range(index.shape[0]):
        buffers = set_layer_slots(buffers, _layer_slots(source, layer, index[layer], mesh), layer)
    return buffers


def _on_platform_of(weights, mesh) -> bool:
    """Whether ``weights`` is a concrete device array on the platform of ``mesh`` (not host data, not a tracer)."""
    try:
        return {d.platform for d in weights.devices()} == {mesh.devices.flat[0].platform}
    except Exception:  # noqa: BLE001 - NumPy arrays, tracers and the like have no (concrete) devices
        return False


@functools.partial(jax.jit, static_argnums=2)
def _gather_on_device(logical: jax.Array, slot_experts: jax.Array, sharding) -> jax.Array:
    """``[E, ...]`` -> ``[S, ...]`` laid out by ``sharding`` (unused slots, -1, zero), on the devices."""
    rows = jnp.take(logical, jnp.maximum(slot_experts, 0), axis=0)
    used = (slot_experts >= 0).reshape((-1,) + (1,) * (logical.ndim - 1))
    return jax.lax.with_sharding_constraint(jnp.where(used, rows, jnp.zeros((), logical.dtype)), sharding)


def _layer_slots(source: ExpertSource, layer: int, slot_experts: np.ndarray, mesh) -> ExpertWeights:
    """``[S, ...]`` of one layer; each device reads its own slots (each expert once per process)."""
    shapes, structure = jax.tree.flatten(source.expert_shapes())
    read: dict[int, list[np.ndarray]] = {}  # expert -> its leaves

    def rows_of(experts: np.ndarray) -> list[np.ndarray]:
        missing = np.unique([e for e in experts if int(e) not in read]).astype(np.int64)
        if missing.size:
            if UNUSED_SLOT in missing:  # a slot serving nothing holds zeros
                read[UNUSED_SLOT] = [np.zeros(s.shape, s.dtype) for s in shapes]
                missing = missing[missing != UNUSED_SLOT]
            leaves = jax.tree.leaves(source.rows(layer, missing)) if missing.size else []
            for n, e in enumerate(missing):
                read[int(e)] = [leaf[n] for leaf in leaves]
        return [np.stack(leaf) for leaf in zip(*(read[int(e)] for e in experts))]

    def leaf(i: int):
        shape = (slot_experts.shape[0],) + tuple(shapes[i].shape)
        return jax.make_array_from_callback(shape, over_ranks(mesh),
                                            lambda idx: rows_of(slot_experts[idx[0]])[i].astype(shapes[i].dtype))

    return jax.tree.unflatten(structure, [leaf(i) for i in range(len(shapes))])


def zero_slot_buffers(shapes: ExpertWeights, index_shape: tuple[int, int], mesh) -> ExpertWeights:
    """Zeroed ``[L, S, ...]`` slot weights of one expert's ``shapes``, sharded over ``ep``."""
    sharding = stacked_over_ranks(mesh)
    return jax.tree.map(lambda s: jax.jit(functools.partial(jnp.zeros, index_shape + tuple(s.shape), s.dtype),
                                          out_shardings=sharding)(), shapes)


@functools.partial(jax.jit, donate_argnums=(0,))
def set_layer_slots(buffers: ExpertWeights, layer_slots: ExpertWeights, layer) -> ExpertWeights:
    """``buffers`` ``[L, S, ...]`` (donated) with layer ``layer`` replaced by ``layer_slots`` ``[S, ...]``."""
    return jax.tree.map(lambda b, s: jax.lax.dynamic_update_index_in_dim(b, s.astype(b.dtype), layer, 0),
                        buffers, layer_slots)
