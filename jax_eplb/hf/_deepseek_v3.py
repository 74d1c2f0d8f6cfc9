"""DeepSeek-V3 / R1 (``model_type`` ``deepseek_v3``): MLA attention, sigmoid group-limited routing
with a selection bias, shared experts, the first ``first_k_dense_replace`` layers dense.

MTP layers (index >= ``num_hidden_layers``, ``num_nextn_predict_layers``) are not part of
generation and are skipped.
"""

from __future__ import annotations

from jax_eplb._errors import EplbInputError
from jax_eplb.hf._config import ConfigReader, common_fields, read_rope
from jax_eplb.hf._layout import MoELayout

MODEL_TYPE = "deepseek_v3"
LAYOUT = MoELayout("mlp", ("gate_proj", "up_proj", "down_proj"), router_bias="gate.e_score_correction_bias",
                   shared_experts="shared_experts")


def model_fields(reader: ConfigReader) -> tuple[dict, list[str]]:
    fields = common_fields(reader)
    reader.require("topk_method", ("noaux_tc",), "noaux_tc", "DeepSeek-V3's bias-steered group routing")
    reader.require("scoring_func", ("sigmoid",), "sigmoid")
    reader.require("moe_layer_freq", (1,), 1, "every layer after the dense ones is MoE")
    reader.ignore("aux_loss_alpha", "seq_aux", "ep_size")  # training / their launcher
    heads = fields["num_heads"]
    if reader.int("num_key_value_heads", heads) != heads:
        raise EplbInputError(f"{reader.source}: MLA needs num_key_value_heads == num_attention_heads")
    rope = read_rope(reader, allow_yarn=True)
    ffn = reader.int("moe_intermediate_size")
    fields.update(
        num_kv_heads=heads, head_dim=reader.int("qk_rope_head_dim"), dense_ffn_size=reader.int("intermediate_size"),
        num_experts=reader.int("n_routed_experts"), expert_ffn_size=ffn, router="deepseek",
        n_group=reader.int("n_group", 1), topk_group=reader.int("topk_group", 1),
        routed_scaling_factor=reader.float("routed_scaling_factor", 1.0),
        renormalize=reader.bool("norm_topk_prob", True), num_shared_experts=reader.int("n_shared_experts", 0, 0),
        shared_ffn_size=ffn, first_k_dense=reader.int("first_k_dense_replace", 0, 0), attention="mla",
        q_lora_rank=reader.optional_int("q_lora_rank"), kv_lora_rank=reader.int("kv_lora_rank"),
        qk_nope_head_dim=reader.int("qk_nope_head_dim"), qk_rope_head_dim=reader.int("qk_rope_head_dim"),
        v_head_dim=reader.int("v_head_dim"), rope_theta=rope.theta,
        rope_interleave=reader.bool("rope_interleave", True))
    if rope.yarn is not None:
        if not rope.yarn["truncate"]:
            raise EplbInputError(f"{reader.source}: YaRN with truncate false is not DeepSeek-V3's (refused)")
        fields.update(yarn_factor=rope.yarn["factor"], yarn_original_max_position=rope.yarn[
            "original_max_position_embeddings"], yarn_beta_fast=rope.yarn["beta_fast"],
            yarn_beta_slow=rope.yarn["beta_slow"], yarn_mscale_all_dim=rope.yarn["mscale_all_dim"])
    notes = []
    if reader.raw.get("num_nextn_predict_layers"):
        notes.append(f"{reader.raw['num_nextn_predict_layers']} MTP layer(s) (index >= "
                     f"{fields['num_layers']}) skipped: not used for generation")
    return fields, notes

