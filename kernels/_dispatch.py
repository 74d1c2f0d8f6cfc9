"""Choosing an implementation: explicit requests are taken as they are; ``auto`` measures on a GPU.

``auto`` is decided by the platform the kernel will run on - the mesh's, which the EP block states
with :func:`on_platform` around its trace - not by ``jax.default_backend()`` (a CPU mesh on a GPU
host runs XLA). On a GPU every candidate runs once at the call's shapes and the fastest correct
one wins (``_probe``: own threads, a time limit per candidate, one line on stderr, cached per
kernel configuration, shape and platform; several processes settle their choices outside tracing).
Elsewhere ``auto`` is the XLA reference (``$JAX_EPLB_KERNELS`` overrides what ``auto`` means
everywhere).

Candidates: the XLA reference; Pallas on Mosaic GPU (``mosaic_gpu``) where a kernel has one;
Pallas on Triton (``pallas``) only on JAX < 0.11 - JAX deprecates that backend from 0.11 on, so
there it runs only when asked for by name.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Hashable

import jax
import numpy as np

from jax_eplb_kernels._probe import Trials, fastest_correct

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret", "mosaic_gpu", "mosaic_gpu_interpret")
AUTO_OVERRIDE = "JAX_EPLB_KERNELS"  # e.g. JAX_EPLB_KERNELS=xla: what 'auto' resolves to, everywhere

_platform = threading.local()  # .name: the platform the kernels traced on this thread will run on


def jax_version() -> tuple[int, int]:
    return tuple(int(part) for part in jax.__version__.split(".")[:2])


def triton_in_auto() -> bool:
    """Pallas Triton is one of ``auto``'s candidates only on JAX < 0.11 (deprecated from 0.11 on)."""
    return jax_version() < (0, 11)


@contextlib.contextmanager
def on_platform(platform: str):
    """Kernels called (traced) inside run on ``platform`` ('gpu', 'cpu', ...): what ``auto`` decides by."""
    previous = getattr(_platform, "name", None)
    _platform.name = platform
    try:
        yield
    finally:
        _platform.name = previous


def kernel_platform() -> str:
    """The platform set by :func:`on_platform` on this thread, else JAX's default backend."""
    return getattr(_platform, "name", None) or jax.default_backend()


def platform_device(platform: str):
    """The first local device of ``platform`` (where ``auto``'s candidates run), or None if there is none."""
    try:
        return jax.local_devices(backend=platform)[0]
    except (RuntimeError, IndexError):
        return None


def resolve_implementation(implementation: str, trials: Callable[[], Trials] | None = None, key: Hashable = None,
                           close: Callable[[object, object], bool] | None = None, subject: str = "",
                           platform: str | None = None) -> str:
    """``auto`` -> on a GPU (``platform``, default :func:`kernel_platform`) the fastest correct of
    ``trials()``, measured once per ``key`` and platform; elsewhere ``xla``.

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
    on = platform or kernel_platform()
    if on != "gpu" or trials is None:
        return "xla"
    return fastest_correct(trials, (on, key), reference="xla", close=close, subject=subject or str(key),
                           device=platform_device(on))


def relative_close(tolerance: float) -> Callable[[object, object], bool]:
    """``close`` for float outputs: every leaf's largest error <= ``tolerance`` x its reference's largest magnitude."""
    def close(got, want) -> bool:
        return all(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
                   <= tolerance * max(float(np.max(np.abs(np.asarray(b, np.float64)), initial=0.0)), 1e-30)
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    return close


def dtype_tolerance(dtype) -> float:
    """How far a float result computed in ``dtype`` may stray from the reference, relative to the reference's
    largest magnitude: 16-bit 2e-2; float32 2e-3 (GPUs multiply float32 in TF32 by default, 10-bit mantissas);
    float64 1e-9."""
    return {2: 2e-2, 4: 2e-3}.get(np.dtype(dtype).itemsize, 1e-9)


def triton_compiler_params(num_warps: int, num_stages: int):
    """Explicit compiler params for the Triton lowering (deprecated default from JAX 0.11)."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
