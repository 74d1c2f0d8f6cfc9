"""Qwen3-MoE (``model_type`` ``qwen3_moe``): GQA with per-head q/k RMSNorm, softmax top-k routing
(renormalised with ``norm_topk_prob``), no shared experts, dense layers where ``mlp_only_layers`` /
``decoder_sparse_step`` say so."""

from __future__ import annotations

from jax_eplb._errors import EplbInputError
from jax_eplb.hf._config import ConfigReader, common_fields, read_rope
from jax_eplb.hf._layout import MoELayout

MODEL_TYPE = "qwen3_moe"
LAYOUT = MoELayout("mlp", ("gate_proj", "up_proj", "down_proj"))


def model_fields(reader: ConfigReader) -> tuple[dict, list[str]]:
    fields = common_fields(reader)
    reader.require("use_sliding_window", (False,), False, "sliding-window attention")
    reader.ignore("sliding_window", "max_window_layers")  # only read with use_sliding_window
    experts_key = "num_experts" if "num_experts" in reader.raw else "num_local_experts"
    heads = fields["num_heads"]
    fields.update(
        num_kv_heads=reader.int("num_key_value_heads", heads),
        head_dim=reader.int("head_dim", fields["hidden_size"] // heads),
        dense_ffn_size=reader.int("intermediate_size"), num_experts=reader.int(experts_key),
        expert_ffn_size=reader.int("moe_intermediate_size"), router="softmax",
        renormalize=reader.bool("norm_topk_prob", False), first_k_dense=0,
        mlp_only_layers=tuple(_int_list(reader, "mlp_only_layers")),
        decoder_sparse_step=reader.int("decoder_sparse_step", 1), qk_norm=True,
        rope_theta=read_rope(reader, allow_yarn=False).theta)
    return fields, []


def _int_list(reader: ConfigReader, key: str) -> list[int]:
    reader.ignore(key)
    value = reader.raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise EplbInputError(f"{reader.source}: {key} must be a list of layer indices, got {value!r}")
    return value
