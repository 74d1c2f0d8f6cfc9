"""GLM-4.5 / 4.6 (``model_type`` ``glm4_moe``): GQA with biased q/k/v projections, optional per-head
q/k RMSNorm and RoPE on the first ``partial_rotary_factor`` of each head; DeepSeek-V3's sigmoid
routing with a selection bias (``noaux_tc``, groups, ``routed_scaling_factor``), shared experts,
the first ``first_k_dense_replace`` layers dense.

The MTP layer (``num_nextn_predict_layers``, decoder index ``num_hidden_layers``) is not part of
generation: its tensors are never read.
"""

from __future__ import annotations

from jax_eplb._errors import EplbInputError
from jax_eplb.hf._config import ConfigReader, common_fields, read_rope
from jax_eplb.hf._layout import MoELayout

MODEL_TYPE = "glm4_moe"
LAYOUT = MoELayout("mlp", ("gate_proj", "up_proj", "down_proj"), router_bias="gate.e_score_correction_bias",
                   shared_experts="shared_experts")


def model_fields(reader: ConfigReader) -> tuple[dict, list[str]]:
    fields = common_fields(reader, attention_bias=True)
    reader.ignore("num_mtp_layers")  # transformers' name for num_nextn_predict_layers
    heads = fields["num_heads"]
    head_dim = reader.int("head_dim", fields["hidden_size"] // heads)
    ffn = reader.int("moe_intermediate_size")
    fields.update(
        num_kv_heads=reader.int("num_key_value_heads", heads), head_dim=head_dim,
        rotary_dim=_rotary_dim(reader, head_dim), attention_bias=reader.bool("attention_bias", False),
        qk_norm=reader.bool("use_qk_norm", False), dense_ffn_size=reader.int("intermediate_size"),
        num_experts=reader.int("n_routed_experts"), expert_ffn_size=ffn, router="deepseek",
        n_group=reader.int("n_group", 1), topk_group=reader.int("topk_group", 1),
        routed_scaling_factor=reader.float("routed_scaling_factor", 1.0),
        renormalize=reader.bool("norm_topk_prob", True), num_shared_experts=reader.int("n_shared_experts", 0, 0),
        shared_ffn_size=ffn, first_k_dense=reader.int("first_k_dense_replace", 0, 0),
        rope_theta=read_rope(reader, allow_yarn=False).theta)
    mtp = reader.raw.get("num_nextn_predict_layers", reader.raw.get("num_mtp_layers"))
    notes = [f"{mtp} MTP layer(s) (index >= {fields['num_layers']}) skipped: not used for generation"] if mtp else []
    return fields, notes


def _rotary_dim(reader: ConfigReader, head_dim: int) -> int:
    """``partial_rotary_factor`` (top level, or inside ``rope_parameters`` as transformers 5 writes it)
    of ``head_dim``: the rotated leading dims of each head."""
    reader.ignore("partial_rotary_factor")
    params = reader.raw.get("rope_parameters") or {}
    factor = params.get("partial_rotary_factor", reader.raw.get("partial_rotary_factor", 0.5))
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 1:
        raise EplbInputError(f"{reader.source}: partial_rotary_factor must be in (0, 1], got {factor!r}")
    dim = int(head_dim * factor)
    if dim < 2 or dim % 2:
        raise EplbInputError(f"{reader.source}: partial_rotary_factor {factor} of head_dim {head_dim} gives "
                             f"{dim} rotary dims (an even number >= 2 is needed)")
    return dim
