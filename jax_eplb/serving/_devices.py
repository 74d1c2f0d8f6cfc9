"""Processes and hosts: ``jax.distributed`` start-up for one-process-per-host launches, and
fetching (possibly multi-host sharded) results to every process. The mesh itself: ``jax_eplb.sharding``."""

from __future__ import annotations

import os

import jax
import numpy as np


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


def process_index_early() -> int:
    """This process's index in ``jax.distributed`` (0 when it is not running), read without starting JAX's
    backends (``jax.process_index()`` would, fixing the CPU device count before ``--emulate_devices``)."""
    from jax._src import distributed

    return int(distributed.global_state.process_id or 0)


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as one NumPy array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
