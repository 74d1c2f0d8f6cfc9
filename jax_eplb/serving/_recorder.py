"""Expert-statistic recording, TensorRT-LLM style.

``EXPERT_STATISTIC_ITER_RANGE=start-stop`` (stop exclusive) turns it on and
``EXPERT_STATISTIC_PATH`` (default ``expert_statistic``) names the output directory (read by
``from_environment``, the command line's edge). The histograms are computed inside the jitted
step (one ``[Lm, R, X]`` array per iteration, X = expert ids without a load balancer, slot ids
with one); this class only keeps the iterations in range and writes ``rank{R}.safetensors`` +
``meta_info.json`` when iteration ``stop`` starts, or at exit with what was recorded. Without a
path it only keeps them (``statistics()``), for benchmarks that plan from a run in memory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from jax_eplb._errors import EplbInputError
from jax_eplb._stats import ExpertLoadStats
from jax_eplb._trtllm_dump import check_dump_target, save_trtllm_dump

RANGE_VARIABLE = "EXPERT_STATISTIC_ITER_RANGE"
PATH_VARIABLE = "EXPERT_STATISTIC_PATH"
DEFAULT_PATH = "expert_statistic"


class StatisticsRecorder:
    """Collects per-iteration ``[Lm, R, X]`` counts for iterations in ``[start, stop)``."""

    def __init__(self, path, start: int, stop: int, layer_ids, num_experts_per_token: int):
        if not 0 <= start < stop:
            raise EplbInputError(f"{RANGE_VARIABLE}: need 0 <= start < stop, got {start}-{stop}")
        self.path, self.start, self.stop = (Path(path) if path is not None else None), start, stop
        self.layer_ids, self.top_k = list(layer_ids), num_experts_per_token
        self._counts: dict[int, np.ndarray] = {}
        self.written = False
        if self.path is not None:  # an earlier run's dump is replaced whole: two runs' statistics never mix
            check_dump_target(self.path, f"{PATH_VARIABLE}={self.path}")

    @classmethod
    def from_environment(cls, layer_ids, num_experts_per_token: int,
                         environ: Mapping[str, str] = os.environ) -> "StatisticsRecorder | None":
        spec = environ.get(RANGE_VARIABLE)
        if not spec:
            return None
        match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", spec)
        if not match:
            raise EplbInputError(f"{RANGE_VARIABLE}={spec!r}: expected 'start-stop', e.g. '10-20'")
        return cls(environ.get(PATH_VARIABLE) or DEFAULT_PATH, int(match[1]), int(match[2]), layer_ids,
                   num_experts_per_token)

    def wants(self, iteration: int) -> bool:
        return self.start <= iteration < self.stop and not self.written

    def begin_iteration(self, iteration: int) -> None:
        """Writes the dump when iteration ``stop`` starts."""
        if iteration == self.stop and not self.written:
            self.flush()

    def add(self, iteration: int, counts) -> None:
        """counts: ``[Lm, R, X]`` of one iteration."""
        if self.wants(iteration):
            self._counts[iteration] = np.asarray(counts, np.int64)

    @property
    def iterations(self) -> list[int]:
        return sorted(self._counts)

    def statistics(self) -> ExpertLoadStats:
        """What was recorded so far, summed over ranks (``ep_size`` kept)."""
        if not self._counts:
            raise EplbInputError(f"no iteration fell in [{self.start}, {self.stop}); nothing was recorded")
        stacked = np.stack([self._counts[i] for i in self.iterations])  # [I, Lm, R, X]
        return ExpertLoadStats(stacked.sum(axis=2), self.layer_ids, self.iterations[0], self.top_k,
                               ep_size=stacked.shape[2])

    def flush(self, partial: bool = False) -> Path | None:
        """Writes what was recorded (once), whole or not at all; ``partial`` marks a run that was
        interrupted. Returns the directory, or None if nothing was written (or there is no path)."""
        if self.written or not self._counts or self.path is None:
            return None
        iterations = self.iterations
        stacked = np.stack([self._counts[i] for i in iterations])  # [I, Lm, R, X]
        if jax.process_index() != 0:  # multi-host: counts are all-gathered; process 0 writes every rank file
            self.written = True
            return self.path
        save_trtllm_dump(self.path, stacked.transpose(2, 0, 1, 3), self.layer_ids, iterations[0], self.top_k,
                         partial=partial)
        self.written = True
        return self.path
