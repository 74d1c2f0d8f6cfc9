"""Where each parameter of the model lives in a Hugging Face checkpoint.

A layout walks the model's parameters layer by layer and asks ``tensor(name, shape)`` for each
checkpoint tensor it needs (HF shapes: a linear layer's weight is ``[out, in]``, ours is
``[in, out]``). The same walk reads a checkpoint, checks one against config.json without
reading it, and writes a random one.

Axis legend: H hidden, N heads, Q kv heads, Dh head dim, F FFN width, E experts, Cq / Ckv
query / kv latent, Dn / Dr / Dv MLA head dims, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jax_eplb.hf._mxfp4 import BLOCK, BLOCK_BYTES, dequantize_mxfp4
from jax_eplb.hf._safetensors import StoredTensor
from jax_eplb.model import ModelConfig

Tensor = Callable[[str, tuple], np.ndarray]  # (checkpoint name, HF shape) -> array


@dataclasses.dataclass(frozen=True)
class MoELayout:
    """An architecture's names inside ``model.layers.{l}.``: the MoE MLP and its experts."""

    moe_prefix: str  # "mlp" (DeepSeek, Qwen3) or "block_sparse_moe" (Mixtral)
    expert_names: tuple[str, str, str]  # gate, up, down: ("gate_proj", "up_proj", "down_proj") / ("w1", "w3", "w2")
    router_bias: str | None = None  # DeepSeek's selection bias, inside the MoE prefix
    shared_experts: str | None = None  # DeepSeek's shared experts, inside the MoE prefix
    router: str = "gate"  # the router's linear layer, inside the MoE prefix
    router_logit_bias: str | None = None  # gpt-oss: the router's bias (added to the logits)
    # None: one tensor per expert and projection (experts.N.gate_proj.weight); "bf16": gpt-oss' fused
    # experts.gate_up_proj [E, H, 2F] / down_proj [E, F, H] with biases; "mxfp4": the same as MXFP4 blocks.
    fused_experts: str | None = None


def linear(tensor: Tensor, name: str, fan_in: int, fan_out: int) -> np.ndarray:
    """``[in, out]`` from the checkpoint's ``[out, in]`` weight (a transposed view, or a ``StoredTensor``
    marked for transposition on the device)."""
    return tensor(name, (fan_out, fan_in)).T


def swiglu(tensor: Tensor, prefix: str, names: tuple[str, str, str], hidden: int, ffn: int) -> dict:
    gate, up, down = names
    return {"gate": linear(tensor, f"{prefix}.{gate}.weight", hidden, ffn),
            "up": linear(tensor, f"{prefix}.{up}.weight", hidden, ffn),
            "down": linear(tensor, f"{prefix}.{down}.weight", ffn, hidden)}


def gqa_attention(tensor: Tensor, prefix: str, c: ModelConfig) -> dict:
    d, g = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = {"wq": linear(tensor, f"{prefix}.q_proj.weight", c.hidden_size, d),
           "wk": linear(tensor, f"{prefix}.k_proj.weight", c.hidden_size, g),
           "wv": linear(tensor, f"{prefix}.v_proj.weight", c.hidden_size, g),
           "wo": linear(tensor, f"{prefix}.o_proj.weight", d, c.hidden_size)}
    if c.attention_bias:
        out.update(bq=tensor(f"{prefix}.q_proj.bias", (d,)), bk=tensor(f"{prefix}.k_proj.bias", (g,)),
                   bv=tensor(f"{prefix}.v_proj.bias", (g,)))
    if c.attention_out_bias:
        out["bo"] = tensor(f"{prefix}.o_proj.bias", (c.hidden_size,))
    if c.attention_sinks:
        out["sinks"] = tensor(f"{prefix}.sinks", (c.num_heads,))
    if c.qk_norm:
        out["q_norm"] = {"weight": tensor(f"{prefix}.q_norm.weight", (c.head_dim,))}
        out["k_norm"] = {"weight": tensor(f"{prefix}.k_norm.weight", (c.head_dim,))}
    return out


