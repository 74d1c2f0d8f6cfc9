"""Devices for an ``ep`` mesh: real accelerators, CPU-emulated devices, or many hosts."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

from jax_eplb._errors import EplbInputError
from jax_eplb.moe import EP_AXIS


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, environ=os.environ) -> bool:
    """Calls ``jax.distributed.initialize`` for one-process-per-host launches.

    Explicit coordinator flags win; otherwise a multi-task Slurm or Open MPI launch is detected
    from its environment (JAX reads the rest from it). Returns whether it initialised.
    """
    launched = any(int(environ.get(var, "1") or 1) > 1 for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    if coordinator_address is None and not launched:
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


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


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as one NumPy array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
