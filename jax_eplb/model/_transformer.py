"""The decoder-only MoE transformer (Flax NNX): embedding, stacked dense and MoE decoder layers,
final norm, LM head. Its MoE layers' slot weights and assignment tables are variables of one
stacked ``EPMoEBlock``; a new placement changes their values, never the compiled step.

Axis legend: B batch (sharded over ``ep``: attention is data-parallel, each rank's requests are
its local tokens), T query tokens, H hidden, V vocab, Lm MoE layers, Ld dense layers, R ranks,
S slots, E experts, M max replicas, X counted ids (E or S).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_eplb._assignment import AssignmentTables
from jax_eplb.model._config import ModelConfig
from jax_eplb.model._decoder import ATTENTIONS, DecoderLayer, LayerStack, layer_runs
from jax_eplb.model._layers import AttentionCache, RMSNorm
from jax_eplb.model._mla import LatentCache
from jax_eplb.model._sampling import Sampling, next_tokens
from jax_eplb.moe import EPMoEBlock, ExpertWeights, MoEOptions, slot_weights_from_logical
from jax_eplb.sharding import num_ranks, stacked_over_ranks


class KVCache(NamedTuple):
    """Attention caches of the dense and the MoE stack, each ``[L, B, C, ...]`` (batch sharded):
    ``AttentionCache`` (keys, values) or, for MLA, ``LatentCache`` (latents, rotary keys)."""

    dense: AttentionCache | LatentCache | None
    moe: AttentionCache | LatentCache


class StepOutput(NamedTuple):
    """next_token ``[B]`` (at each row's last valid position: greedy, or sampled per ``Sampling``); cache; rank_load
    ``[Lm, R]`` entries computed per rank per MoE layer; expert_counts ``[Lm, R, E]``,
    slot_counts ``[Lm, R, S]`` and expert_totals ``[Lm, E]`` (summed over ranks) when recorded,
    else None; logits ``[B, T, V]`` float32 of every position when asked for, else None;
    dispatch_rows ``[Lm, R, 2, R]`` (``MoEOutput.dispatch_rows`` per MoE layer) when recorded;
    rank_rows ``[Lm, R]`` rows computed per rank (routed entries + shared-expert rows)."""

    next_token: jax.Array
    cache: KVCache
    rank_load: jax.Array
    expert_counts: jax.Array | None
    slot_counts: jax.Array | None
    expert_totals: jax.Array | None
    logits: jax.Array | None = None
    dispatch_rows: jax.Array | None = None
    rank_rows: jax.Array | None = None


class MoETransformer(nnx.Module):
    """Decoder-only MoE transformer for sharded inference.

    Args:
      tables: the placement of every MoE layer (``slot_to_expert [Lm, S]``, ``replica_count
        [Lm, E]``, ``expert_slots [Lm, E, M]``); M stays fixed for the model's life.
      options: how the MoE layers run (replica policy, transport, recorded histograms, ...).
    Random initialisation here uses Flax initializers; ``build_model`` loads real or seeded
    weights into the same structure without materialising the random ones.
    """

    def __init__(self, config: ModelConfig, mesh, tables: AssignmentTables, *, options: MoEOptions = MoEOptions(),
                 rngs: nnx.Rngs):
        c, dt = config, config.jnp_dtype
        if tables.slot_to_expert.shape[0] != c.num_moe_layers:
            raise ValueError(f"tables for {tables.slot_to_expert.shape[0]} MoE layers, model has {c.num_moe_layers}")
        self.config, self.mesh = config, mesh
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (c.vocab_size, c.hidden_size), jnp.float32).astype(dt))
        self.dense_layers = LayerStack(lambda _: DecoderLayer(c, mesh, rngs=rngs), c.num_dense_layers,
                                       c.layer_windows(c.dense_layer_ids)) if c.num_dense_layers else None
        self.moe_layers = LayerStack(lambda i: DecoderLayer(c, mesh, tables.layer(i), options=options, rngs=rngs),
                                     c.num_moe_layers, c.layer_windows(c.moe_layer_ids))
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dt)
        init = jax.nn.initializers.normal(c.init_std)
        self.lm_head = nnx.Param(init(rngs.params(), (c.hidden_size, c.vocab_size), dt))

    # ------------------------------------------------------------------ forward

    def __call__(self, tokens, positions, token_mask, cache: KVCache, *, return_logits: bool = False,
                 sampling: Sampling | None = None) -> StepOutput:
        """One step over ``tokens`` ``[B, T]`` at ``positions`` ``[B, T]``.

        ``token_mask`` ``[B, T]`` marks real tokens (False: padding / idle rows: they route to no
        expert, write no cache and are not counted). ``sampling``: per-row temperature / top-p /
        seed (None: greedy).
        """
        b = tokens.shape[0]
        x = self.embed.get_value()[tokens]
        x, cache, moe = self._layers(x, cache, positions=positions, token_mask=token_mask)
        normed = self.final_norm(x)
        last = jnp.maximum(token_mask.sum(axis=1) - 1, 0)  # [B]
        head = self.lm_head.get_value()
        logits = jnp.dot(normed[jnp.arange(b), last], head, preferred_element_type=jnp.float32)  # [B, V]
        all_logits = jnp.dot(normed, head, preferred_element_type=jnp.float32) if return_logits else None
        return StepOutput(next_tokens(logits, sampling), cache, moe.rank_load, moe.expert_counts,
                          moe.slot_counts, moe.expert_totals, all_logits, moe.dispatch_rows, moe.rank_rows)

    def _layers(self, x, cache: KVCache, **layer_inputs):
        """The decoder layers in order: each run of same-kind layers is one scan over its stack's
        slice (one run per kind for DeepSeek-V3, Qwen3-MoE and Mixtral)."""
        runs = layer_runs(self.config)
        caches, moe_outputs = {"dense": [], "moe": []}, []
        for kind, start, stop in runs:
            stack, stack_cache = (self.dense_layers, cache.dense) if kind == "dense" else (self.moe_layers, cache.moe)
            full = (stop - start) == jax.tree.leaves(stack_cache)[0].shape[0]
            run_cache = stack_cache if full else jax.tree.map(lambda a: a[start:stop], stack_cache)
            x, run_cache, aux = stack(x, run_cache, start=0 if full else start, stop=None if full else stop,
                                      **layer_inputs)
            caches[kind].append(run_cache)
            if kind == "moe":
                moe_outputs.append(aux)
        joined = {kind: _concat(parts) for kind, parts in caches.items()}
        return x, KVCache(joined["dense"], joined["moe"]), _concat(moe_outputs)

    def init_cache(self, batch: int) -> KVCache:
        """Zeroed cache for ``batch`` rows (a multiple of ep), batch sharded over ``ep``."""
        if batch % self.num_ranks:
            raise ValueError(f"batch {batch} must be a multiple of ep={self.num_ranks} (rows are split over ranks)")
        c, sharding = self.config, stacked_over_ranks(self.mesh)

        def zeros(layers):
            shapes = ATTENTIONS[c.attention].cache_shape(c, batch)
            return type(shapes)(*(jax.device_put(jnp.zeros((layers,) + s.shape, s.dtype), sharding) for s in shapes))

        return KVCache(zeros(c.num_dense_layers) if c.num_dense_layers else None, zeros(c.num_moe_layers))

    # ------------------------------------------------------------------ placement

    @property
    def moe_block(self) -> EPMoEBlock:
        """The MoE layers' block, its variables stacked ``[Lm, ...]``."""
        return self.moe_layers.layers.mlp

    @property
    def num_ranks(self) -> int:
        return num_ranks(self.mesh)

    @property
    def num_slots(self) -> int:
        return int(self.moe_block.slot_to_expert.get_value().shape[-1])

    @property
    def options(self) -> MoEOptions:
        return self.moe_block.options

    def tables(self) -> AssignmentTables:
        return self.moe_block.tables()

    def set_tables(self, tables: AssignmentTables) -> None:
        """Swaps the tables of every MoE layer (the caller has moved the slot weights)."""
        self.moe_block.set_tables(tables)

    def slot_experts(self) -> ExpertWeights:
        return self.moe_block.slot_experts()

    def set_slot_experts(self, experts: ExpertWeights) -> None:
        self.moe_block.set_slot_experts(experts)

    def set_placement(self, tables: AssignmentTables, experts) -> None:
        """Re-lays every MoE layer's experts from a host source (``ExpertSource`` or logical
        ``[Lm, E, ...]`` arrays) under ``tables``; nothing recompiles."""
        self.set_slot_experts(slot_weights_from_logical(experts, tables.slot_to_expert, self.mesh))
        self.set_tables(tables)


def _concat(parts: list):
    """Stacked outputs of several runs of one stack, joined on the layer axis (None: no run)."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *parts)
