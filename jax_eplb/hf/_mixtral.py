"""Mixtral (``model_type`` ``mixtral``): GQA, softmax top-k routing renormalised over the chosen
experts, every layer MoE, experts named ``block_sparse_moe.experts.N.w1`` (gate), ``w3`` (up),
``w2`` (down)."""

from __future__ import annotations

from jax_eplb.hf._config import ConfigReader, common_fields, read_rope
from jax_eplb.hf._layout import MoELayout

MODEL_TYPE = "mixtral"
LAYOUT = MoELayout("block_sparse_moe", ("w1", "w3", "w2"))


def model_fields(reader: ConfigReader) -> tuple[dict, list[str]]:
    fields = common_fields(reader)
    reader.require("sliding_window", (None,), None, "sliding-window attention")
    reader.ignore("router_jitter_noise")  # training-time noise on the router logits
    heads = fields["num_heads"]
    ffn = reader.int("intermediate_size")
    fields.update(
        num_kv_heads=reader.int("num_key_value_heads", heads),
        head_dim=reader.int("head_dim", fields["hidden_size"] // heads),
        dense_ffn_size=ffn, num_experts=reader.int("num_local_experts"), expert_ffn_size=ffn, router="softmax",
        renormalize=True, first_k_dense=0, rope_theta=read_rope(reader, allow_yarn=False).theta)
    return fields, []
