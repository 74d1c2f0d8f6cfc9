"""Model configs shipped with jax_eplb, installed as ``jax_eplb_configs``.

``tiny`` is the embedded default (CPU-sized; the whole EPLB workflow in well under a minute);
``deepseek_v3_slice`` has DeepSeek-V3's MoE-layer shapes for GPU benchmarks.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def available() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def config_path(name: str) -> Path:
    """Path of a shipped config by name (``tiny``) ."""
    path = resources.files(__name__) / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped model config {name!r}; available: {available()}")
    return Path(str(path))