def mla_attention(tensor: Tensor, prefix: str, c: ModelConfig) -> dict:
    n, qk = c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    out = {}
    if c.q_lora_rank is None:
        out["wq"] = linear(tensor, f"{prefix}.q_proj.weight", c.hidden_size, n * qk)
    else:
        out["wq_a"] = linear(tensor, f"{prefix}.q_a_proj.weight", c.hidden_size, c.q_lora_rank)
        out["q_a_norm"] = {"weight": tensor(f"{prefix}.q_a_layernorm.weight", (c.q_lora_rank,))}
        out["wq_b"] = linear(tensor, f"{prefix}.q_b_proj.weight", c.q_lora_rank, n * qk)
    out["wkv_a"] = linear(tensor, f"{prefix}.kv_a_proj_with_mqa.weight", c.hidden_size,
                          c.kv_lora_rank + c.qk_rope_head_dim)
    out["kv_a_norm"] = {"weight": tensor(f"{prefix}.kv_a_layernorm.weight", (c.kv_lora_rank,))}
    out["wkv_b"] = linear(tensor, f"{prefix}.kv_b_proj.weight", c.kv_lora_rank,
                          n * (c.qk_nope_head_dim + c.v_head_dim))
    out["wo"] = linear(tensor, f"{prefix}.o_proj.weight", n * c.v_head_dim, c.hidden_size)
    return out


def moe_router(tensor: Tensor, prefix: str, c: ModelConfig, layout: MoELayout) -> dict:
    """Router, selection bias (zeros where the architecture has none) and shared experts."""
    out = {"router_kernel": linear(tensor, f"{prefix}.{layout.router}.weight", c.hidden_size, c.num_experts)}
    out["correction_bias"] = (tensor(f"{prefix}.{layout.router_bias}", (c.num_experts,)) if layout.router_bias
                              else StoredTensor(np.zeros((c.num_experts,), np.float32), None))
    if layout.router_logit_bias:
        out["router_bias"] = tensor(f"{prefix}.{layout.router_logit_bias}", (c.num_experts,))
    if layout.shared_experts and c.num_shared_experts:
        out["shared"] = swiglu(tensor, f"{prefix}.{layout.shared_experts}", ("gate_proj", "up_proj", "down_proj"),
                               c.hidden_size, c.moe.shared_width)
    return out


