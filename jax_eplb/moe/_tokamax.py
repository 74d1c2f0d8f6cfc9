"""tokamax (Google's JAX kernel library; the optional ``gpu`` extra): whether it can run here, and its
``ragged_dot`` (``jax.lax.ragged_dot``'s signature; Mosaic GPU kernels on Hopper, chosen by tokamax from
the device)."""

from __future__ import annotations

import functools
import importlib.util
import sys

import jax

from jax_eplb._errors import EplbInputError
from jax_eplb_kernels._dispatch import jax_version

GPU_EXTRA = "pip install 'jax-eplb[gpu]'"


def tokamax_unavailable() -> str | None:
    """Why ``tokamax`` cannot run here, or None."""
    if sys.version_info < (3, 12):
        return f"tokamax needs Python >= 3.12 (this is {sys.version_info.major}.{sys.version_info.minor})"
    if jax_version() < (0, 11):
        return f"tokamax needs JAX >= 0.11 (this is {jax.__version__})"
    if importlib.util.find_spec("tokamax") is None:
        return "tokamax is not installed"
    return _import_error()


@functools.cache
def _import_error() -> str | None:
    """Why ``import tokamax`` fails here (a missing or mismatched dependency: qwix, typeguard, ...), or None."""
    try:
        import tokamax  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any failure means tokamax cannot run here
        first_line = str(error).splitlines()[0][:160] if str(error) else ""
        return f"tokamax does not import ({type(error).__name__}: {first_line})"
    return None


def require_tokamax(what: str = "--grouped_matmul tokamax") -> None:
    """Input error (one line naming the extra) unless tokamax can run here."""
    reason = tokamax_unavailable()
    if reason:
        raise EplbInputError(f"{what}: {reason}; install the gpu extra: {GPU_EXTRA} (Python >= 3.12, JAX >= 0.11)")


def tokamax_ragged_dot():
    """``tokamax.ragged_dot`` (input error naming the extra where tokamax cannot run)."""
    require_tokamax()
    import tokamax

    return tokamax.ragged_dot
