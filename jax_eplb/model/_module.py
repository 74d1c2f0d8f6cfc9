"""The Flax NNX model: weights and the device-resident assignment tables as NNX state.

``MoETransformer`` owns its weights (``nnx.Param``) and placement (``PlacementTables``
variables); ``prefill``/``decode`` run the jitted pure step (``_forward.decoder_step``).
Changing the placement swaps table values and slot weights: nothing recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_eplb._assignment import AssignmentTables, build_assignment_tables
from jax_eplb.model._config import ModelConfig
from jax_eplb.model._forward import KVCache, MoEOptions, StepOutput, batch_sharding, init_cache, jit_step
from jax_eplb.model._weights import ModelWeights
from jax_eplb.moe import slot_weights_from_logical


class PlacementTable(nnx.Variable):
    """An assignment table (not trained; device-resident, replicated)."""


class MoETransformer(nnx.Module):
    """Decoder-only MoE transformer for sharded inference.

    Args:
      weights: with ``moe.experts`` already laid into the slots of ``tables`` (``[Lm, S, ...]``
        sharded over ``ep``) and everything else replicated on ``mesh``.
      tables: the placement, ``slot_to_expert [Lm, S]``.
      max_replicas: fixed width M of ``expert_slots`` so every later plan keeps the shape (default:
        S - E + 1, the most replicas one expert can have).
    """

    def __init__(self, config: ModelConfig, mesh, weights: ModelWeights, tables: AssignmentTables,
                 options: MoEOptions = MoEOptions(), max_replicas: int | None = None):
        self.config, self.mesh, self.options = config, mesh, options
        self.max_replicas = max_replicas or tables.num_slots - tables.num_experts + 1
        self.weights = nnx.Param(weights)
        replicated = NamedSharding(mesh, P())
        self.slot_to_expert = PlacementTable(jax.device_put(tables.slot_to_expert, replicated))
        self.replica_count = PlacementTable(jax.device_put(tables.replica_count, replicated))
        self.expert_slots = PlacementTable(jax.device_put(self._padded(tables).expert_slots, replicated))
        self._step = jit_step(config, mesh, options)
        self._compiled = {}  # (batch, length) -> ahead-of-time compiled step

    @property
    def num_slots(self) -> int:
        return int(self.slot_to_expert.get_value().shape[-1])

    @property
    def num_ranks(self) -> int:
        return int(self.mesh.shape["ep"])

    def _padded(self, tables: AssignmentTables) -> AssignmentTables:
        return build_assignment_tables(tables.slot_to_expert, self.config.num_experts, self.max_replicas)

    def set_placement(self, tables: AssignmentTables, logical_experts) -> None:
        """Re-lays the experts from host ``logical_experts`` ``[Lm, E, ...]`` under a new plan."""
        tables = self._padded(tables)
        if tables.slot_to_expert.shape != tuple(self.slot_to_expert.get_value().shape):
            raise ValueError(f"new plan has shape {tables.slot_to_expert.shape}, model has "
                             f"{tuple(self.slot_to_expert.get_value().shape)}")
        weights = self.weights.get_value()
        experts = slot_weights_from_logical(logical_experts, tables.slot_to_expert, self.mesh)
        self.weights.set_value(weights._replace(moe=weights.moe._replace(experts=experts)))
        self.set_tables(tables)

    def set_tables(self, tables: AssignmentTables) -> None:
        """Swaps the assignment tables only (the caller has already moved the slot weights)."""
        tables = self._padded(tables)
        replicated = NamedSharding(self.mesh, P())
        for var, value in ((self.slot_to_expert, tables.slot_to_expert), (self.replica_count, tables.replica_count),
                           (self.expert_slots, tables.expert_slots)):
            var.set_value(jax.device_put(value, replicated))

    def new_cache(self, batch: int) -> KVCache:
        if batch % self.num_ranks:
            raise ValueError(f"batch {batch} must be a multiple of ep={self.num_ranks} (rows are split over ranks)")
        return init_cache(self.config, batch, self.mesh)

    def _run(self, tokens, positions, mask, cache) -> StepOutput:
        shard = batch_sharding(self.mesh)
        tokens, positions, mask = (jax.device_put(np.asarray(a), shard) for a in (tokens, positions, mask))
        step = self._compiled.get(tokens.shape, self._step)
        return step(self.weights.get_value(), self.replica_count.get_value(), self.expert_slots.get_value(),
                    tokens, positions, mask, cache)

    def mixed(self, prompts, lengths, decode_tokens, decode_positions, decoding, cache: KVCache,
              starts=None) -> StepOutput:
        """One iteration with both phases (in-flight batching): rows with ``lengths > 0`` prefill
        ``prompts`` ``[B, P]`` (a whole prompt, or with ``starts`` ``[B]`` a chunk of one that begins
        at that position: chunked prefill; a row's next token is that of its chunk's last token);
        rows with ``decoding`` ``[B]`` decode one token (``decode_tokens``/``decode_positions``
        ``[B]``) in column 0; other rows are idle."""
        tokens = np.array(prompts, np.int32)
        column = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
        mask = column < np.asarray(lengths)[:, None]
        positions = column + (0 if starts is None else np.asarray(starts, np.int32)[:, None])
        rows = np.flatnonzero(np.asarray(decoding))
        tokens[rows, 0] = np.asarray(decode_tokens)[rows]
        positions[rows, 0] = np.asarray(decode_positions)[rows]
        mask[rows, 0] = True
        return self._run(tokens, positions, mask, cache)

    def prefill(self, tokens, lengths, cache: KVCache) -> StepOutput:
        """tokens ``[B, P]`` right-padded, lengths ``[B]`` (0 = empty row)."""
        idle = np.zeros(len(lengths), np.int32)
        return self.mixed(tokens, lengths, idle, idle, idle.astype(bool), cache)

    def decode(self, tokens, positions, active, cache: KVCache) -> StepOutput:
        """tokens, positions, active: ``[B]``; one new token per active row."""
        col = lambda a, dtype: np.asarray(a, dtype)[:, None]  # noqa: E731
        return self._run(col(tokens, np.int32), col(positions, np.int32), col(active, bool), cache)

    def compile(self, batch: int, prefill_len: int) -> None:
        """Compiles the prefill and decode shapes ahead of time (so timing excludes compilation)."""
        for length in (prefill_len, 1):
            shape = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=batch_sharding(self.mesh))
            mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_, sharding=batch_sharding(self.mesh))
            cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                 self.new_cache(batch))
            self._compiled[(batch, length)] = self._step.lower(
                self.weights.get_value(), self.replica_count.get_value(), self.expert_slots.get_value(),
                shape, shape, mask, cache).compile()
