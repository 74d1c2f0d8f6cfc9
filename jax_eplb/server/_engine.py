"""The serving engine: ``bench throughput``'s iteration loop fed from a request queue.

The same model, jitted steps, in-flight batcher, static or online ``moe_load_balancer`` and
``EXPERT_STATISTIC_*`` recording as ``run_throughput`` (``serving._throughput``); requests come
from ``submit`` (any thread) instead of a dataset, and each token goes to its request's listener
as soon as its iteration ends. One thread owns the device: it admits waiting requests, runs one
iteration, hands out the tokens, and sleeps when there is nothing to do. Prompts prefill in
chunks of ``prefill_chunk`` tokens beside the decoding rows (chunked prefill: the tokens equal
whole-prompt prefill).

Across hosts (``jax.process_count() > 1``) process 0 runs this engine behind the HTTP server and
publishes every batcher operation it makes to the other processes before each iteration
(``_lockstep``); each of them runs ``follow()``: the same operations, the same steps, until process
0 says stop. A lost follower fails the requests in flight and ends process 0 (its steps cannot
complete without it); a lost process 0 ends the followers.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

import jax
import numpy as np

from jax_eplb._errors import EplbInputError
from jax_eplb._plan_config import MoeLoadBalancerConfig
from jax_eplb.model import ModelConfig, WeightSource
from jax_eplb.serving import InFlightBatcher, Request, StatisticsRecorder, ThroughputSettings
from jax_eplb.serving._throughput import ServingLoop, check_serving, flush_statistics, prepare_serving
from jax_eplb.sharding import num_ranks
from jax_eplb.server._lockstep import Lockstep, ProcessLost, request_from_json, request_to_json
from jax_eplb.server._monitor import EngineMonitor

FINISH_REASONS = ("stop", "length", "abort", "error")


class Listener(Protocol):
    """Receives one request's tokens: on the engine thread (must not block), or wherever the engine's
    ``deliver`` hands them."""

    def __call__(self, token: int | None, finish_reason: str | None) -> None:
        """``token``: the next generated id (None with a finish reason of abort or error);
        ``finish_reason``: None while the request goes on, else one of ``FINISH_REASONS``."""


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already (HTTP 503)."""


class EngineStopped(Exception):
    """The engine no longer takes requests (shutting down, or its step failed)."""


