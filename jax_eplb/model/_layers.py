"""RMSNorm and grouped-query attention (Flax NNX) of the decoder.

Axis legend: B batch rows (sharded over ``ep``: attention is data-parallel), T query tokens,
C cache length (``max_seq_len``), N heads, Q kv heads, Dh head dim, H hidden.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_eplb.model._config import ModelConfig
from jax_eplb.model._rope import apply_rope, inv_frequencies, softmax_scale
from jax_eplb.moe import linear_weight, weight_value


def rms_norm(x, weight, eps):
    """``x / rms(x) * weight`` computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, *, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((size,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight.get_value(), self.eps)


class AttentionCache(NamedTuple):
    """Keys and values ``[B, C, Q, Dh]`` (``[L, B, C, Q, Dh]`` for stacked layers)."""

    k: jax.Array
    v: jax.Array


class Attention(nnx.Module):
    """Grouped-query attention with RoPE over a KV cache (Mixtral, Qwen3-MoE, the stand-in models).

    wq ``[H, N*Dh]``, wk and wv ``[H, Q*Dh]``, wo ``[N*Dh, H]`` (each an ``Fp8Weight`` under
    ``fp8_block``); with ``attention_bias`` (GLM-4.5, gpt-oss) biases ``bq`` ``[N*Dh]``, ``bk`` and
    ``bv`` ``[Q*Dh]`` (and ``bo`` ``[H]`` with ``attention_out_bias``); with ``qk_norm`` (Qwen3,
    GLM-4.5) per-head RMSNorms ``q_norm``, ``k_norm`` ``[Dh]`` before RoPE, which turns each head's
    first ``rotary_dim`` dims (default all) in rotate-half pairs; with ``attention_sinks`` (gpt-oss)
    one logit per head ``sinks`` ``[N]`` joins each softmax (its share of the weight goes nowhere).
    The layer's window (``__call__``'s ``window``, 0 = none) limits a query to the last ``window``
    positions (gpt-oss' sliding layers).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        init = jax.nn.initializers.normal(c.init_std)
        d, g = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.wq, self.wk, self.wv, self.wo = (
            linear_weight(shape, c.jnp_dtype, c.weight_block, init=init, rngs=rngs)
            for shape in ((c.hidden_size, d), (c.hidden_size, g), (c.hidden_size, g), (d, c.hidden_size)))
        if c.attention_bias:
            self.bq, self.bk, self.bv = (nnx.Param(jnp.zeros((n,), c.jnp_dtype)) for n in (d, g, g))
        if c.attention_out_bias:
            self.bo = nnx.Param(jnp.zeros((c.hidden_size,), c.jnp_dtype))
        if c.attention_sinks:
            self.sinks = nnx.Param(jnp.zeros((c.num_heads,), c.jnp_dtype))
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=c.jnp_dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=c.jnp_dtype)

    @staticmethod
    def cache_shape(config: ModelConfig, batch: int) -> AttentionCache:
        shape = (batch, config.max_seq_len, config.num_kv_heads, config.head_dim)
        return AttentionCache(jax.ShapeDtypeStruct(shape, config.jnp_dtype),
                              jax.ShapeDtypeStruct(shape, config.jnp_dtype))

    def __call__(self, h, positions, cache: AttentionCache, token_mask=None,
                 window=None) -> tuple[jax.Array, AttentionCache]:
        """h ``[B, T, H]`` (normed) at positions ``[B, T]`` -> (``[B, T, H]``, updated cache).

        New keys of real tokens (``token_mask`` ``[B, T]``; None = all) are written at their
        positions before attending; masked tokens write nothing, so a row that is not part of this
        step keeps its cache. A query at position p sees keys at positions <= p, so stale cache rows
        past a sequence's length are never read.
        """
        c = self.config
        b, t, _ = h.shape
        q, k, v = (jnp.dot(h, weight_value(w, h.dtype)) for w in (self.wq, self.wk, self.wv))
        if c.attention_bias:
            q, k, v = q + self.bq.get_value(), k + self.bk.get_value(), v + self.bv.get_value()
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k, v = (a.reshape(b, t, c.num_kv_heads, c.head_dim) for a in (k, v))
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = partial_rope(q, positions, c), partial_rope(k, positions, c)
        cache = write_cache(cache, (k, v), positions, token_mask, c.max_seq_len)
        group = c.num_heads // c.num_kv_heads
        q = q.reshape(b, t, c.num_kv_heads, group, c.head_dim)
        scores = jnp.einsum("btqgd,bcqd->bqgtc", q, cache.k, preferred_element_type=jnp.float32) * jnp.float32(
            softmax_scale(c, c.head_dim))
        scores = causal_mask(scores, positions, c.max_seq_len, window)
        sinks = self.sinks.get_value().reshape(c.num_kv_heads, group) if c.attention_sinks else None
        probs = softmax_with_sinks(scores, sinks).astype(cache.v.dtype)
        out = jnp.einsum("bqgtc,bcqd->btqgd", probs, cache.v, preferred_element_type=jnp.float32)
        out = out.reshape(b, t, c.num_heads * c.head_dim).astype(h.dtype)
        out = jnp.dot(out, weight_value(self.wo, h.dtype))
        return (out + self.bo.get_value() if c.attention_out_bias else out), cache


def partial_rope(x, positions, config: ModelConfig):
    """x ``[B, T, N, Dh]`` with its first ``rotary_dim`` dims rotated (rotate-half pairs), the rest as is."""
    dim = config.rotary_dim or x.shape[-1]
    rotated = apply_rope(x[..., :dim], positions, inv_frequencies(config, dim))
    return rotated if dim == x.shape[-1] else jnp.concatenate([rotated, x[..., dim:]], axis=-1)


def write_cache(cache, new, positions, token_mask, length: int):
    """Writes each new ``[B, T, ...]`` entry at its position of the matching ``[B, C, ...]`` cache
    field (masked tokens go to position C: dropped)."""
    rows = jnp.arange(positions.shape[0])[:, None]
    write_at = positions if token_mask is None else jnp.where(token_mask, positions, length)
    return type(cache)(*(old.at[rows, write_at].set(value.astype(old.dtype), mode="drop")
                         for old, value in zip(cache, new)))


def softmax_with_sinks(scores, sinks=None):
    """Softmax of scores ``[B, Q, G, T, C]`` over C; with ``sinks`` ``[Q, G]`` each head's sink logit
    joins the softmax as one more key whose weight is dropped (the rest then sum to less than 1)."""
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    sink = sinks.astype(jnp.float32)[None, :, :, None, None]
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    weights = jnp.exp(scores - top)
    return weights / (jnp.sum(weights, axis=-1, keepdims=True) + jnp.exp(sink - top))


def causal_mask(scores, positions, length: int, window=None):
    """scores ``[B, ..., T, C]``: keys past each query's position set to -inf, and with ``window`` (a
    traced scalar, 0 = none) the keys ``window`` or more positions back too."""
    keys = jnp.arange(length)[None, None, :]
    visible = keys <= positions[:, :, None]  # [B, T, C]
    if window is not None:
        visible &= (window <= 0) | (keys > positions[:, :, None] - window)
    visible = visible.reshape(visible.shape[0], *([1] * (scores.ndim - 3)), *visible.shape[1:])
    return jnp.where(visible, scores, -jnp.inf)
