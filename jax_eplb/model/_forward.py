"""The decoder forward pass (pure functions) and the jitted prefill/decode step.

Axis legend: B batch (sharded over ``ep``: attention is data-parallel, each rank's requests
are its local tokens), T query tokens, C cache length (``max_seq_len``), N heads, Q kv heads,
Dh head dim, H hidden, V vocab, Lm MoE layers, R ranks, X counted ids (E or S).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_eplb.model._config import ModelConfig
from jax_eplb.model._weights import AttentionWeights, ModelWeights
from jax_eplb.moe import EP_AXIS, ep_moe_forward, swiglu


class KVCache(NamedTuple):
    """Keys/values ``[L, B, C, Q, Dh]`` of the dense and the MoE layers."""

    dense_k: jax.Array | None
    dense_v: jax.Array | None
    moe_k: jax.Array
    moe_v: jax.Array


class StepOutput(NamedTuple):
    """next_token ``[B]`` (greedy, at each row's last valid position); cache; rank_load
    ``[Lm, R]`` entries computed per rank per MoE layer; expert_counts ``[Lm, R, E]``,
    slot_counts ``[Lm, R, S]`` and expert_totals ``[Lm, E]`` (summed over ranks) when recorded,
    else None."""

    next_token: jax.Array
    cache: KVCache
    rank_load: jax.Array
    expert_counts: jax.Array | None
    slot_counts: jax.Array | None
    expert_totals: jax.Array | None


@dataclasses.dataclass(frozen=True)
class MoEOptions:
    """Static MoE settings of a step (changing one recompiles; tables do not)."""

    replica_policy: str = "round_robin"
    moe_max_num_tokens: int | None = None
    record: tuple[str, ...] = ()  # histograms to compute: "expert", "slot", "expert_total"
    transport: str = "all_to_all"
    grouped_matmul: str = "auto"


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(EP_AXIS))


def init_cache(config: ModelConfig, batch: int, mesh) -> KVCache:
    """Zeroed cache, batch sharded over ``ep``."""
    c = config

    def zeros(layers):
        if not layers:
            return None
        shape = (layers, batch, c.max_seq_len, c.num_kv_heads, c.head_dim)
        return jax.device_put(jnp.zeros(shape, c.jnp_dtype), NamedSharding(mesh, P(None, EP_AXIS)))

    return KVCache(zeros(c.first_k_dense), zeros(c.first_k_dense), zeros(c.num_moe_layers),
                   zeros(c.num_moe_layers))


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x, positions, theta):
    """x ``[B, T, N, Dh]``, positions ``[B, T]`` -> rotated (rotate-half convention)."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, half]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(config: ModelConfig, w: AttentionWeights, x, positions, k_cache, v_cache, token_mask=None):
    """GQA with RoPE over the cache. x ``[B, T, H]``; caches ``[B, C, Q, Dh]`` (updated, returned).

    New keys of real tokens (``token_mask`` ``[B, T]``; None = all) are written at their
    positions before attending; masked tokens write nothing, so a row that is not part of this
    step keeps its cache. A query at position p sees keys at positions <= p, so stale cache rows
    past a sequence's length are never read.
    """
    c = config
    b, t, _ = x.shape
    h = rms_norm(x, w.norm, c.rms_norm_eps)
    q = apply_rope(jnp.dot(h, w.wq).reshape(b, t, c.num_heads, c.head_dim), positions, c.rope_theta)
    k = apply_rope(jnp.dot(h, w.wk).reshape(b, t, c.num_kv_heads, c.head_dim), positions, c.rope_theta)
    v = jnp.dot(h, w.wv).reshape(b, t, c.num_kv_heads, c.head_dim)
    rows = jnp.arange(b)[:, None]
    write_at = positions if token_mask is None else jnp.where(token_mask, positions, c.max_seq_len)  # C: dropped
    k_cache = k_cache.at[rows, write_at].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, write_at].set(v.astype(v_cache.dtype), mode="drop")
    group = c.num_heads // c.num_kv_heads
    q = q.reshape(b, t, c.num_kv_heads, group, c.head_dim)
    scores = jnp.einsum("btqgd,bcqd->bqgtc", q, k_cache, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(c.head_dim))
    visible = jnp.arange(c.max_seq_len)[None, None, :] <= positions[:, :, None]  # [B, T, C]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bqgtc,bcqd->btqgd", probs, v_cache, preferred_element_type=jnp.float32)
    out = out.reshape(b, t, c.num_heads * c.head_dim).astype(x.dtype)
    return x + jnp.dot(out, w.wo), k_cache, v_cache


