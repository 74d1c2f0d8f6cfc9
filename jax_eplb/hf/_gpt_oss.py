"""gpt-oss (``model_type`` ``gpt_oss``): GQA with biases on every projection, attention sinks,
sliding-window and full attention layers as ``layer_types`` says, YaRN (``truncate`` false: the
correction range not rounded), a router with a bias whose top-k logits are softmaxed, experts with
biases and the clamped SwiGLU (``swiglu_limit``, ``swiglu_alpha``), every layer MoE.

Experts are stored fused per layer: ``mlp.experts.gate_up_proj`` ``[E, H, 2F]`` (gate and up
interleaved column by column) with ``gate_up_proj_bias`` ``[E, 2F]``, ``down_proj`` ``[E, F, H]``
with ``down_proj_bias`` ``[E, H]``; OpenAI's checkpoints store the two weights as MXFP4
(``quantization_config.quant_method`` ``mxfp4``: ``*_blocks`` / ``*_scales`` in ``[out, in]``
order), which is dequantized to the compute dtype while loading (the experts are not kept in 4
bits on the devices: ``BlockFp8`` is block-scaled FP8, and an MXFP4 tile format with its matmul is
not built).
"""

from __future__ import annotations

import dataclasses

from jax_eplb._errors import EplbInputError
from jax_eplb.hf._config import ConfigReader, common_fields, read_rope
from jax_eplb.hf._layout import MoELayout

MODEL_TYPE = "gpt_oss"
LAYOUT = MoELayout("mlp", ("gate_up_proj", "gate_up_proj", "down_proj"), router="router",
                   router_logit_bias="router.bias", fused_experts="bf16")
LAYER_TYPES = ("sliding_attention", "full_attention")
OWN_QUANTIZATIONS = ("mxfp4",)  # read by this layout (not the FP8 path)


def layout(raw: dict) -> MoELayout:
    """MXFP4 experts (OpenAI's checkpoints) or plain ones (transformers' ``save_pretrained``, BF16 exports)."""
    quantization = raw.get("quantization_config")
    mxfp4 = isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4"
    return dataclasses.replace(LAYOUT, fused_experts="mxfp4") if mxfp4 else LAYOUT


def model_fields(reader: ConfigReader) -> tuple[dict, list[str]]:
    fields = common_fields(reader, attention_bias=True)
    reader.ignore("experts_per_token", "initial_context_length")  # the original release's duplicates
    if reader.raw.get("experts_per_token", fields["top_k"]) != fields["top_k"]:
        raise EplbInputError(f"{reader.source}: experts_per_token and num_experts_per_tok differ")
    heads, layers = fields["num_heads"], fields["num_layers"]
    layer_types = reader.raw.get("layer_types") or [LAYER_TYPES[(i + 1) % 2] for i in range(layers)]
    reader.ignore("layer_types")
    if not isinstance(layer_types, list) or len(layer_types) != layers or not set(layer_types) <= set(LAYER_TYPES):
        raise EplbInputError(f"{reader.source}: layer_types must list {layers} of {list(LAYER_TYPES)}, "
                             f"got {layer_types!r}")
    sliding = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    window = reader.int("sliding_window", 128) if sliding else reader.optional_int("sliding_window")
    bias = reader.bool("attention_bias", True)
    rope = read_rope(reader, allow_yarn=True)
    ffn = reader.int("intermediate_size")
    fields.update(
        num_kv_heads=reader.int("num_key_value_heads", heads),
        head_dim=reader.int("head_dim", fields["hidden_size"] // heads),
        attention_bias=bias, attention_out_bias=bias, attention_sinks=True, sliding_window=window,
        sliding_window_layers=sliding, dense_ffn_size=ffn, num_experts=reader.int("num_local_experts"),
        expert_ffn_size=ffn, router="topk_softmax", router_logit_bias=True, renormalize=False, first_k_dense=0,
        activation="clamped_swiglu", swiglu_alpha=reader.float("swiglu_alpha", 1.702),
        swiglu_limit=reader.float("swiglu_limit", 7.0), expert_bias=True, rope_theta=rope.theta)
    if rope.yarn is not None:
        fields.update(yarn_factor=rope.yarn["factor"], yarn_original_max_position=rope.yarn[
            "original_max_position_embeddings"], yarn_beta_fast=rope.yarn["beta_fast"],
            yarn_beta_slow=rope.yarn["beta_slow"], yarn_mscale_all_dim=rope.yarn["mscale_all_dim"],
            yarn_truncate=rope.yarn["truncate"])
    notes = []
    if layout(reader.raw).fused_experts == "mxfp4":
        notes.append("MXFP4 experts dequantized to the compute dtype while loading (not kept in 4 bits)")
    return fields, notes
