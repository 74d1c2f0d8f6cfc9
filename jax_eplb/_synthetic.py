"""Synthetic routing statistics with real-model skew, for demos and tests (seeded, no files).

Per-layer expert popularity is log-normal (coefficient of variation ~0.9, hottest expert
several times the mean, different experts hot in different layers), like DeepSeek-V3's
recorded loads. Axis legend: R ranks, I iterations, L layers, E experts.
"""

from __future__ import annotations

import numpy as np


def expert_popularity(num_layers: int, num_experts: int, seed: int = 0, sigma: float = 0.8) -> np.ndarray:
    """``[L, E]`` routing probabilities, rows summing to 1."""
    rng = np.random.default_rng(seed)
    weight = rng.lognormal(mean=0.0, sigma=sigma, size=(num_layers, num_experts))
    return weight / weight.sum(axis=1, keepdims=True)


def synthetic_rank_counts(num_ranks: int, num_iters: int, num_layers: int, num_experts: int,
                          tokens_per_rank: int, top_k: int, seed: int = 0) -> np.ndarray:
    """``[R, I, L, E]`` int64 counts: each rank routes tokens_per_rank * top_k entries per layer."""
    popularity = expert_popularity(num_layers, num_experts, seed)
    rng = np.random.default_rng(seed + 1)
    entries = tokens_per_rank * top_k
    return rng.multinomial(entries, popularity, size=(num_ranks, num_iters, num_layers)).astype(np.int64)