def decoder_step(config: ModelConfig, mesh, options: MoEOptions, weights: ModelWeights, replica_count, expert_slots,
                 tokens, positions, token_mask, cache: KVCache) -> StepOutput:
    """One forward step over ``tokens`` ``[B, T]`` at ``positions`` ``[B, T]``.

    ``token_mask`` ``[B, T]`` marks real tokens (False: padding / finished rows: they route to no
    expert and are not counted). ``replica_count`` ``[Lm, E]`` and ``expert_slots`` ``[Lm, E, M]``
    are the assignment tables (data, so a new plan does not recompile).
    """
    c = config
    b, t = tokens.shape
    x = weights.embed[tokens]

    def dense_layer(x, layer):
        w, k_cache, v_cache = layer
        x, k_cache, v_cache = attention(c, w.attention, x, positions, k_cache, v_cache, token_mask)
        x = x + swiglu(rms_norm(x, w.mlp_norm, c.rms_norm_eps), *w.mlp).astype(x.dtype)
        return x, (k_cache, v_cache)

    dense_k = dense_v = None
    if weights.dense is not None:
        x, (dense_k, dense_v) = jax.lax.scan(dense_layer, x, (weights.dense, cache.dense_k, cache.dense_v))

    flat_mask = token_mask.reshape(-1)

    def moe_layer(x, layer):
        w, counts_table, slots_table, k_cache, v_cache = layer
        x, k_cache, v_cache = attention(c, w.attention, x, positions, k_cache, v_cache, token_mask)
        h = rms_norm(x, w.mlp_norm, c.rms_norm_eps).reshape(b * t, c.hidden_size)
        result = ep_moe_forward(c.moe, mesh, w.router, w.experts, h, counts_table, slots_table, token_mask=flat_mask,
                                replica_policy=options.replica_policy, moe_max_num_tokens=options.moe_max_num_tokens,
                                record=options.record, transport=options.transport,
                                grouped_matmul=options.grouped_matmul)
        out = result.out
        if w.shared is not None:
            out = out + swiglu(h, *w.shared)
        x = x + out.astype(x.dtype).reshape(b, t, c.hidden_size)
        return x, (k_cache, v_cache, result.rank_load, result.expert_counts, result.slot_counts,
                   result.expert_totals)

    moe = weights.moe
    x, (moe_k, moe_v, rank_load, expert_counts, slot_counts, expert_totals) = jax.lax.scan(
        moe_layer, x, (moe, replica_count, expert_slots, cache.moe_k, cache.moe_v))
    last = jnp.maximum(token_mask.sum(axis=1) - 1, 0)  # [B]
    final = rms_norm(x[jnp.arange(b), last], weights.final_norm, c.rms_norm_eps)
    logits = jnp.dot(final, weights.lm_head, preferred_element_type=jnp.float32)  # [B, V]
    return StepOutput(jnp.argmax(logits, axis=-1).astype(jnp.int32), KVCache(dense_k, dense_v, moe_k, moe_v),
                      rank_load, expert_counts, slot_counts, expert_totals)


def jit_step(config: ModelConfig, mesh, options: MoEOptions):
    """The jitted step; the cache is donated."""
    return jax.jit(functools.partial(decoder_step, config, mesh, options), donate_argnames=("cache",))
