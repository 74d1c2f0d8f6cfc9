"""Hugging Face checkpoints: DeepSeek-V3/R1, Kimi-K2, GLM-4.5, gpt-oss, Qwen3-MoE and Mixtral served as
they are.

``config.json`` -> ``ModelConfig`` (``_config`` and one module per architecture: ``_deepseek_v3``,
``_kimi_k2``, ``_glm4_moe``, ``_gpt_oss``, ``_qwen3_moe``, ``_mixtral``), where each parameter lives in
the checkpoint (``_layout``), reading safetensors with FP8 dequantization (``_safetensors``), gpt-oss'
MXFP4 experts (``_mxfp4``), the weight source (``_checkpoint``) and random checkpoints of real shapes
(``_writer``).
"""

from jax_eplb.hf._checkpoint import ARCHITECTURES, HuggingFaceCheckpoint, hf_model_config
from jax_eplb.hf._config import read_config_json
from jax_eplb.hf._safetensors import SafetensorsCheckpoint, dequantize_blocks, quantize_blocks
from jax_eplb.hf._writer import create_hf_checkpoint

__all__ = ["HuggingFaceCheckpoint", "hf_model_config", "ARCHITECTURES", "read_config_json", "SafetensorsCheckpoint",
           "dequantize_blocks", "quantize_blocks", "create_hf_checkpoint"]
