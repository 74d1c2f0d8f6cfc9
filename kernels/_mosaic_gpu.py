"""What this JAX offers of Pallas' Mosaic GPU backend: the kernel API and its CPU interpreter."""

from __future__ import annotations

import jax


def mosaic_gpu_available() -> bool:
    """Whether this JAX has Pallas' Mosaic GPU kernel API (``plgpu.kernel``)."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:
        return False
    return hasattr(plgpu, "kernel") and hasattr(plgpu, "copy_gmem_to_smem")


def interpret_available() -> bool:
    """Whether this JAX has Mosaic GPU's interpreter (JAX >= 0.11), which runs its kernels on any backend."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:
        return False
    return hasattr(plgpu, "InterpretGPUParams")


def interpret_params():
    """``interpret=`` for ``plgpu.kernel``: the interpreter's parameters."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not interpret_available():
        raise NotImplementedError(f"Mosaic GPU's interpreter needs JAX >= 0.11 (this is {jax.__version__})")
    return plgpu.InterpretGPUParams()