def fused_experts(tensor: Tensor, layer: int, c: ModelConfig, layout: MoELayout) -> dict:
    """gpt-oss' fused expert tensors of decoder layer ``layer``, whole, by role (HF shapes)."""
    prefix, e, h, f = f"model.layers.{layer}.{layout.moe_prefix}.experts", c.num_experts, c.hidden_size, \
        c.expert_ffn_size
    out = {"gate_up_bias": tensor(f"{prefix}.gate_up_proj_bias", (e, 2 * f)),
           "down_bias": tensor(f"{prefix}.down_proj_bias", (e, h))}
    if layout.fused_experts == "mxfp4":  # [out, in] as blocks of 32 values in 16 bytes
        out.update(gate_up_blocks=tensor(f"{prefix}.gate_up_proj_blocks", (e, 2 * f, h // BLOCK, BLOCK_BYTES)),
                   gate_up_scales=tensor(f"{prefix}.gate_up_proj_scales", (e, 2 * f, h // BLOCK)),
                   down_blocks=tensor(f"{prefix}.down_proj_blocks", (e, h, f // BLOCK, BLOCK_BYTES)),
                   down_scales=tensor(f"{prefix}.down_proj_scales", (e, h, f // BLOCK)))
    else:
        out.update(gate_up=tensor(f"{prefix}.gate_up_proj", (e, h, 2 * f)),
                   down=tensor(f"{prefix}.down_proj", (e, f, h)))
    return out


def _fused_expert(tensor: Tensor, layer: int, index: int, c: ModelConfig, layout: MoELayout) -> tuple:
    """One expert out of gpt-oss' fused tensors: gate, up ``[H + 1, F]`` (de-interleaved, bias as the
    last row), down ``[F + 1, H]``, float32 on the host (MXFP4 dequantized). Only that expert's rows
    are read from a checkpoint (``ExpertRows``)."""
    parts = fused_experts(tensor, layer, c, layout)
    kind = type(parts["down_bias"])
    one = {k: (v.value if isinstance(v, StoredTensor) else np.asarray(v))[index] for k, v in parts.items()}
    if layout.fused_experts == "mxfp4":
        name = f"model.layers.{layer} expert {index}"
        gate_up = dequantize_mxfp4(one["gate_up_blocks"], one["gate_up_scales"], name).T  # [H, 2F]
        down = dequantize_mxfp4(one["down_blocks"], one["down_scales"], name).T  # [F, H]
    else:
        gate_up, down = one["gate_up"], one["down"]
    gate_up = np.concatenate([np.asarray(gate_up, np.float32), np.asarray(one["gate_up_bias"], np.float32)[None]])
    down = np.concatenate([np.asarray(down, np.float32), np.asarray(one["down_bias"], np.float32)[None]])
    weights = (gate_up[:, 0::2], gate_up[:, 1::2], down)
    return tuple(StoredTensor(np.ascontiguousarray(w), None) if kind is StoredTensor else w for w in weights)


def expert(tensor: Tensor, layer: int, index: int, c: ModelConfig, layout: MoELayout) -> tuple:
    """One routed expert's (gate ``[H, F]``, up ``[H, F]``, down ``[F, H]``; with their bias rows under
    ``expert_bias``) of decoder layer ``layer``."""
    if layout.fused_experts:
        return _fused_expert(tensor, layer, index, c, layout)
    prefix = f"model.layers.{layer}.{layout.moe_prefix}.experts.{index}"
    weights = swiglu(tensor, prefix, layout.expert_names, c.hidden_size, c.expert_ffn_size)
    return weights["gate"], weights["up"], weights["down"]


def layer_params(tensor: Tensor, layer: int, c: ModelConfig, layout: MoELayout) -> dict:
    """Every parameter of decoder layer ``layer`` but its routed experts, nested like the model's state."""
    prefix = f"model.layers.{layer}"
    attention = gqa_attention if c.attention == "gqa" else mla_attention
    params = {"attention_norm": {"weight": tensor(f"{prefix}.input_layernorm.weight", (c.hidden_size,))},
              "mlp_norm": {"weight": tensor(f"{prefix}.post_attention_layernorm.weight", (c.hidden_size,))},
              "attention": attention(tensor, f"{prefix}.self_attn", c)}
    if layer in c.moe_layer_ids:
        params["mlp"] = moe_router(tensor, f"{prefix}.{layout.moe_prefix}", c, layout)
    else:
        params["mlp"] = swiglu(tensor, f"{prefix}.mlp", ("gate_proj", "up_proj", "down_proj"), c.hidden_size,
                               c.dense_ffn_size)
    return params


def top_params(tensor: Tensor, c: ModelConfig) -> dict:
    """Embedding, final norm and LM head (the embedding's transpose when tied)."""
    embed = tensor("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
    head = embed.T if c.tie_word_embeddings else linear(tensor, "lm_head.weight", c.hidden_size, c.vocab_size)
    return {"embed": embed, "final_norm": {"weight": tensor("model.norm.weight", (c.hidden_size,))}, "lm_head": head}


def visit_all(tensor: Tensor, c: ModelConfig, layout: MoELayout) -> None:
    """Asks ``tensor`` for every checkpoint tensor of the model, routed experts included, without
    keeping or stacking anything (checking a checkpoint, writing one)."""
    top_params(tensor, c)
    for layer in range(c.num_layers):
        layer_params(tensor, layer, c, layout)
    for layer in c.moe_layer_ids:
        if layout.fused_experts:
            fused_experts(tensor, layer, c, layout)
            continue
        for index in range(c.num_experts):
            expert(tensor, layer, index, c, layout)


def model_params(tensor: Tensor, c: ModelConfig, layout: MoELayout) -> dict:
    """Every parameter but the routed experts, layers stacked per kind (``[L, ...]``)."""
    params = top_params(tensor, c)
    for key, layers in (("dense_layers", c.dense_layer_ids), ("moe_layers", c.moe_layer_ids)):
        if layers:
            per_layer = [layer_params(tensor, layer, c, layout) for layer in layers]
            params[key] = {"layers": _stack(per_layer)}
    return params


def _stack(trees: list):
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    if isinstance(trees[0], StoredTensor):
        return StoredTensor.stack(trees)
    return np.stack(trees)
