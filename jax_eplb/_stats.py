"""Routing statistics in memory: ``ExpertLoadStats`` (per-iteration, per-layer counts).

Axis legend: I iterations, L MoE layers, E experts (or slots when recorded under a plan).
Files: TensorRT-LLM dumps in ``_trtllm_dump.py``, SGLang JSON / NumPy and ``load_statistics``
(any format, by what the path is) in ``_stat_files.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_eplb._errors import EplbInputError


@dataclasses.dataclass(frozen=True)
class ExpertLoadStats:
    """Per-iteration, per-layer routing counts.

    Attributes:
      counts: ``[I, L, E]`` float64, routed (token, k) entries per expert (or per slot).
      layer_ids: ``[L]`` decoder-layer index of each row (DeepSeek-V3: 3..60).
      iter_start: id of the first iteration; iterations are contiguous.
      num_experts_per_token: top-k of the model, when known.
      ep_size: number of ranks that recorded the counts, when known.
      partial: the recording run was interrupted; the counts cover the iterations it finished.
    """

    counts: np.ndarray
    layer_ids: tuple[int, ...]
    iter_start: int = 0
    num_experts_per_token: int | None = None
    ep_size: int | None = None
    partial: bool = False

    def __post_init__(self):
        counts = np.asarray(self.counts, dtype=np.float64)
        if counts.ndim != 3:
            raise EplbInputError(f"counts must be [iters, layers, experts], got shape {counts.shape}")
        if counts.shape[0] == 0 or counts.shape[1] == 0 or counts.shape[2] == 0:
            raise EplbInputError(f"counts is empty (shape {counts.shape})")
        if not np.all(np.isfinite(counts)):
            raise EplbInputError("counts contain NaN or infinite values")
        if np.any(counts < 0):
            raise EplbInputError("counts contain negative values")
        layer_ids = tuple(int(i) for i in self.layer_ids)
        if len(layer_ids) != counts.shape[1]:
            raise EplbInputError(
                f"{len(layer_ids)} layer ids for {counts.shape[1]} layers of counts")
        if len(set(layer_ids)) != len(layer_ids):
            raise EplbInputError(f"duplicate layer ids: {layer_ids}")
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "layer_ids", layer_ids)

    @property
    def num_iters(self) -> int:
        return self.counts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[2]

    @property
    def iter_stop(self) -> int:
        return self.iter_start + self.num_iters

    def window(self, iter_start: int | None = None, iter_stop: int | None = None) -> "ExpertLoadStats":
        """The iterations ``[iter_start, iter_stop)`` (defaults: all recorded)."""
        start = self.iter_start if iter_start is None else int(iter_start)
        stop = self.iter_stop if iter_stop is None else int(iter_stop)
        if not (self.iter_start <= start < stop <= self.iter_stop):
            raise EplbInputError(
                f"iteration window [{start}, {stop}) is not inside the recorded "
                f"[{self.iter_start}, {self.iter_stop})")
        lo, hi = start - self.iter_start, stop - self.iter_start
        return dataclasses.replace(self, counts=self.counts[lo:hi], iter_start=start)

    def total(self) -> np.ndarray:
        """``[L, E]`` counts summed over the iterations (the planners' load input)."""
        return self.counts.sum(axis=0)
