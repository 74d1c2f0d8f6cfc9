"""``--extra_llm_api_options`` YAML, as trtllm-bench users write it.

Read keys: ``moe_max_num_tokens`` and ``moe_load_balancer`` (a YAML path or an inline
``MoeLoadBalancerConfig`` mapping), also in the newer nesting ``moe_config: {max_num_tokens,
load_balancer}``. Other TensorRT-LLM keys (CUDA graphs, KV-cache settings, ...) have no meaning
here: they are reported as ignored, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import yaml

from jax_eplb._errors import EplbInputError
from jax_eplb._plan_config import MoeLoadBalancerConfig


@dataclasses.dataclass(frozen=True)
class ExtraOptions:
    moe_max_num_tokens: int | None = None
    load_balancer: MoeLoadBalancerConfig | None = None
    ignored_keys: tuple[str, ...] = ()


def _balancer(value: Any, base: Path, source: str) -> MoeLoadBalancerConfig:
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute():
            path = base / path if (base / path).exists() else path
        return MoeLoadBalancerConfig.from_yaml(path)
    if isinstance(value, Mapping):
        return MoeLoadBalancerConfig.from_dict(value, f"{source}: moe_load_balancer")
    raise EplbInputError(f"{source}: moe_load_balancer must be a YAML path or a mapping, got {type(value).__name__}")


def load_extra_options(path) -> ExtraOptions:
    if path is None:
        return ExtraOptions()
    path = Path(path)
    if not path.is_file():
        raise EplbInputError(f"extra options file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise EplbInputError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, Mapping):
        raise EplbInputError(f"{path}: expected a mapping of options")
    raw = dict(raw)
    nested = raw.pop("moe_config", None) or {}
    if not isinstance(nested, Mapping):
        raise EplbInputError(f"{path}: moe_config must be a mapping")
    nested = dict(nested)
    max_tokens = raw.pop("moe_max_num_tokens", nested.pop("max_num_tokens", None))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise EplbInputError(f"{path}: moe_max_num_tokens must be a positive integer, got {max_tokens!r}")
    balancer = raw.pop("moe_load_balancer", nested.pop("load_balancer", None))
    ignored = tuple(sorted(list(raw) + [f"moe_config.{k}" for k in nested]))
    return ExtraOptions(max_tokens, _balancer(balancer, path.parent, str(path)) if balancer is not None else None,
                        ignored)
