"""Choosing an implementation: explicit requests fail fast, automatic choice falls back with a log."""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger("jax_eplb_kernels")

IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret")
AUTO_OVERRIDE = "JAX_EPLB_KERNELS"  # e.g. JAX_EPLB_KERNELS=xla: what 'auto' resolves to, everywhere


def resolve_implementation(implementation: str) -> str:
    """'auto' -> 'pallas' on GPU, else 'xla' (or ``$JAX_EPLB_KERNELS``). Unknown names raise ValueError."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    override = os.environ.get(AUTO_OVERRIDE)
    if override:
        if override not in IMPLEMENTATIONS[1:]:
            raise ValueError(f"${AUTO_OVERRIDE} must be one of {IMPLEMENTATIONS[1:]}, got {override!r}")
        return override
    if jax.default_backend() == "gpu":
        return "pallas"
    logger.debug("routing kernels: backend %s has no Pallas GPU path; using the XLA reference",
                 jax.default_backend())
    return "xla"


def triton_compiler_params(num_warps: int, num_stages: int):
    """Explicit compiler params for the Triton lowering (deprecated default from JAX 0.11)."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
