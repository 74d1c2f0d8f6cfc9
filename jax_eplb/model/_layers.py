"""Norm, rotary embedding and attention (Flax NNX) of the decoder.

Axis legend: B batch rows (sharded over ``ep``: attention is data-parallel), T query tokens,
C cache length (``max_seq_len``), N heads, Q kv heads, Dh head dim, H hidden.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_eplb.model._config import ModelConfig


def rms_norm(x, weight, eps):
    """``x / rms(x) * weight``, the mean taken in float32 (cast back to x's dtype before the weight)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, *, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((size,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight.get_value(), self.eps)


def apply_rope(x, positions, theta):
    """x ``[B, T, N, Dh]``, positions ``[B, T]`` -> rotated (rotate-half convention)."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, half]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class AttentionCache(NamedTuple):
    """Keys and values ``[B, C, Q, Dh]`` (``[L, B, C, Q, Dh]`` for stacked layers)."""

    k: jax.Array
    v: jax.Array


def attention_cache_shape(config: ModelConfig, batch: int) -> AttentionCache:
    shape = (batch, config.max_seq_len, config.num_kv_heads, config.head_dim)
    return AttentionCache(jax.ShapeDtypeStruct(shape, config.jnp_dtype), jax.ShapeDtypeStruct(shape, config.jnp_dtype))


class Attention(nnx.Module):
    """Grouped-query attention with RoPE over a KV cache.

    wq ``[H, N*Dh]``, wk and wv ``[H, Q*Dh]``, wo ``[N*Dh, H]``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        init = jax.nn.initializers.normal(c.init_std)
        d, g = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.wq = nnx.Param(init(rngs.params(), (c.hidden_size, d), c.jnp_dtype))
        self.wk = nnx.Param(init(rngs.params(), (c.hidden_size, g), c.jnp_dtype))
        self.wv = nnx.Param(init(rngs.params(), (c.hidden_size, g), c.jnp_dtype))
        self.wo = nnx.Param(init(rngs.params(), (d, c.hidden_size), c.jnp_dtype))

    def __call__(self, h, positions, cache: AttentionCache, token_mask=None) -> tuple[jax.Array, AttentionCache]:
        """h ``[B, T, H]`` (normed) at positions ``[B, T]`` -> (``[B, T, H]``, updated cache).

        New keys of real tokens (``token_mask`` ``[B, T]``; None = all) are written at their
        positions before attending; masked tokens write nothing, so a row that is not part of this
        step keeps its cache. A query at position p sees keys at positions <= p, so stale cache rows
        past a sequence's length are never read.
        """
        c = self.config
        b, t, _ = h.shape
        q = apply_rope(jnp.dot(h, self.wq.get_value()).reshape(b, t, c.num_heads, c.head_dim), positions, c.rope_theta)
        k = apply_rope(jnp.dot(h, self.wk.get_value()).reshape(b, t, c.num_kv_heads, c.head_dim), positions,
                       c.rope_theta)
        v = jnp.dot(h, self.wv.get_value()).reshape(b, t, c.num_kv_heads, c.head_dim)
        cache = _write_cache(cache, (k, v), positions, token_mask, c.max_seq_len)
        group = c.num_heads // c.num_kv_heads
        q = q.reshape(b, t, c.num_kv_heads, group, c.head_dim)
        scores = jnp.einsum("btqgd,bcqd->bqgtc", q, cache.k, preferred_element_type=jnp.float32) / jnp.sqrt(
            jnp.float32(c.head_dim))
        probs = jax.nn.softmax(causal_mask(scores, positions, c.max_seq_len), axis=-1).astype(cache.v.dtype)
        out = jnp.einsum("bqgtc,bcqd->btqgd", probs, cache.v, preferred_element_type=jnp.float32)
        out = out.reshape(b, t, c.num_heads * c.head_dim).astype(h.dtype)
        return jnp.dot(out, self.wo.get_value()), cache


def _write_cache(cache, new, positions, token_mask, length: int):
    """Writes each new ``[B, T, ...]`` entry at its position of the matching ``[B, C, ...]`` cache
    field (masked tokens go to position C: dropped)."""
    rows = jnp.arange(positions.shape[0])[:, None]
    write_at = positions if token_mask is None else jnp.where(token_mask, positions, length)
    return type(cache)(*(old.at[rows, write_at].set(value.astype(old.dtype), mode="drop")
                         for old, value in zip(cache, new)))


def causal_mask(scores, positions, length: int):
    """scores ``[B, ..., T, C]``: keys past each query's position set to -inf."""
    visible = jnp.arange(length)[None, None, :] <= positions[:, :, None]  # [B, T, C]
    visible = visible.reshape(visible.shape[0], *([1] * (scores.ndim - 3)), *visible.shape[1:])
    return jnp.where(visible, scores, -jnp.inf)
