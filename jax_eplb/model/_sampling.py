"""Choosing each row's next token from its logits: greedy, or temperature and nucleus (top-p) sampling.

Axis legend: B batch rows, V vocab.

A row samples when its temperature is > 0, else it takes the argmax (the greedy program's token).
Its random draw depends only on (its seed, the index of the token it generates): the same request
gives the same tokens whatever row it runs in and whatever else is batched with it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Sampling(NamedTuple):
    """Per-row sampling parameters of one step (all ``[B]``, batch sharded like the tokens)."""

    temperature: jax.Array  # float32; 0: greedy
    top_p: jax.Array  # float32 in (0, 1]: the smallest set of most likely tokens whose probability reaches it
    seed: jax.Array  # uint32: the request's seed
    counter: jax.Array  # int32: index of the token being generated (0 for the first)

    @classmethod
    def greedy(cls, batch: int) -> "Sampling":
        """Host arrays of an all-greedy batch (rows are filled in by the batcher)."""
        return cls(np.zeros(batch, np.float32), np.ones(batch, np.float32), np.zeros(batch, np.uint32),
                   np.zeros(batch, np.int32))


def _sample_row(logits, temperature, top_p, seed, counter):
    """One row: logits ``[V]`` -> token id (sampled; the caller keeps the argmax of greedy rows)."""
    key = jax.random.fold_in(jax.random.key(seed), counter)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)  # most likely first
    ordered = scaled[order]
    probs = jax.nn.softmax(ordered)
    before = jnp.cumsum(probs) - probs  # probability of the more likely tokens
    kept = jnp.where(before < top_p, ordered, -jnp.inf)  # the first token is always kept
    return order[jax.random.categorical(key, kept)]


def next_tokens(logits, sampling: Sampling | None):
    """logits ``[B, V]`` float32 -> next token ``[B]`` int32: argmax, or sampled where temperature > 0."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if sampling is None:
        return greedy
    sampled = jax.vmap(_sample_row)(logits, sampling.temperature, sampling.top_p, sampling.seed,
                                    sampling.counter).astype(jnp.int32)
    return jnp.where(sampling.temperature > 0, sampled, greedy)
