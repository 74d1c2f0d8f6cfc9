"""What the server shows of its work: Prometheus metrics and the balance state behind ``/eplb``.

Fed by the engine thread: per request (queued, each token, finished) and per iteration (the same
``add`` as the benchmark's figures: step time, per-rank load ``[Lm, R]``, the online balancer's
report). Per MoE layer (label ``layer``: the decoder-layer index, as in statistics and plans):
the in-graph rank imbalance (max/mean - 1 of routed entries per rank) over the last ``WINDOW``
iterations, rebalances, slots and bytes moved, planner and rewrite seconds (a plan of k layers
counts 1/k of its seconds on each). ``/eplb`` adds the placement in force, each layer's expert
load over the window and its imbalance over time.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jax_eplb._metrics import load_metrics
from jax_eplb.model import ModelConfig

WINDOW = 64  # iterations in the windowed figures (imbalance gauge, expert load)
HISTORY = 600  # points of imbalance over time kept for the live page
PREFIX = "jax_eplb_"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineMonitor:
    """Prometheus metrics (its own ``registry``) and the windowed balance state of one engine.

    Args:
      placement: returns the ``[Lm, S]`` placement in force (read after an online update).
    """

    def __init__(self, config: ModelConfig, ranks: int, batch: int, placement: Callable[[], np.ndarray]):
        self.config, self.ranks, self.batch, self._placement = config, ranks, batch, placement
        self.layer_ids = [str(i) for i in config.moe_layer_ids]
        self.traffic = None  # the benchmark figures' interface: no traffic recording here
        r = self.registry = CollectorRegistry()
        self.requests = Counter(PREFIX + "requests", "Requests finished, by finish reason", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of submitted requests", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From submission to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Between a request's consecutive tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.iteration_seconds = Histogram(PREFIX + "iteration_seconds", "Engine step time, by phase", ["phase"],
                                           buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(PREFIX + "queue_depth", "Requests waiting for a batch row", registry=r)
        self.running = Gauge(PREFIX + "running_requests", "Requests holding a batch row", registry=r)
        self.occupancy = Gauge(PREFIX + "batch_occupancy", "Share of the batch rows in use", registry=r)
        Gauge(PREFIX + "batch_rows", "Batch rows (max_batch_size rounded up to a multiple of ep)",
              registry=r).set(batch)
        self.imbalance = Gauge(PREFIX + "moe_rank_imbalance",
                               f"In-graph max/mean - 1 of routed entries per rank, mean of the last {WINDOW} "
                               f"iterations", ["layer"], registry=r)
        self.rebalances = Counter(PREFIX + "moe_rebalances", "Online placement updates applied", ["layer"],
                                  registry=r)
        self.slots_moved = Counter(PREFIX + "moe_slots_moved", "Slots rewritten by online updates", ["layer"],
                                   registry=r)
        self.bytes_moved = Counter(PREFIX + "moe_bytes_moved", "Expert bytes written by online updates", ["layer"],
                                   registry=r)
        self.planner_seconds = Counter(PREFIX + "moe_planner_seconds", "Host planner time of applied updates",
                                       ["layer"], registry=r)
        self.rewrite_seconds = Counter(PREFIX + "moe_rewrite_seconds", "Step-loop time rewriting slots",
                                       ["layer"], registry=r)
        for layer in self.layer_ids:  # every layer's series exists from the start
            for metric in (self.imbalance, self.rebalances, self.slots_moved, self.bytes_moved,
                           self.planner_seconds, self.rewrite_seconds):
                metric.labels(layer=layer)
        self._lock = threading.Lock()
        self._requests: dict = {}  # task_id -> (submitted at, last token at or None)
        self._imbalance = collections.deque(maxlen=WINDOW)  # [Lm] per iteration
        self._expert_load = collections.deque(maxlen=WINDOW)  # [Lm, E] per iteration
        self._history = collections.deque(maxlen=HISTORY)  # {"iteration", "time", "imbalance": [Lm]}
        self._last_update: dict = {layer: None for layer in self.layer_ids}
        self._shown = np.array(placement(), copy=True)  # [Lm, S] as last seen
        self.iterations = 0

    # ------------------------------------------------------------------ requests

    def submitted(self, task_id, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        with self._lock:
            self._requests[task_id] = (time.perf_counter(), None)

    def token(self, task_id) -> None:
        """A token of a submitted request: its first is timed from submission (TTFT), later ones from the one
        before (inter-token latency); a request not (or no longer) known counts, but is not timed."""
        now = time.perf_counter()
        self.generation_tokens.inc()
        with self._lock:
            if task_id not in self._requests:
                return
            submitted, last = self._requests[task_id]
            self._requests[task_id] = (submitted, now)
        (self.ttft.observe(now - submitted) if last is None else self.itl.observe(now - last))

    def finished(self, task_id, reason: str) -> None:
        self.requests.labels(finish_reason=reason).inc()
        with self._lock:
            self._requests.pop(task_id, None)

    def rows(self, running: int) -> None:
        self.running.set(running)
        self.occupancy.set(running / self.batch)

    def idle(self) -> None:
        self.rows(0)
        self.queue_depth.set(0)

    # ------------------------------------------------------------------ iterations (the figures' interface)

    def add(self, iteration: int, mixed: bool, seconds: float, rank_load: np.ndarray, rows: int, update=None,
            rank_rows: np.ndarray | None = None) -> None:
        self.iteration_seconds.labels(phase="mixed" if mixed else "decode").observe(seconds)
        per_layer = load_metrics(np.asarray(rank_load, np.float64)[None]).imbalance  # [Lm]
        with self._lock:
            self.iterations = iteration + 1
            self._imbalance.append(per_layer)
            self._history.append({"iteration": iteration, "time": time.time(),
                                  "imbalance": [round(float(v), 5) for v in per_layer]})
            window = np.mean(self._imbalance, axis=0)
        for layer, value in zip(self.layer_ids, window):
            self.imbalance.labels(layer=layer).set(float(value))
        if update is not None and update.layers_applied:
            self._updated(iteration, update)

    def expert_totals(self, totals) -> None:
        """One iteration's ``[Lm, E]`` expert loads (summed over ranks)."""
        if totals is not None:
            with self._lock:
                self._expert_load.append(np.asarray(totals, np.float64))

    def _updated(self, iteration: int, update) -> None:
        placement = np.array(self._placement(), copy=True)
        moved = (placement != self._shown).sum(axis=1)  # [Lm] slots rewritten per layer
        self._shown = placement
        per_slot = update.bytes_moved / max(update.slots_moved, 1)
        share = 1.0 / len(update.layers_applied)
        for index in update.layers_applied:
            layer = self.layer_ids[index]
            self.rebalances.labels(layer=layer).inc()
            self.slots_moved.labels(layer=layer).inc(int(moved[index]))
            self.bytes_moved.labels(layer=layer).inc(float(moved[index] * per_slot))
            self.planner_seconds.labels(layer=layer).inc(update.plan_seconds * share)
            self.rewrite_seconds.labels(layer=layer).inc(update.apply_seconds * share)
            with self._lock:
                self._last_update[layer] = {"iteration": iteration, "time": time.time(),
                                            "slots_moved": int(moved[index]),
                                            "bytes_moved": int(moved[index] * per_slot)}

    # ------------------------------------------------------------------ /eplb

    def snapshot(self) -> dict:
        """The balance state as JSON-ready data (``/eplb``)."""
        placement = np.asarray(self._placement())
        with self._lock:
            window = np.mean(self._imbalance, axis=0) if self._imbalance else np.zeros(len(self.layer_ids))
            load = (np.sum(self._expert_load, axis=0) if self._expert_load
                    else np.zeros((len(self.layer_ids), self.config.num_experts)))
            history = list(self._history)
            last_update = dict(self._last_update)
            window_iterations = len(self._imbalance)
            iterations = self.iterations
        return {
            "model": self.config.name, "ep_size": self.ranks, "num_experts": self.config.num_experts,
            "num_slots": int(placement.shape[1]), "layers": [int(i) for i in self.layer_ids],
            "iterations": iterations,
            "placement": {layer: [int(e) for e in row] for layer, row in zip(self.layer_ids, placement)},
            "imbalance": {"window_iterations": window_iterations,
                          "per_layer": {layer: float(v) for layer, v in zip(self.layer_ids, window)},
                          "mean": float(np.mean(window)) if window_iterations else 0.0},
            "expert_load": {layer: [float(v) for v in row] for layer, row in zip(self.layer_ids, load)},
            "history": history,
            "last_update": last_update,
        }
