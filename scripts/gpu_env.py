#!/usr/bin/env python
"""What the GPU check runs on: exits 2 with one line unless JAX's backend is a GPU; else prints the
environment (jax.print_environment_info), the devices, Mosaic GPU's default lowering semantics, whether
tokamax can run, and the memory settings. Only the backend check can fail; the rest is information."""

import os
import sys


def main() -> int:
    import jax

    backend = jax.default_backend()
    if backend != "gpu":
        print(f"JAX's backend is {backend!r}, not 'gpu'", file=sys.stderr)
        return 2
    for what, show in (("environment", jax.print_environment_info),
                       ("devices", lambda: print("devices:", jax.devices()))):
        _information(what, show)
    _information("Mosaic GPU", _mosaic_semantics)
    _information("tokamax", _tokamax)
    stats = jax.devices()[0].memory_stats() or {}
    print("memory: XLA_PYTHON_CLIENT_PREALLOCATE =", os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "(default: true)"),
          "XLA_PYTHON_CLIENT_MEM_FRACTION =", os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "(default: 0.75)"),
          "| device:", stats.get("bytes_limit", "?"), "bytes usable", flush=True)
    return 0


def _information(what, show) -> None:
    try:
        show()
    except Exception as error:  # noqa: BLE001 - information only
        print(f"{what}: {type(error).__name__}: {error}", flush=True)


def _mosaic_semantics() -> None:
    from jax.experimental.pallas import mosaic_gpu as plgpu

    print("Mosaic GPU default lowering semantics:", plgpu.CompilerParams().lowering_semantics, flush=True)


def _tokamax() -> None:
    from jax_eplb.moe import tokamax_unavailable

    print("tokamax:", tokamax_unavailable() or "available", flush=True)


if __name__ == "__main__":
    sys.exit(main())
