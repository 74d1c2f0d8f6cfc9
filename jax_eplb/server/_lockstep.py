"""Serving across hosts in lockstep, through ``jax.distributed``'s own key-value store.

One process per host (Slurm, MPI or explicit flags start ``jax.distributed``); process 0 takes the
HTTP requests and decides, every other process follows. Before each iteration process 0 publishes
the batcher operations it made since the last one, in order (requests queued with their prompt ids
and sampling parameters, cancellations, admissions, a state save, the stop) under the iteration's
key; a follower applies the same operations to its own batcher and runs the same jitted step, so
every process holds the same rows (the step all-gathers the tokens; process 0 hands them out).

Liveness, with every wait bounded: each process bumps a counter key once a second. A follower
waiting for the next iteration watches process 0's counter (and the store itself, which lives in
process 0); process 0 watches the followers'. A counter that has not moved for ``timeout_s`` means
that process is lost. The timeout stays well under JAX's own heartbeat timeout (100 s by default),
after which JAX's runtime aborts every process without a word to the clients.
"""

from __future__ import annotations

import json
import threading
import time

import jax

from jax_eplb.serving import Request

PREFIX = "jax_eplb/serve"
BEAT_S = 1.0


class ProcessLost(Exception):
    """A process of the run stopped beating (``process``) or the store is gone (process 0)."""

    def __init__(self, process: int, why: str):
        super().__init__(f"process {process} was lost ({why})")
        self.process = process


def request_to_json(request: Request) -> dict:
    return {"task_id": request.task_id, "input_ids": list(request.input_ids), "output_tokens": request.output_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "seed": request.seed,
            "stop_ids": sorted(request.stop_ids)}


def request_from_json(raw: dict) -> Request:
    return Request(raw["task_id"], tuple(raw["input_ids"]), raw["output_tokens"], raw["temperature"], raw["top_p"],
                   raw["seed"], frozenset(raw["stop_ids"]))


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized (multi-host serving needs it)")
    return client


class _Watch:
    """When each watched process's counter last moved."""

    def __init__(self, client, processes, timeout_s: float):
        now = time.monotonic()
        self.client, self.timeout_s = client, timeout_s
        self.seen = {p: (None, now) for p in processes}

    def lost(self) -> ProcessLost | None:
        now = time.monotonic()
        for process, (value, since) in self.seen.items():
            try:
                current = self.client.key_value_try_get(f"{PREFIX}/alive/{process}")
            except Exception as err:  # noqa: BLE001 - NOT_FOUND before its first beat; else the store is gone
                if "NOT_FOUND" not in str(err).upper():
                    return ProcessLost(0, f"the coordination service is unreachable: {str(err).splitlines()[0]}")
                current = None
            if current != value:
                self.seen[process] = (current, now)
            elif now - since > self.timeout_s:
                return ProcessLost(process, f"no heartbeat for {now - since:.0f} s")
        return None


class Lockstep:
    """Process 0's per-iteration operations to every process, and heartbeats (see the module)."""

    def __init__(self, timeout_s: float = 10.0):
        self.client = _client()
        self.index, self.count = jax.process_index(), jax.process_count()
        self.timeout_s = timeout_s
        self._stopped = threading.Event()
        self._beats = 0
        self._beat()
        self._thread = threading.Thread(target=self._heartbeat, name="jax-eplb-heartbeat", daemon=True)
        self._thread.start()

    @property
    def leader(self) -> bool:
        return self.index == 0

    def _beat(self) -> None:
        self._beats += 1
        self.client.key_value_set(f"{PREFIX}/alive/{self.index}", str(self._beats), allow_overwrite=True)

    def _heartbeat(self) -> None:
        while not self._stopped.wait(BEAT_S):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store is gone with process 0: the waits notice
                return

    def close(self) -> None:
        self._stopped.set()

    def publish(self, iteration: int, operations: list) -> None:
        """Process 0: the operations every process applies before iteration ``iteration``."""
        self.client.key_value_set(f"{PREFIX}/step/{iteration}", json.dumps(operations))
        if iteration >= 2:  # every process has read it: they all ran the step after it
            try:
                self.client.key_value_delete(f"{PREFIX}/step/{iteration - 2}")
            except Exception:  # noqa: BLE001 - a missing key is fine
                pass

    def receive(self, iteration: int) -> list:
        """A follower: the operations of iteration ``iteration``, waiting while process 0 is idle and
        alive; ``ProcessLost`` when it is not."""
        watch = _Watch(self.client, [0], self.timeout_s)
        while True:
            try:
                return json.loads(self.client.blocking_key_value_get(f"{PREFIX}/step/{iteration}", 1000))
            except Exception as err:  # noqa: BLE001 - a timeout: look at process 0; anything else: it is gone
                text = str(err).upper()
                if "DEADLINE" not in text and "TIMEOUT" not in text and "TIMED OUT" not in text:
                    raise ProcessLost(0, f"the coordination service is unreachable: {str(err).splitlines()[0]}")
            lost = watch.lost()
            if lost is not None:
                raise lost

    def watch_followers(self, on_lost, stopped: threading.Event) -> threading.Thread:
        """Process 0: a thread calling ``on_lost(ProcessLost)`` once when a follower stops beating."""
        def run():
            watch = _Watch(self.client, range(1, self.count), self.timeout_s)
            while not stopped.wait(BEAT_S):
                lost = watch.lost()
                if lost is not None:
                    on_lost(lost)
                    return

        thread = threading.Thread(target=run, name="jax-eplb-watchdog", daemon=True)
        thread.start()
        return thread
