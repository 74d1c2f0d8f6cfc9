"""Choosing an implementation: explicit requests are taken as they are; ``auto`` measures.

On a GPU, ``auto`` runs every candidate of a kernel once, at the shapes of the call, on its own
thread (so it runs eagerly even while the caller is traced by jit / shard_map): a candidate that
fails to compile or disagrees with the XLA reference is out; of the others the fastest (median
of a few timed runs) wins. One line on stderr gives every candidate's figure and the choice; the
choice is cached per kernel configuration and shape. With several processes, process 0 measures
and broadcasts its choice, so every process compiles the same program. Off a GPU ``auto`` is the
XLA reference (``$JAX_EPLB_KERNELS`` overrides what ``auto`` means everywhere).

Candidates: the XLA reference; Pallas on Mosaic GPU (``mosaic_gpu``) where a kernel has one;
Pallas on Triton (``pallas``) only on JAX < 0.11 - JAX deprecates that backend from 0.11 on, so
there it runs only when asked for by name.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import time
from typing import Callable, Hashable, Mapping

import jax
import numpy as np

logger = logging.getLogger("jax_eplb_kernels")

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret", "mosaic_gpu", "mosaic_gpu_interpret")
AUTO_OVERRIDE = "JAX_EPLB_KERNELS"  # e.g. JAX_EPLB_KERNELS=xla: what 'auto' resolves to, everywhere
TIMED_RUNS = 5

_choices: dict[Hashable, str] = {}


def jax_version() -> tuple[int, int]:
    return tuple(int(part) for part in jax.__version__.split(".")[:2])


def triton_in_auto() -> bool:
    """Pallas Triton is one of ``auto``'s candidates only on JAX < 0.11 (deprecated from 0.11 on)."""
    return jax_version() < (0, 11)


Trials = Mapping[str, Callable[[], object]]  # implementation -> run it once on the call's shapes


def resolve_implementation(implementation: str, trials: Callable[[], Trials] | None = None, key: Hashable = None,
                           close: Callable[[object, object], bool] | None = None, subject: str = "") -> str:
    """``auto`` -> the fastest correct of ``trials()`` on a GPU (measured once per ``key``), else ``xla``.

    Args:
      trials: builds ``{implementation: run}`` for the call's shapes, ``xla`` (the reference) among them.
      close: whether a candidate's output equals the reference's (default: exactly).
    Unknown names raise ValueError.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    override = os.environ.get(AUTO_OVERRIDE)
    if override:
        if override not in IMPLEMENTATIONS[1:]:
            raise ValueError(f"${AUTO_OVERRIDE} must be one of {IMPLEMENTATIONS[1:]}, got {override!r}")
        return override
    if jax.default_backend() != "gpu" or trials is None:
        return "xla"
    return fastest_correct(trials, key, reference="xla", close=close, subject=subject or str(key))


def fastest_correct(trials: Callable[[], Trials], key: Hashable, *, reference: str,
                    close: Callable[[object, object], bool] | None = None, subject: str = "",
                    log: Callable[[str], None] | None = None) -> str:
    """The fastest of ``trials()`` whose output is ``close`` to ``reference``'s; measured once per ``key``.

    Runs on a fresh thread (no trace of the caller's is active there). A candidate that raises or
    differs is out; the reference itself is always a valid answer. Prints one line with every
    candidate's median time (or why it is out) and the choice. Several processes: process 0's
    choice, broadcast.
    """
    if key in _choices:
        return _choices[key]
    close = close or _equal
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        names, figures, chosen = pool.submit(_decide, trials, reference, close).result()
    line = (f"{subject or key}: " + ", ".join(
        f"{name} {figures[name] * 1e6:.1f} us" if isinstance(figures[name], float) else f"{name} out ({figures[name]})"
        for name in names) + f" -> {chosen}")
    if jax.process_index() == 0:
        (log or _stderr)(line)
    logger.info(line)
    _choices[key] = chosen
    return chosen


def _decide(trials, reference: str, close) -> tuple[list[str], dict[str, float | str], str]:
    names, figures = _measure(trials, reference, close)
    chosen = min((name for name in names if isinstance(figures[name], float)), key=lambda n: figures[n])
    return names, figures, _agreed(names, chosen)


def _measure(trials: Callable[[], Trials], reference: str, close) -> tuple[list[str], dict[str, float | str]]:
    runs = dict(trials())
    if reference not in runs:
        raise ValueError(f"trials must include the reference {reference!r}, got {sorted(runs)}")
    names = [reference] + sorted(n for n in runs if n != reference)
    want = jax.block_until_ready(runs[reference]())
    figures: dict[str, float | str] = {}
    for name in names:
        try:
            got = want if name == reference else jax.block_until_ready(runs[name]())
            if name != reference and not close(got, want):
                figures[name] = "differs from the reference"
                continue
            figures[name] = median_time(runs[name])
        except Exception as error:  # noqa: BLE001 - a candidate that fails to compile or run is out
            if name == reference:
                raise
            figures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    return names, figures


def median_time(run: Callable[[], object], repeats: int | None = None) -> float:
    """Median seconds of ``repeats`` (default ``TIMED_RUNS``) runs of ``run`` (compiled already), each waited for."""
    times = []
    for _ in range(repeats or TIMED_RUNS):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _agreed(names: list[str], chosen: str) -> str:
    """Process 0's choice on every process (one program for all of them)."""
    if jax.process_count() == 1:
        return chosen
    from jax.experimental import multihost_utils

    index = int(multihost_utils.broadcast_one_to_all(np.int32(names.index(chosen))))
    return names[index]


def relative_close(tolerance: float) -> Callable[[object, object], bool]:
    """``close`` for float outputs: every leaf's largest error <= ``tolerance`` x its reference's largest magnitude."""
    def close(got, want) -> bool:
        return all(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
                   <= tolerance * max(float(np.max(np.abs(np.asarray(b, np.float64)), initial=0.0)), 1e-30)
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    return close


def _equal(got, want) -> bool:
    return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(got),
                                                                            jax.tree.leaves(want)))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def triton_compiler_params(num_warps: int, num_stages: int):
    """Explicit compiler params for the Triton lowering (deprecated default from JAX 0.11)."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
