"""Device memory of a served model, per device, from the structure the model would be built with.

The model is built abstractly (``nnx.eval_shape``: shapes and dtypes, no weights) from the real
config at the asked geometry, and its arrays are summed by where they live: routed-expert slots
(``SlotParam``, FP8 values and their scales included) are sharded over ``ep`` (each device holds
``S / ep`` slots of every MoE layer); every other parameter and the assignment tables are
replicated. The KV cache is each device's batch rows (``ceil(max_batch_size / ep)``: attention is
data-parallel) x ``max_seq_len`` in every layer. The transient is what the dequantizing path adds
inside the step: the FP8 weights of one decoder layer at a time (the layer scan), dequantized to
the compute dtype right before their matmuls (a rank's routed slots of that layer and the layer's
replicated projections); zero when no weight is FP8.

``check_fits`` compares the total with a device's memory before anything is built.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_eplb._assignment import build_assignment_tables, check_slot_geometry, default_slot_to_expert, widest_replicas
from jax_eplb._errors import EplbInputError
from jax_eplb.model._config import ModelConfig
from jax_eplb.model._decoder import ATTENTIONS
from jax_eplb.model._transformer import MoETransformer
from jax_eplb.model._weights import abstract_model
from jax_eplb.moe import FP8_DTYPE, PlacementTable, SlotParam
from jax_eplb.sharding import ep_mesh

GIB = 2 ** 30


class DeviceMemory(NamedTuple):
    """Bytes on each device (``total_bytes`` = the other four)."""

    routed_expert_bytes: int
    replicated_bytes: int
    kv_cache_bytes: int
    transient_bytes: int
    total_bytes: int


def _nbytes(leaves) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)


def _abstract_model(config: ModelConfig, num_slots: int, ep_size: int) -> MoETransformer:
    """The model's structure (``jax.ShapeDtypeStruct`` leaves) at ``num_slots`` slots; the mesh is
    one local device (shapes do not depend on it: slots split over ``ep`` by the sharding)."""
    slots = np.tile(default_slot_to_expert(config.num_experts, num_slots, ep_size), (config.num_moe_layers, 1))
    tables = build_assignment_tables(slots, config.num_experts, widest_replicas(config.num_experts, num_slots))
    return abstract_model(config, ep_mesh(1), tables)


def device_memory(config: ModelConfig, *, ep_size: int, num_slots: int | None = None,
                  max_batch_size: int = 256) -> DeviceMemory:
    """Per-device bytes of ``config`` served at ``ep_size`` ranks with ``num_slots`` slots (default
    one per expert), a batch of ``max_batch_size`` rows and ``config.max_seq_len`` cache positions."""
    num_slots = config.num_experts if num_slots is None else num_slots
    check_slot_geometry(config.num_experts, num_slots, ep_size)
    if max_batch_size < 1:
        raise EplbInputError(f"--max_batch_size must be >= 1, got {max_batch_size}")
    model = _abstract_model(config, num_slots, ep_size)
    _, slots, tables, params = nnx.split(model, SlotParam, PlacementTable, ...)
    routed = _nbytes(jax.tree.leaves(slots)) // ep_size
    replicated = _nbytes(jax.tree.leaves(params)) + _nbytes(jax.tree.leaves(tables))
    rows = -(-max_batch_size // ep_size)
    layer_cache = ATTENTIONS[config.attention].cache_shape(config, rows)
    kv_cache = _nbytes(jax.tree.leaves(layer_cache)) * config.num_layers
    transient = _transient(model, config, ep_size)
    return DeviceMemory(routed, replicated, kv_cache, transient, routed + replicated + kv_cache + transient)


def _transient(model: MoETransformer, config: ModelConfig, ep_size: int) -> int:
    """One layer's FP8 weights in the compute dtype (the largest layer of either stack)."""
    itemsize = config.jnp_dtype.itemsize
    largest = 0
    for stack in (model.dense_layers, model.moe_layers):
        if stack is None:
            continue
        _, slots, rest = nnx.split(stack, SlotParam, ...)
        layers = jax.tree.leaves(rest)[0].shape[0]

        def fp8_elements(leaves) -> int:
            return sum(int(np.prod(x.shape)) for x in leaves if jnp.dtype(x.dtype) == FP8_DTYPE) // layers

        local_routed = fp8_elements(jax.tree.leaves(slots)) // ep_size
        largest = max(largest, (fp8_elements(jax.tree.leaves(rest)) + local_routed) * itemsize)
    return largest


def device_limit(device) -> int | None:
    """A device's memory in bytes as its runtime reports it (``bytes_limit``), None when it reports none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def check_fits(memory: DeviceMemory, device, what: str) -> None:
    """Refuses in one line when ``memory`` exceeds ``device``'s memory (no check where the device reports none)."""
    limit = device_limit(device)
    if limit is not None and memory.total_bytes > limit:
        raise EplbInputError(
            f"{what} needs {memory.total_bytes / GIB:.1f} GiB per device (routed experts "
            f"{memory.routed_expert_bytes / GIB:.1f}, replicated {memory.replicated_bytes / GIB:.1f}, KV cache "
            f"{memory.kv_cache_bytes / GIB:.1f}, transient {memory.transient_bytes / GIB:.1f}); {device.device_kind} "
            f"has {limit / GIB:.1f} GiB (see jax-eplb memory: more ranks or slots per rank, fewer batch rows or a "
            f"shorter --max_seq_len)")


def format_memory(memory: DeviceMemory, header: str) -> str:
    """The table ``jax-eplb memory`` prints."""
    rows = [("routed experts", memory.routed_expert_bytes), ("replicated weights", memory.replicated_bytes),
            ("KV cache", memory.kv_cache_bytes), ("transient (dequantizing)", memory.transient_bytes),
            ("total", memory.total_bytes)]
    width = max(len(name) for name, _ in rows)
    lines = [header, f"{'per device':<{width}}  {'GiB':>9}  {'bytes':>15}"]
    lines += [f"{name:<{width}}  {value / GIB:>9.2f}  {value:>15,d}" for name, value in rows]
    if memory.transient_bytes:
        lines.append("transient: one decoder layer's FP8 weights (a rank's routed slots and the layer's projections) "
                     "dequantized to the compute dtype inside the step, one layer at a time")
    return "\n".join(lines)