class ServingEngine:
    """Serves requests submitted from any thread with the benchmark's loop.

    Args:
      prefill_chunk: prompt tokens a row prefills per iteration (compiled shape ``[batch, chunk]``).
      max_queue: most requests waiting for a row (beyond the rows free now); ``submit`` raises
        ``QueueFull`` past it.
      eos_ids: the model's end-of-sequence ids (requests stop at them unless they ignore EOS).
      max_waiting_steps: while rows decode, a waiting request joins at the latest after this many
        iterations (sooner when the waiting requests fill the free rows or a prompt is prefilling
        anyway); 0: at once.
      batch_wait_ms: an idle engine starts once no request arrived for this long (at most 10x),
        so a burst of requests prefills together.
      deliver: ``deliver([(listener, token, reason), ...])`` is called once per iteration with its
        events instead of calling each listener on the engine thread (a server hands the batch to
        its event loop in one wake-up).
      log: progress lines (model build, compile, shutdown).
      online_state_interval: with ``online_state``, also save it every this many seconds (atomically;
        None: at the graceful exit only).
      process_timeout_s: across hosts, a process whose heartbeat stops this long is lost.
    ``settings.max_batch_size`` rows (rounded up to a multiple of ep); the KV cache holds
    ``config.max_seq_len`` positions per row: a request's prompt plus its tokens must fit.
    """

    def __init__(self, config: ModelConfig, weights: WeightSource, mesh, settings: ThroughputSettings, *,
                 plan: MoeLoadBalancerConfig | None = None, recorder: StatisticsRecorder | None = None,
                 online_state: str | Path | None = None, prefill_chunk: int = 32, max_queue: int = 256,
                 eos_ids: frozenset = frozenset(), max_waiting_steps: int = 8, batch_wait_ms: float = 5.0,
                 deliver: Callable[[list], None] | None = None, log: Callable[[str], None] = print,
                 online_state_interval: float | None = None, process_timeout_s: float = 10.0):
        if online_state_interval is not None and online_state_interval <= 0:
            raise EplbInputError(f"--online_state_interval must be > 0 seconds, got {online_state_interval}")
        if prefill_chunk < 1 or max_queue < 1 or max_waiting_steps < 0 or batch_wait_ms < 0:
            raise EplbInputError(f"prefill chunk and queue size must be >= 1, waiting steps and batch wait >= 0; got "
                                 f"{prefill_chunk}, {max_queue}, {max_waiting_steps}, {batch_wait_ms}")
        check_serving(config, settings, mesh, plan, online_state)
        # Across hosts: heartbeats start before the (long) build, so no process looks lost meanwhile.
        self._lockstep = Lockstep(process_timeout_s) if jax.process_count() > 1 else None
        self._operations: list = []  # process 0: batcher operations since the last iteration, in order
        self._published = -1  # process 0: the last iteration whose operations went out
        self.online_state_interval, self._last_save = online_state_interval, time.monotonic()
        self._watch_stopped = threading.Event()
        self.config, self.settings, self.plan, self.log = config, settings, plan, log
        self.recorder, self.online_state, self.max_queue = recorder, online_state, max_queue
        self.eos_ids = frozenset(eos_ids)
        self.deliver, self._events = deliver, []
        self.max_waiting_steps, self.batch_wait_s = max_waiting_steps, batch_wait_ms / 1e3
        self._waiting_since: dict = {}  # task_id -> (iteration, time) it was queued
        self._last_arrival = 0.0
        ranks = num_ranks(mesh)
        self.batch = -(-settings.max_batch_size // ranks) * ranks
        self.chunk = min(prefill_chunk, config.max_seq_len)
        self.runner, self.balancer, tables = prepare_serving(
            config, weights, mesh, settings, plan=plan, recording=recorder is not None, online_state=online_state,
            batch=self.batch, chunk=self.chunk, log=log, sampling=True, expert_totals=True)
        self._initial_placement = tables.slot_to_expert
        self.monitor = EngineMonitor(config, ranks, self.batch, self.placement)
        self._loop = ServingLoop(self.runner, settings, self.batch, self.chunk, recorder, self.balancer, None,
                                  self.monitor)
        self._loop.timed_start = 0  # the online schedule counts from the first iteration
        self._batcher = InFlightBatcher([], self.batch, self.chunk, settings.eos_id)
        self._cache = self.runner.new_cache(self.batch)
        self._lock = threading.Condition()
        self._incoming: list[Request] = []
        self._cancelled: set = set()
        self._listeners: dict = {}  # task_id -> Listener of every waiting or running request
        self._accepting, self._draining, self._abort = True, False, False
        self._aborted_any = False  # some request was aborted by the shutdown: the dump is partial
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="jax-eplb-engine", daemon=True)

    # ------------------------------------------------------------------ any thread

    def start(self) -> "ServingEngine":
        """Process 0 (or the only process): starts the engine thread (and, across hosts, the watchdog)."""
        if self._lockstep is not None:
            if not self._lockstep.leader:
                raise RuntimeError("only process 0 serves requests; the other processes follow()")
            self._lockstep.watch_followers(self._lost, self._watch_stopped)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, request: Request, listener: Listener) -> None:
        """Queues ``request``; its tokens go to ``listener``. Raises ``QueueFull``, ``EngineStopped``, or
        ``EplbInputError`` when the prompt and its tokens do not fit the cache."""
        if len(request.input_ids) + request.output_tokens > self.config.max_seq_len:
            raise EplbInputError(f"prompt ({len(request.input_ids)} tokens) + max_tokens ({request.output_tokens}) "
                                 f"exceeds --max_seq_len {self.config.max_seq_len}")
        with self._lock:
            if not self._accepting or self.error is not None:
                raise EngineStopped("the server is shutting down" if self.error is None else
                                    f"the engine failed: {self.error}")
            free_rows = self.batch - self._batcher.running  # taken at the next iteration
            if len(self._incoming) + len(self._batcher.queue) - free_rows >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting for a row already")
            if request.task_id in self._listeners:
                raise ValueError(f"request id {request.task_id!r} is being served already")
            self._listeners[request.task_id] = listener
            self._incoming.append(request)
            self.monitor.queue_depth.set(len(self._incoming) + len(self._batcher.queue))
            self.monitor.submitted(request.task_id, len(request.input_ids))
            self._lock.notify()

    def cancel(self, task_id) -> None:
        """Drops a waiting or running request (a client went away): its row is free at the next iteration."""
        with self._lock:
            if task_id in self._listeners:
                self._cancelled.add(task_id)
                self._lock.notify()

    def placement(self) -> np.ndarray:
        """``[Lm, S]`` slot -> expert of the placement in force."""
        return self.balancer.slot_to_expert if self.balancer is not None else self._initial_placement

    def describe_plan(self) -> dict:
        """How the placement is kept: none (one slot per expert), a static plan, or online updates."""
        plan, settings = self.plan, self.settings
        online = plan is not None and plan.layer_updates_per_iter > 0
        return {"mode": "online" if online else "static" if plan is not None else "none",
                "layer_updates_per_iter": plan.layer_updates_per_iter if plan is not None else 0,
                "online_planner": settings.online_planner if online else None,
                "replica_policy": settings.replica_policy, "source": getattr(plan, "source", None)}

    def stop(self, grace_s: float = 30.0) -> None:
        """Stops taking requests, lets running and waiting ones finish for up to ``grace_s``, aborts the
        rest, then applies online plans in flight, saves ``online_state`` and writes the statistics dump
        whole (``partial`` when requests were aborted or the engine failed)."""
        with self._lock:
            self._accepting, self._draining = False, True
            self._lock.notify()
        self._thread.join(timeout=max(grace_s, 0.0))
        with self._lock:
            self._abort = True
            self._lock.notify()
        self._thread.join()
        self._finish_run(self._aborted_any or self.error is not None)

    def _finish_run(self, aborted: bool) -> None:
        """Every process, once its loop ended: in-flight plans applied, the state saved, the dump written
        (by process 0)."""
        self._watch_stopped.set()
        if self.balancer is not None and self.error is None:
            self.balancer.finish()
            if self.online_state:
                self._save_state()
        flush_statistics(self.recorder, self.log, aborted)
        if self._lockstep is not None:
            self._lockstep.close()

    def _save_state(self) -> None:
        self.balancer.save_state(self.online_state)
        self._last_save = time.monotonic()
        self.log(f"online balancer state saved to {self.online_state}")

    # ------------------------------------------------------------------ across hosts

    def _record(self, *operation) -> None:
        if self._lockstep is not None:
            self._operations.append(list(operation))

    def _publish(self, *last) -> None:
        """Process 0: this iteration's operations (and ``last`` ones) to every process."""
        if self._lockstep is not None:
            operations = [[name, request_to_json(args[0])] if name == "queue" else [name, *args]
                          for name, *args in self._operations + [list(op) for op in last]]
            self._operations = []
            # the iteration's key; after a failed step its key is taken: the followers read the next one
            self._published = max(self._loop.iteration, self._published + 1)
            self._lockstep.publish(self._published, operations)

    def follow(self) -> None:
        """A follower process: applies process 0's operations and runs the same iterations until it says
        stop (``ProcessLost`` when process 0 goes away)."""
        if self._lockstep is None or self._lockstep.leader:
            raise RuntimeError("follow() is for processes other than process 0")
        try:
            while not self._apply(self._lockstep.receive(self._loop.iteration)):
                self._iteration()
        except ProcessLost:
            self._lockstep.close()
            raise
        self._finish_run(aborted=False)

    def _apply(self, operations: list) -> bool:
        """Process 0's operations on this process's batcher, in order; True at stop."""
        for name, *args in operations:
            if name == "queue":
                self._batcher.queue.append(request_from_json(args[0]))
            elif name == "cancel":
                self._batcher.cancel(args[0])
            elif name == "admit":
                self._batcher.admit()
            elif name == "save":
                self._save_state()
            elif name == "stop":
                return True
            elif name == "fail":
                self.error = RuntimeError("process 0's serving step failed")
                return True
            else:
                raise ValueError(f"unknown lockstep operation {name!r}")
        return False

    def _lost(self, lost: ProcessLost) -> None:
        """Process 0's watchdog: a follower is gone, so no step can complete: fail every request, say which
        process was lost, exit non-zero (the engine thread may be blocked in a collective with it)."""
        self.error = lost
        self.log(f"error: {lost}; the requests in flight fail and this process exits")
        self._finish_all("error")
        self._flush_events()
        threading.Timer(1.0, os._exit, (1,)).start()  # a moment for the event loop to answer the clients

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        try:
            while self._next():
                save = self._save_due()
                if save:
                    self._record("save")
                self._publish()
                if save:
                    self._save_state()
                self._iteration()
                self._flush_events()
            self._publish(["stop"])
            self._flush_events()
        except BaseException as err:  # noqa: BLE001 - every waiting client must hear of it
            if self.error is None:
                self.error = err
                self.log(f"error: the serving step failed: {err!r}")
            self._finish_all("error")
            self._flush_events()
            try:
                self._publish(["fail"])  # the followers stop too, saving nothing (as process 0 does)
            except Exception:  # noqa: BLE001 - the followers may be gone too
                pass

    def _save_due(self) -> bool:
        return (self.online_state_interval is not None and self.balancer is not None and bool(self.online_state)
                and time.monotonic() - self._last_save >= self.online_state_interval)

    def _next(self) -> bool:
        """Takes new requests and cancellations, admits waiting requests when due (``_admit_if_due``)
        and waits while idle. False: the loop ends."""
        with self._lock:
            while True:
                now = time.perf_counter()
                for request in self._incoming:
                    self._batcher.queue.append(request)
                    self._record("queue", request)
                    self._waiting_since[request.task_id] = (self._loop.iteration, now)
                    self._last_arrival = now
                self._incoming = []
                for task_id in self._cancelled:
                    self._batcher.cancel(task_id)
                    self._record("cancel", task_id)
                    self._waiting_since.pop(task_id, None)
                    self._end(task_id, None, "abort")
                self._cancelled = set()
                self._flush_events()
                if self._abort:
                    self._finish_all("abort")
                    return False
                if self._batcher.running:
                    self._admit_if_due()
                    return True
                if self._batcher.queue:  # idle: let a burst of arrivals gather into one prefill
                    quiet = now - self._last_arrival
                    oldest = now - min(t for _, t in self._waiting_since.values())
                    if (self._draining or quiet >= self.batch_wait_s or oldest >= 10 * self.batch_wait_s
                            or len(self._batcher.queue) >= self.batch):
                        self._admit()
                        return True
                    self._lock.wait(timeout=self.batch_wait_s - quiet)
                    continue
                self.monitor.idle()
                if self._draining:
                    return False
                self._lock.wait(timeout=1.0)

    def _admit_if_due(self) -> None:
        """While rows decode, waiting requests join when the next step prefills anyway, when they fill
        every free row, or when the oldest has waited ``max_waiting_steps`` iterations: a mixed step
        costs the whole ``[batch, chunk]`` however few rows prefill, so prefills are gathered
        (as TGI's ``max_waiting_tokens``)."""
        free = self.batch - self._batcher.running
        if not self._batcher.queue or not free:
            return
        oldest = self._loop.iteration - min(i for i, _ in self._waiting_since.values())
        if self._batcher.prefilling or len(self._batcher.queue) >= free or oldest >= self.max_waiting_steps:
            self._admit()

    def _admit(self) -> None:
        self._record("admit")
        for request in self._batcher.admit():
            self._waiting_since.pop(request.task_id, None)

    def _iteration(self) -> None:
        self.monitor.queue_depth.set(len(self._batcher.queue))
        self._cache, _ = self._loop.step(self._batcher, self._cache, timed=True)
        self.monitor.expert_totals(self._loop.expert_totals)
        self.monitor.rows(self._batcher.running)
        for emitted in self._batcher.emitted:
            if emitted.finished:
                self._batcher.done.pop(emitted.task_id, None)  # the listener has every token already
            self._end(emitted.task_id, emitted.token, emitted.finish_reason)

    def _end(self, task_id, token, reason) -> None:
        """Hands one request's event to its listener (batched per iteration when ``deliver`` is set)."""
        if task_id not in self._listeners:
            return
        listener = self._listeners[task_id]
        if token is not None:  # before finished(): the last token's gap is measured from the one before it
            self.monitor.token(task_id)
        if reason is not None:
            del self._listeners[task_id]
            self.monitor.finished(task_id, reason)
        if self.deliver is None:
            listener(token, reason)
        else:
            self._events.append((listener, token, reason))

    def _flush_events(self) -> None:
        if self._events:
            events, self._events = self._events, []
            self.deliver(events)

    def _finish_all(self, reason: str) -> None:
        with self._lock:
            pending = list(self._listeners)
            for task_id in pending:
                self._batcher.cancel(task_id)
                self._record("cancel", task_id)
            self._incoming = []
            self._waiting_since.clear()
        if pending and reason == "abort":
            self._aborted_any = True
        for task_id in pending:
            self._end(task_id, None, reason)
