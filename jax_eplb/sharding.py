"""Mesh facts in one place: the ``ep`` axis, the shardings built on it, platform checks, the mesh.

Axis legend: R ranks (the ``ep`` mesh axis), S slots, L layers, B batch rows.

* Slot-indexed expert tensors ``[S, ...]`` (stacked ``[L, S, ...]``) are sharded on the slot axis:
  rank r holds slots ``[r*S/R, (r+1)*S/R)``.
* The batch ``[B, ...]`` (and the KV cache ``[L, B, ...]``) is sharded on the row axis: attention is
  data-parallel, so a rank's requests are its local tokens.
* Everything else (attention and dense weights, routers, assignment tables) is replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_eplb._errors import EplbInputError

EP_AXIS = "ep"


def num_ranks(mesh: Mesh) -> int:
    return int(mesh.shape[EP_AXIS])


def platform(mesh: Mesh) -> str:
    """``cpu``, ``gpu`` or ``tpu``: the platform of the mesh's devices."""
    return mesh.devices.flat[0].platform


def require_gpu(mesh: Mesh, what: str, detail: str = "") -> None:
    """Input error (before any work) when ``what`` needs GPUs and ``mesh`` has none."""
    if platform(mesh) != "gpu":
        raise EplbInputError(f"{what} needs GPUs{detail} (this mesh runs on {platform(mesh)})")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def over_ranks(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``ep``: slots ``[S, ...]``, batch rows ``[B, ...]``, per-rank rows ``[R, ...]``."""
    return NamedSharding(mesh, P(EP_AXIS))


def stacked_over_ranks(mesh: Mesh) -> NamedSharding:
    """Second axis split over ``ep``: stacked slots ``[L, S, ...]``, stacked caches ``[L, B, ...]``."""
    return NamedSharding(mesh, P(None, EP_AXIS))


def emulate_cpu_devices(count: int) -> None:
    """Asks for ``count`` CPU devices; must run before JAX starts its backends (else a no-op)."""
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except Exception:  # backends already initialised (e.g. under pytest's XLA_FLAGS): keep what exists
        pass


def ep_mesh(ep: int, emulate_devices: int | None = None) -> Mesh:
    """A 1-D ``ep`` mesh over the first ``ep`` devices (CPU-emulated ones with ``emulate_devices``)."""
    if ep < 1:
        raise EplbInputError(f"--ep must be >= 1, got {ep}")
    if emulate_devices is not None and emulate_devices < 1:
        raise EplbInputError(f"--emulate_devices must be >= 1, got {emulate_devices}")
    if emulate_devices:
        emulate_cpu_devices(emulate_devices)
        devices = jax.devices("cpu")
    else:
        devices = jax.devices()
    kind = devices[0].platform
    if len(devices) < ep:
        raise EplbInputError(f"--ep {ep} needs {ep} devices but {len(devices)} {kind} device(s) are available; "
                             f"add --emulate_devices {ep} to run on CPU-emulated devices")
    if len(devices) % ep:
        raise EplbInputError(f"--ep {ep} does not divide the {len(devices)} available {kind} devices")
    return Mesh(np.array(devices[:ep]), (EP_AXIS,))

