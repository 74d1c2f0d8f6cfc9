"""Model configs shipped with jax_eplb, installed as ``jax_eplb_configs``.

``tiny`` is the embedded default (CPU-sized; the whole EPLB workflow in well under a minute);
``deepseek_v3_slice`` has DeepSeek-V3's MoE-layer shapes for GPU benchmarks. ``hf/`` holds the
public ``config.json`` of DeepSeek-V3, Kimi-K2, GLM-4.5, gpt-oss-120b, Qwen3-30B-A3B and Mixtral-8x7B, for random checkpoints of
real shapes (``create-checkpoint --hf_config deepseek_v3``).
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


def hf_config_path(spec: str) -> Path:
    """A Hugging Face ``config.json`` path as given, or a shipped one by name (``deepseek_v3``,
    ``qwen3_30b_a3b``, ``mixtral_8x7b``)."""
    path = Path(spec)
    if path.exists():
        return path
    shipped = resources.files(__name__) / "hf" / f"{spec}.json"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name[:-5] for p in (resources.files(__name__) / "hf").iterdir() if p.name.endswith(".json"))
    raise FileNotFoundError(f"no config {spec!r}; shipped Hugging Face configs: {names}")
