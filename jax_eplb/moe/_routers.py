"""Routers: hidden states -> (combine weights, expert ids) per token. Pure functions.

Axis legend: T tokens, H hidden, E experts, K top-k, G expert groups.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_eplb.moe._types import MoEConfig, RouterWeights


class Routing(NamedTuple):
    weights: jax.Array  # [T, K] float32 combine weights
    expert_ids: jax.Array  # [T, K] int32


def softmax_topk(logits: jax.Array, top_k: int, renormalize: bool = True) -> Routing:
    """Mixtral / Qwen3-MoE: softmax over experts, top-k, optionally renormalised to sum 1."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [T, E]
    weights, ids = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, ids.astype(jnp.int32))


def topk_softmax(logits: jax.Array, top_k: int) -> Routing:
    """gpt-oss: the top-k logits, softmax over those k."""
    top, ids = jax.lax.top_k(logits.astype(jnp.float32), top_k)
    return Routing(jax.nn.softmax(top, axis=-1), ids.astype(jnp.int32))


def deepseek_topk(logits: jax.Array, correction_bias: jax.Array, top_k: int, n_group: int, topk_group: int,
                  routed_scaling_factor: float = 1.0, normalize: bool = True) -> Routing:
    """DeepSeek-V3: sigmoid scores; the bias only steers selection; group-limited top-k.

    A group is scored by the sum of its top-2 biased scores; only experts of the ``topk_group``
    best groups can be chosen. Weights come from the unbiased scores, normalised, times
    ``routed_scaling_factor``.
    """
    num_tokens, num_experts = logits.shape
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))  # [T, E]
    biased = scores + correction_bias.astype(jnp.float32)[None, :]
    grouped = biased.reshape(num_tokens, n_group, num_experts // n_group)  # [T, G, E/G]
    group_score = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0].sum(axis=-1)  # [T, G]
    _, best_groups = jax.lax.top_k(group_score, topk_group)  # [T, topk_group]
    group_mask = jnp.zeros((num_tokens, n_group), bool).at[jnp.arange(num_tokens)[:, None], best_groups].set(True)
    expert_mask = jnp.repeat(group_mask, num_experts // n_group, axis=1)  # [T, E]
    _, ids = jax.lax.top_k(jnp.where(expert_mask, biased, -jnp.inf), top_k)
    weights = jnp.take_along_axis(scores, ids, axis=1)
    if normalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return Routing(weights * routed_scaling_factor, ids.astype(jnp.int32))


def route(config: MoEConfig, router: RouterWeights, x: jax.Array) -> Routing:
    """``x`` ``[T, H]`` -> Routing; logits ``x @ kernel`` in float32 whatever the model dtype."""
    logits = jnp.dot(x.astype(jnp.float32), router.kernel.astype(jnp.float32))  # [T, E]
    if router.logit_bias is not None:
        logits = logits + router.logit_bias.astype(jnp.float32)
    if config.router == "topk_softmax":
        return topk_softmax(logits, config.top_k)
    if config.router == "deepseek":
        return deepseek_topk(logits, router.correction_bias, config.top_k, config.n_group, config.topk_group,
                             config.routed_scaling_factor, config.renormalize)
    return softmax_topk(logits, config.top_k, config.renormalize)
