"""Decoder-only MoE transformer (Flax NNX) on an ``ep`` mesh: config, modules, weights, running.

config (``_config``) -> modules (``_layers``: norm, RoPE, attention; ``_decoder``: decoder layer
and scanned layer stacks; ``_transformer``: the model) -> weights into the modules
(``_weights``: seeded; ``_checkpoint``: orbax) -> running steps (``_runner``; the next token,
greedy or sampled: ``_sampling``); device memory per device of a built layout (``_memory``).
"""

from jax_eplb.model._checkpoint import OrbaxCheckpoint, create_random_checkpoint, save_checkpoint
from jax_eplb.model._config import ModelConfig, load_model_config, resolve_model_config
from jax_eplb.model._decoder import DecoderLayer, LayerStack
from jax_eplb.model._memory import DeviceMemory, check_fits, device_limit, device_memory, format_memory
from jax_eplb.model._layers import Attention, AttentionCache, RMSNorm, apply_rope, rms_norm
from jax_eplb.model._runner import ModelRunner
from jax_eplb.model._sampling import Sampling, next_tokens
from jax_eplb.model._transformer import KVCache, MoETransformer, StepOutput
from jax_eplb.model._weights import (SeededWeights, WeightSource, build_model, expert_weights, logical_experts,
                                     logical_weights, router_bias, seeded_params, split_logical_experts)

__all__ = [
    "ModelConfig", "load_model_config", "resolve_model_config",
    "MoETransformer", "DecoderLayer", "LayerStack", "Attention", "AttentionCache", "RMSNorm", "rms_norm",
    "apply_rope", "KVCache", "StepOutput",
    "WeightSource", "SeededWeights", "OrbaxCheckpoint", "build_model", "seeded_params", "expert_weights",
    "logical_experts", "logical_weights", "split_logical_experts", "router_bias",
    "save_checkpoint", "create_random_checkpoint",
    "ModelRunner", "Sampling", "next_tokens",
    "DeviceMemory", "device_memory", "check_fits", "device_limit", "format_memory",
]
