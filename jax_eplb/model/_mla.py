"""DeepSeek multi-head latent attention (MLA), Flax NNX, with the compressed KV cache.

Axis legend: B batch rows, T query tokens, C cache length, N heads, H hidden, Cq query latent
(``q_lora_rank``), Ckv kv latent (``kv_lora_rank``), Dn ``qk_nope_head_dim``, Dr
``qk_rope_head_dim``, Dv ``v_head_dim``.

The cache holds per token the normed kv latent ``[Ckv]`` and the rotated shared key ``[Dr]``
(576 numbers per token for DeepSeek-V3 instead of 2 x 128 heads x 192). Attention runs in the
latent space as DeepSeek's inference code does by default ("absorb"): the query's no-RoPE part is
multiplied into ``kv_b``'s key half, scores are taken against the latents, and ``kv_b``'s value
half is applied after the weighted sum. This equals expanding every cached latent into full keys
and values (transformers' formulation) up to float rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_eplb.model._config import ModelConfig
from jax_eplb.model._layers import RMSNorm, causal_mask, write_cache
from jax_eplb.model._rope import apply_rope, inv_frequencies, softmax_scale
from jax_eplb.moe import linear_weight, weight_value


class LatentCache(NamedTuple):
    """Normed kv latents ``[B, C, Ckv]`` and rotated keys ``[B, C, Dr]`` (``[L, ...]`` stacked)."""

    latent: jax.Array
    rope_key: jax.Array


class MLAttention(nnx.Module):
    """wq ``[H, N*(Dn+Dr)]`` or (query compression) wq_a ``[H, Cq]``, q_a_norm, wq_b ``[Cq, N*(Dn+Dr)]``;
    wkv_a ``[H, Ckv+Dr]``, kv_a_norm ``[Ckv]``, wkv_b ``[Ckv, N*(Dn+Dv)]``, wo ``[N*Dv, H]`` (the
    projections ``Fp8Weight``s under ``fp8_block``)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, dt = config, config.jnp_dtype
        self.config = config
        init = jax.nn.initializers.normal(c.init_std)
        n, qk = c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim

        def weight(shape):
            return linear_weight(shape, dt, c.weight_block, init=init, rngs=rngs)

        if c.q_lora_rank is None:
            self.wq = weight((c.hidden_size, n * qk))
        else:
            self.wq_a = weight((c.hidden_size, c.q_lora_rank))
            self.q_a_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype=dt)
            self.wq_b = weight((c.q_lora_rank, n * qk))
        self.wkv_a = weight((c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim))
        self.kv_a_norm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps, dtype=dt)
        self.wkv_b = weight((c.kv_lora_rank, n * (c.qk_nope_head_dim + c.v_head_dim)))
        self.wo = weight((n * c.v_head_dim, c.hidden_size))

    @staticmethod
    def cache_shape(config: ModelConfig, batch: int) -> LatentCache:
        c = config
        return LatentCache(jax.ShapeDtypeStruct((batch, c.max_seq_len, c.kv_lora_rank), c.jnp_dtype),
                           jax.ShapeDtypeStruct((batch, c.max_seq_len, c.qk_rope_head_dim), c.jnp_dtype))

    def _query(self, h):
        c = self.config
        if c.q_lora_rank is None:
            q = jnp.dot(h, weight_value(self.wq, h.dtype))
        else:
            q_latent = self.q_a_norm(jnp.dot(h, weight_value(self.wq_a, h.dtype)))
            q = jnp.dot(q_latent, weight_value(self.wq_b, h.dtype))
        q = q.reshape(*h.shape[:2], c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim)
        return q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]  # [B, T, N, Dn], [B, T, N, Dr]

    def __call__(self, h, positions, cache: LatentCache, token_mask=None) -> tuple[jax.Array, LatentCache]:
        """h ``[B, T, H]`` (normed) at positions ``[B, T]`` -> (``[B, T, H]``, updated cache); the cache
        contract is that of ``Attention`` (masked tokens write nothing; keys past a query's position
        are never attended)."""
        c = self.config
        b, t, _ = h.shape
        inv_freq = inv_frequencies(c, c.qk_rope_head_dim)
        q_nope, q_rot = self._query(h)
        q_rot = apply_rope(q_rot, positions, inv_freq, c.rope_interleave)
        kv = jnp.dot(h, weight_value(self.wkv_a, h.dtype))
        latent = self.kv_a_norm(kv[..., :c.kv_lora_rank])  # [B, T, Ckv]
        rope_key = apply_rope(kv[..., None, c.kv_lora_rank:], positions, inv_freq, c.rope_interleave)[:, :, 0]
        cache = write_cache(cache, (latent, rope_key), positions, token_mask, c.max_seq_len)
        wkv_b = weight_value(self.wkv_b, h.dtype).reshape(c.kv_lora_rank, c.num_heads,
                                                          c.qk_nope_head_dim + c.v_head_dim)
        w_key, w_value = wkv_b[..., :c.qk_nope_head_dim], wkv_b[..., c.qk_nope_head_dim:]
        dt, f32 = cache.latent.dtype, jnp.float32
        q_latent = jnp.einsum("btnd,cnd->btnc", q_nope, w_key, preferred_element_type=f32).astype(dt)
        scores = (jnp.einsum("btnc,bsc->bnts", q_latent, cache.latent, preferred_element_type=f32)
                  + jnp.einsum("btnr,bsr->bnts", q_rot, cache.rope_key, preferred_element_type=f32))
        scores = scores * f32(softmax_scale(c, c.qk_nope_head_dim + c.qk_rope_head_dim))
        probs = jax.nn.softmax(causal_mask(scores, positions, c.max_seq_len), axis=-1).astype(dt)
        out_latent = jnp.einsum("bnts,bsc->btnc", probs, cache.latent, preferred_element_type=f32).astype(dt)
        out = jnp.einsum("btnc,cnv->btnv", out_latent, w_value, preferred_element_type=f32)
        out = out.reshape(b, t, c.num_heads * c.v_head_dim).astype(h.dtype)
        return jnp.dot(out, weight_value(self.wo, h.dtype)), cache
