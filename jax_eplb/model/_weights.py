"""Model weights as pytrees, seeded random initialisation, and laying experts into slots.

Axis legend: V vocab, H hidden, D = heads*head_dim, G = kv_heads*head_dim, Fd dense FFN,
Ld dense layers, Lm MoE layers, E experts, S slots, F expert FFN, Fs shared FFN.

Expert weights are a pure function of (seed, MoE layer, expert id), so slot weights can be
generated per shard directly under any placement (no device or host ever holds all experts),
and equal the logical weights laid out by the plan (``moe.slot_weights_from_logical``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_eplb._synthetic import expert_popularity
from jax_eplb.model._config import ModelConfig
from jax_eplb.moe import EP_AXIS, ExpertWeights, RouterWeights


class AttentionWeights(NamedTuple):
    norm: jax.Array  # [L, H]
    wq: jax.Array  # [L, H, D]
    wk: jax.Array  # [L, H, G]
    wv: jax.Array  # [L, H, G]
    wo: jax.Array  # [L, D, H]


class DenseLayers(NamedTuple):
    attention: AttentionWeights
    mlp_norm: jax.Array  # [Ld, H]
    mlp: ExpertWeights  # gate/up [Ld, H, Fd], down [Ld, Fd, H]


class MoELayers(NamedTuple):
    attention: AttentionWeights
    mlp_norm: jax.Array  # [Lm, H]
    router: RouterWeights  # kernel [Lm, H, E], correction_bias [Lm, E]
    experts: ExpertWeights  # [Lm, X, H, F] / [Lm, X, F, H]; X = E (logical) or S (slots, sharded over ep)
    shared: ExpertWeights | None  # [Lm, H, Fs] / [Lm, Fs, H]


class ModelWeights(NamedTuple):
    embed: jax.Array  # [V, H]
    dense: DenseLayers | None
    moe: MoELayers
    final_norm: jax.Array  # [H]
    lm_head: jax.Array  # [H, V]


def _normal(key, shape, std, dtype):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def _attention(key, config: ModelConfig, layers: int) -> AttentionWeights:
    c, k = config, jax.random.split(key, 4)
    dt, d, g = c.jnp_dtype, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return AttentionWeights(jnp.ones((layers, c.hidden_size), dt), _normal(k[0], (layers, c.hidden_size, d), c.init_std, dt),
                            _normal(k[1], (layers, c.hidden_size, g), c.init_std, dt),
                            _normal(k[2], (layers, c.hidden_size, g), c.init_std, dt),
                            _normal(k[3], (layers, d, c.hidden_size), c.init_std, dt))


def _mlp(key, layers: int, hidden: int, ffn: int, std: float, dtype) -> ExpertWeights:
    k = jax.random.split(key, 3)
    return ExpertWeights(_normal(k[0], (layers, hidden, ffn), std, dtype), _normal(k[1], (layers, hidden, ffn), std, dtype),
                         _normal(k[2], (layers, ffn, hidden), std, dtype))


def router_bias(config: ModelConfig) -> np.ndarray:
    """``[Lm, E]`` selection bias: standardized log-popularity times ``router_bias_scale``."""
    popularity = expert_popularity(config.num_moe_layers, config.num_experts, config.popularity_seed)
    log = np.log(popularity)
    return (config.router_bias_scale * (log - log.mean(1, keepdims=True)) / log.std(1, keepdims=True)).astype(np.float32)


def expert_weights(config: ModelConfig, seed: int, slot_to_expert: jax.Array) -> ExpertWeights:
    """Weights of the experts named by ``slot_to_expert`` ``[Lm, X]`` -> ``[Lm, X, ...]`` (jittable)."""
    c, dt = config, config.jnp_dtype
    base = jax.random.fold_in(jax.random.key(seed), 1)

    def one(layer, expert):
        k = jax.random.split(jax.random.fold_in(jax.random.fold_in(base, layer), expert), 3)
        return ExpertWeights(_normal(k[0], (c.hidden_size, c.expert_ffn_size), c.init_std, dt),
                             _normal(k[1], (c.hidden_size, c.expert_ffn_size), c.init_std, dt),
                             _normal(k[2], (c.expert_ffn_size, c.hidden_size), c.init_std, dt))

    layers = jnp.arange(slot_to_expert.shape[0])[:, None] * jnp.ones_like(slot_to_expert)
    return jax.vmap(jax.vmap(one))(layers, slot_to_expert)


def expert_sharding(mesh) -> NamedSharding:
    """Slot-indexed expert tensors ``[Lm, S, ...]``: slots sharded over ``ep``."""
    return NamedSharding(mesh, P(None, EP_AXIS))


def init_weights(config: ModelConfig, seed: int, mesh, slot_to_expert=None) -> ModelWeights:
    """Seeded random weights. With ``slot_to_expert`` ``[Lm, S]``: ready for ``mesh``, experts
    generated per shard straight into their slots (sharded over ``ep``), everything else
    replicated. Without: the logical layout (experts ``[Lm, E]``) on the default device."""
    c, dt = config, config.jnp_dtype
    k = jax.random.split(jax.random.key(seed), 6)
    dense = None
    if c.first_k_dense:
        dense = DenseLayers(_attention(k[0], c, c.first_k_dense), jnp.ones((c.first_k_dense, c.hidden_size), dt),
                            _mlp(k[1], c.first_k_dense, c.hidden_size, c.dense_ffn_size, c.init_std, dt))
    lm = c.num_moe_layers
    shared = None
    if c.num_shared_experts:
        fs = (c.shared_ffn_size or c.expert_ffn_size) * c.num_shared_experts
        shared = _mlp(k[2], lm, c.hidden_size, fs, c.init_std, dt)
    router_std = c.router_logit_std / np.sqrt(c.hidden_size)  # normed inputs: logits ~ N(0, router_logit_std)
    router = RouterWeights(_normal(k[3], (lm, c.hidden_size, c.num_experts), router_std, jnp.float32),
                           jnp.asarray(router_bias(c)))
    if slot_to_expert is None:
        experts = jax.jit(expert_weights, static_argnums=(0, 1))(c, seed, jnp.tile(jnp.arange(c.num_experts), (lm, 1)))
    else:
        placed = jax.jit(expert_weights, static_argnums=(0, 1), out_shardings=expert_sharding(mesh))
        experts = placed(c, seed, jax.device_put(jnp.asarray(slot_to_expert, jnp.int32), expert_sharding(mesh)))
    moe = MoELayers(_attention(k[4], c, lm), jnp.ones((lm, c.hidden_size), dt), router, experts, shared)
    weights = ModelWeights(_normal(k[5], (c.vocab_size, c.hidden_size), 1.0, dt), dense, moe,
                           jnp.ones((c.hidden_size,), dt),
                           _normal(jax.random.fold_in(k[5], 1), (c.hidden_size, c.vocab_size), c.init_std, dt))
    return weights if slot_to_expert is None else placed_weights(weights, mesh, experts)


def replicate(tree, mesh):
    """Everything but the experts is replicated over the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def placed_weights(weights: ModelWeights, mesh, experts: ExpertWeights) -> ModelWeights:
    """``weights`` with non-expert tensors replicated on ``mesh`` and ``experts`` (already placed)."""
    moe = weights.moe._replace(experts=None)
    placed = replicate(weights._replace(moe=moe), mesh)
    return placed._replace(moe=placed.moe._replace(experts=experts))
