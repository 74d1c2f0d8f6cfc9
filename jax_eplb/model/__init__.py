"""Decoder-only MoE transformer (Flax NNX) on an ``ep`` mesh, its weights and checkpoints."""

from jax_eplb.model._config import ModelConfig, load_model_config, resolve_model_config
from jax_eplb.model._forward import (KVCache, MoEOptions, StepOutput, apply_rope, attention, decoder_step,
                                     init_cache, rms_norm)
from jax_eplb.model._module import MoETransformer, PlacementTable
from jax_eplb.model._weights import (AttentionWeights, DenseLayers, MoELayers, ModelWeights, expert_weights,
                                     init_weights, placed_weights, router_bias)
from jax_eplb.model._checkpoint import (create_random_checkpoint, restore_checkpoint, restore_logical_experts,
                                        save_checkpoint)
