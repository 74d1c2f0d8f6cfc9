"""Measuring ``auto``'s candidates: each on its own thread within a time limit, the fastest correct one
chosen, cached per key; with several processes, settled outside tracing in one agreed order.

One process: a choice is measured where it is first needed, even while the caller is being traced
(jit, shard_map): every candidate runs on a fresh thread, where no trace of the caller's is active.
A candidate that fails, differs from the reference or takes longer than ``CANDIDATE_LIMIT_S``
(compile, check and timed runs together) is out, with its reason; a thread over the limit is
abandoned (a daemon: it cannot hold the process at exit).

Several processes: every process must compile the same program, and a collective inside a trace
deadlocks when processes reach shapes in different orders. So a trace never measures there:
:func:`settle_choices` traces the caller's program once while *collecting* the choices it needs,
then measures them outside tracing in the order of their keys (the same on every process), gathers
every process's figures (``process_allgather``, a collective of JAX's runtime) and takes, per
choice, the fastest candidate that ran correctly on every process (by its slowest process). A
choice reached in a trace that was not settled takes the reference, with a line saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from typing import Callable, Hashable, Mapping, NamedTuple

import jax
import numpy as np

logger = logging.getLogger("jax_eplb_kernels")

TIMED_RUNS = 5
CANDIDATE_LIMIT_S = float(os.environ.get("JAX_EPLB_PROBE_LIMIT_S", "120"))  # per candidate: compile + runs

Trials = Mapping[str, Callable[[], object]]  # implementation -> run it once on the call's shapes


class Choice(NamedTuple):
    """One ``auto`` decision to make: ``trials()`` builds the candidates, ``reference`` is always valid."""

    key: Hashable
    trials: Callable[[], Trials]
    reference: str
    close: Callable[[object, object], bool]
    subject: str
    device: object = None  # where the candidates run (None: the default device)
    log: Callable[[str], None] | None = None


_choices: dict[Hashable, str] = {}
_state = threading.local()  # .collected: list[Choice] while settle_choices traces


def fastest_correct(trials: Callable[[], Trials], key: Hashable, *, reference: str,
                    close: Callable[[object, object], bool] | None = None, subject: str = "",
                    log: Callable[[str], None] | None = None, device=None) -> str:
    """The fastest of ``trials()`` whose output is ``close`` to ``reference``'s; decided once per ``key``.

    One process: measured now (each candidate on its own thread, within ``CANDIDATE_LIMIT_S``), one line
    on stderr with every candidate's median time or why it is out. Several processes: taken from
    :func:`settle_choices`; never measured inside a trace (the reference, with a line, if unsettled).
    """
    if key in _choices:
        return _choices[key]
    choice = Choice(key, trials, reference, close or _equal, subject or str(key), device, log)
    collected = getattr(_state, "collected", None)
    if collected is not None:  # settle_choices is tracing: note it, decide later, outside the trace
        collected.append(choice)
        return reference
    if jax.process_count() > 1:
        _say(choice, f"{choice.subject}: not settled before tracing with {jax.process_count()} processes "
                     f"(see jax_eplb_kernels.settle_choices) -> {reference}")
        _choices[key] = reference
        return reference
    names, figures = measure(choice)
    chosen = agree(names, np.asarray([[_seconds(figures[n]) for n in names]]))
    _say(choice, _line(choice.subject, names, figures, chosen))
    _choices[key] = chosen
    return chosen


def settle_choices(trace: Callable[[], object], gather: Callable[[np.ndarray], np.ndarray] | None = None) -> list:
    """Runs ``trace()`` (tracing the program that will be compiled) collecting the ``auto`` choices it
    needs, then makes them outside tracing, in key order, agreed over processes. Returns the keys settled.

    ``gather``: ``[n]`` -> ``[processes, n]`` (default: ``multihost_utils.process_allgather`` with several
    processes, else the one row). Call it on every process with the same program. JAX's trace caches
    are cleared afterwards when a choice was made, so the next trace sees the choices.
    """
    _state.collected = collected = []
    try:
        trace()
    finally:
        _state.collected = None
    pending = {c.key: c for c in collected if c.key not in _choices}
    ordered = sorted(pending.values(), key=lambda c: repr(c.key))
    gather = gather or _default_gather()
    if not _same_everywhere(gather, [c.key for c in ordered]):  # processes traced different programs
        for choice in ordered:
            _say(choice, f"{choice.subject}: the processes need different choices -> {choice.reference}")
            _choices[choice.key] = choice.reference
        ordered = []
    for choice in ordered:  # two gathers per choice on every process, whatever happens locally
        try:
            names, figures = measure(choice)
        except Exception as error:  # noqa: BLE001 - the reference failed here: the gathers must go on
            names, figures = [choice.reference], {choice.reference: f"{type(error).__name__}: {error}"[:200]}
        if not _same_everywhere(gather, (choice.key, names)):  # other candidates elsewhere: take the safe one
            _say(choice, f"{choice.subject}: the processes' candidates differ -> {choice.reference}")
            _choices[choice.key] = choice.reference
            continue
        seconds = gather(np.asarray([_seconds(figures[n]) for n in names], np.float64))
        chosen = agree(names, seconds)
        failed = {n: [p for p in range(seconds.shape[0]) if not np.isfinite(seconds[p, i])]
                  for i, n in enumerate(names)}
        _say(choice, _line(choice.subject, names, figures, chosen, failed if seconds.shape[0] > 1 else None))
        _choices[choice.key] = chosen
    if ordered:
        jax.clear_caches()  # the collecting trace baked the references in; the real one must not reuse it
    return [c.key for c in ordered]


def agree(names: list[str], seconds: np.ndarray) -> str:
    """The candidate that ran correctly on every process (finite in every row of ``seconds`` ``[P, n]``)
    with the smallest slowest-process time; ``names[0]`` (the reference) if none did."""
    seconds = np.atleast_2d(np.asarray(seconds, np.float64))
    worst = np.where(np.isfinite(seconds).all(axis=0), seconds.max(axis=0), np.inf)
    best = int(np.argmin(worst))
    return names[best] if np.isfinite(worst[best]) else names[0]


def _same_everywhere(gather, value) -> bool:
    digest = np.frombuffer(hashlib.sha256(repr(value).encode()).digest()[:8], np.int64)
    return bool(np.all(gather(digest) == digest))


def measure(choice: Choice) -> tuple[list[str], dict[str, float | str]]:
    """Each candidate's median seconds, or why it is out, the reference first. Every candidate (the
    reference too) runs on a fresh thread within ``CANDIDATE_LIMIT_S``; an error in the reference raises."""
    status, runs = _limited(lambda: _with(choice.device, lambda: dict(choice.trials())))  # off the caller's trace
    if status != "ok":
        raise runs if status == "error" else TimeoutError(f"{choice.subject}: building the trials took over "
                                                           f"{CANDIDATE_LIMIT_S:g} s")
    if choice.reference not in runs:
        raise ValueError(f"trials must include the reference {choice.reference!r}, got {sorted(runs)}")
    names = [choice.reference] + sorted(n for n in runs if n != choice.reference)
    status, want = _limited(lambda: _with(choice.device, lambda: jax.block_until_ready(runs[choice.reference]())))
    if status == "timeout":
        return names, {n: f"not measured: the reference ran over {CANDIDATE_LIMIT_S:g} s" if n != choice.reference
                       else f"over the {CANDIDATE_LIMIT_S:g} s limit" for n in names}
    if status == "error":
        raise want
    figures: dict[str, float | str] = {}
    for name in names:
        def run(name=name):
            got = want if name == choice.reference else jax.block_until_ready(runs[name]())
            if name != choice.reference and not choice.close(got, want):
                return "differs from the reference"
            return median_time(runs[name])

        status, value = _limited(lambda: _with(choice.device, run))
        if status == "timeout":
            figures[name] = f"over the {CANDIDATE_LIMIT_S:g} s limit"
        elif status == "error":
            if name == choice.reference:
                raise value
            figures[name] = f"{type(value).__name__}: {str(value).splitlines()[0][:200] if str(value) else ''}"
        else:
            figures[name] = value
    return names, figures


def median_time(run: Callable[[], object], repeats: int | None = None) -> float:
    """Median seconds of ``repeats`` (default ``TIMED_RUNS``) runs of ``run`` (compiled already), each waited for."""
    times = []
    for _ in range(repeats or TIMED_RUNS):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _limited(fn: Callable[[], object]) -> tuple[str, object]:
    """``("ok", result)``, ``("error", exception)`` or ``("timeout", None)``: ``fn`` on a fresh daemon thread."""
    box: dict[str, object] = {}

    def target():
        try:
            box["ok"] = fn()
        except Exception as error:  # noqa: BLE001 - reported by the caller
            box["error"] = error

    thread = threading.Thread(target=target, name="jax_eplb-auto-candidate", daemon=True)
    thread.start()
    thread.join(CANDIDATE_LIMIT_S)
    if thread.is_alive():
        return "timeout", None
    return ("error", box["error"]) if "error" in box else ("ok", box["ok"])


def _with(device, fn):
    with _on(device):
        return fn()


def _on(device):
    return jax.default_device(device) if device is not None else contextlib.nullcontext()


def _seconds(figure: float | str) -> float:
    return figure if isinstance(figure, float) else float("inf")


def _line(subject: str, names, figures, chosen: str, failed_on: dict | None = None) -> str:
    def cell(name):
        if not isinstance(figures[name], float):
            return f"{name} out ({figures[name]})"
        if failed_on and failed_on[name]:
            return f"{name} out (failed on process {', '.join(map(str, failed_on[name]))})"
        return f"{name} {figures[name] * 1e6:.1f} us"

    return f"{subject}: " + ", ".join(cell(n) for n in names) + f" -> {chosen}"


def _say(choice: Choice, line: str) -> None:
    if jax.process_index() == 0:
        (choice.log or _stderr)(line)
    logger.info(line)


def _default_gather() -> Callable[[np.ndarray], np.ndarray]:
    if jax.process_count() == 1:
        return lambda row: np.asarray(row)[None]
    from jax.experimental import multihost_utils

    return lambda row: np.asarray(multihost_utils.process_allgather(np.asarray(row)))


def _equal(got, want) -> bool:
    return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(got),
                                                                            jax.tree.leaves(want)))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
