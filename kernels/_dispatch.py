"""Choosing an implementation: explicit requests fail fast; ``auto`` checks the Pallas kernel once.

On a GPU, ``auto`` means Pallas, but only after a one-time probe of that kernel configuration
(compile it, run it on a small input, compare with the XLA reference) has passed: a kernel that
does not compile or gives wrong results on this GPU/JAX falls back to XLA with a warning instead
of breaking the model. Explicit ``implementation="pallas"`` is never probed and fails loudly.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Callable, Hashable

import jax

logger = logging.getLogger("jax_eplb_kernels")

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret")
AUTO_OVERRIDE = "JAX_EPLB_KERNELS"  # e.g. JAX_EPLB_KERNELS=xla: what 'auto' resolves to, everywhere

_probe_results: dict[Hashable, bool] = {}


def resolve_implementation(implementation: str, probe: Callable[[], bool] | None = None,
                           probe_key: Hashable = None) -> str:
    """'auto' -> 'pallas' on GPU (if ``probe`` passes), else 'xla' (or ``$JAX_EPLB_KERNELS``).

    Args:
      probe: returns whether the Pallas kernel equals the reference on a small input; run once
        per ``probe_key`` (the kernel and its static configuration), on its own thread, so it runs
        eagerly even when the caller is being traced (jit, shard_map).
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
    if jax.default_backend() != "gpu":
        logger.debug("routing kernels: backend %s has no Pallas GPU path; using the XLA reference",
                     jax.default_backend())
        return "xla"
    if probe is None or probe_passes(probe, probe_key):
        return "pallas"
    return "xla"


def probe_passes(probe: Callable[[], bool], key: Hashable, subject: str = "Pallas kernel",
                 fallback: str = "XLA") -> bool:
    """Whether ``probe()`` returned True, run once per ``key`` (cached) on a fresh thread; a probe
    that raises counts as failed. A failure is logged once: '<subject> <key> ...; uses <fallback>'."""
    if key not in _probe_results:
        try:
            # On a fresh thread: no trace of the caller's (jit, shard_map, scan) is active there, so
            # the probe compiles and runs as plain top-level code.
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                ok = bool(pool.submit(probe).result())
            if not ok:
                logger.warning("%s %s gave results different from the reference on this device; 'auto' uses "
                               "%s for it", subject, key, fallback)
        except Exception as error:  # noqa: BLE001 - any compile/run failure means: use the reference
            ok = False
            logger.warning("%s %s failed on this device (%s: %s); 'auto' uses %s for it", subject, key,
                           type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "", fallback)
        _probe_results[key] = ok
    return _probe_results[key]


def triton_compiler_params(num_warps: int, num_stages: int):
    """Explicit compiler params for the Triton lowering (deprecated default from JAX 0.11)."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
