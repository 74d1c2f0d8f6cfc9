"""Rotary position embedding: frequencies (plain, or DeepSeek's YaRN), rotation of halves or of
interleaved pairs, and YaRN's softmax-scale correction.

Axis legend: B batch, T tokens, N heads, Dr rotary dims.

YaRN follows DeepSeek-V3's own inference code (``precompute_freqs_cis``), which transformers
matches: the correction range from ``beta_fast`` / ``beta_slow`` as whole dims (low rounded down,
high up), a linear ramp ``(i - low) / (high - low)`` between them (0.001 added to the width when
they are equal), frequencies ``f * (1 - ramp + ramp / factor)``; with ``yarn_truncate`` False
(gpt-oss) the range is not rounded; the softmax scale is multiplied by ``(0.1 * mscale_all_dim *
ln(factor) + 1)^2``. YaRN applies whenever a config sets it, as in transformers, vLLM and SGLang
(DeepSeek's own code skips it when it serves no more than the original length; the published
configs all extend it, so the two only differ on test-sized configs).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jax_eplb.model._config import ModelConfig


def yarn_enabled(config: ModelConfig) -> bool:
    return config.yarn_factor is not None


def inv_frequencies(config: ModelConfig, dim: int):
    """``[dim / 2]`` float32 rotation frequencies of a ``dim``-wide rotary embedding (traceable)."""
    half = dim // 2
    if not yarn_enabled(config):
        return config.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    freq = (config.rope_theta ** (-np.arange(half, dtype=np.float64) / half)).astype(np.float32)
    base, factor, original = config.rope_theta, config.yarn_factor, config.yarn_original_max_position

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(config.yarn_beta_fast), correction_dim(config.yarn_beta_slow)
    if config.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    width = high - low if high != low else 1e-3
    ramp = np.clip((np.arange(half, dtype=np.float32) - low) / np.float32(width), 0, 1)
    smooth = 1 - ramp
    return (freq * (smooth + (1 - smooth) / factor)).astype(np.float32)


def softmax_scale(config: ModelConfig, head_dim: int) -> float:
    """``head_dim ** -0.5``, times YaRN's ``mscale^2`` when YaRN is on and ``mscale_all_dim`` set."""
    scale = head_dim ** -0.5
    if yarn_enabled(config) and config.yarn_mscale_all_dim and config.yarn_factor > 1:
        mscale = 0.1 * config.yarn_mscale_all_dim * math.log(config.yarn_factor) + 1.0
        scale *= mscale * mscale
    return scale


def apply_rope(x, positions, inv_freq, interleave: bool = False):
    """x ``[B, T, N, Dr]`` rotated by ``positions`` ``[B, T]``: pairs are (i, i + Dr/2) (rotate-half
    convention) or, with ``interleave``, (2i, 2i + 1) (DeepSeek's layout, kept in place)."""
    angle = positions.astype(jnp.float32)[..., None, None] * jnp.asarray(inv_freq)  # [B, T, 1, Dr/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x32 = x.astype(jnp.float32)
    if interleave:
        pairs = x32.reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)
        return rotated.astype(x.dtype)
    half = x.shape[-1] // 2
    a, b = x32[..., :half], x32[..., half:]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)

