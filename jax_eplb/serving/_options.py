"""``--extra_llm_api_options`` YAML, as trtllm-bench users write it.

Read keys: ``moe_max_num_tokens`` and ``moe_load_balancer`` (a YAML path or an inline
``MoeLoadBalancerConfig`` mapping), also in the newer nesting ``moe_config: {max_num_tokens,
load_balancer}``. A plan file given here directly (only plan keys) is taken as the load-balancer
config, with a note. Other TensorRT-LLM options (CUDA graphs, KV-cache settings, ...) have no
meaning here: they are noted as ignored; a key that is no TensorRT-LLM option is an error (a typo
must not run a benchmark without EPLB in silence).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from jax_eplb._errors import EplbInputError
from jax_eplb._plan_config import PLAN_KEYS, MoeLoadBalancerConfig
from jax_eplb._yaml import load_yaml


# TensorRT-LLM LLM API options of the EPLB workflow's configs that change nothing here.
NO_EFFECT = frozenset({
    "enable_attention_dp", "attention_dp_config", "cuda_graph_config", "use_cuda_graph", "cuda_graph_batch_sizes",
    "cuda_graph_max_batch_size", "cuda_graph_padding_enabled", "kv_cache_config", "kv_cache_dtype",
    "print_iter_log", "enable_iter_perf_stats", "enable_iter_req_stats", "disable_overlap_scheduler",
    "enable_chunked_prefill", "max_num_tokens", "max_batch_size", "max_seq_len", "max_input_len",
    "stream_interval", "moe_backend", "attn_backend", "enable_autotuner", "speculative_config",
    "scheduler_config", "batch_wait_timeout_ms", "torch_compile_config", "backend", "tensor_parallel_size",
    "pipeline_parallel_size", "moe_expert_parallel_size", "moe_tensor_parallel_size", "enable_min_latency",
    "num_postprocess_workers", "trust_remote_code", "checkpoint_format", "load_format", "allreduce_strategy",
    "garbage_collection_gen0_threshold", "enable_lm_head_tp_in_adp", "sampler_type", "enable_layerwise_nvtx_marker",
})
NO_EFFECT_MOE = frozenset({"backend", "use_low_precision_moe_combine", "disable_finalize_fusion"})


@dataclasses.dataclass(frozen=True)
class ExtraOptions:
    moe_max_num_tokens: int | None = None
    load_balancer: MoeLoadBalancerConfig | None = None
    ignored_keys: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


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
    raw = load_yaml(path, "extra options file")
    if raw is None:
        raise EplbInputError(f"{path}: empty; expected moe_load_balancer / moe_max_num_tokens options")
    if not isinstance(raw, Mapping):
        raise EplbInputError(f"{path}: expected a mapping of options")
    raw = dict(raw)
    if raw and set(raw) <= set(PLAN_KEYS):  # a plan file itself
        note = f"{path} holds a plan's keys only: taken as the moe_load_balancer config"
        return ExtraOptions(None, MoeLoadBalancerConfig.from_dict(raw, str(path)), (), (note,))
    nested = raw.pop("moe_config", None) or {}
    if not isinstance(nested, Mapping):
        raise EplbInputError(f"{path}: moe_config must be a mapping")
    nested = dict(nested)
    max_tokens = raw.pop("moe_max_num_tokens", nested.pop("max_num_tokens", None))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise EplbInputError(f"{path}: moe_max_num_tokens must be a positive integer, got {max_tokens!r}")
    balancer = raw.pop("moe_load_balancer", nested.pop("load_balancer", None))
    unknown = sorted(k for k in raw if k not in NO_EFFECT) + sorted(f"moe_config.{k}" for k in nested
                                                                  if k not in NO_EFFECT_MOE)
    if unknown:
        raise EplbInputError(f"{path}: unknown option(s) {unknown}: not TensorRT-LLM options jax_eplb knows "
                             f"(it reads moe_load_balancer and moe_max_num_tokens)")
    ignored = tuple(sorted(list(raw) + [f"moe_config.{k}" for k in nested]))
    return ExtraOptions(max_tokens, _balancer(balancer, path.parent, str(path)) if balancer is not None else None,
                        ignored)
