#!/usr/bin/env python
"""Builds the tiny Hugging Face checkpoints under tests/fixtures/hf with transformers' own classes,
and records transformers' outputs on them: the invariant the HF-model tests check.

Needs the optional ``fixtures`` extra (torch, transformers, tokenizers): never a runtime or CI
dependency; the outputs are committed.

  pip install -e ".[fixtures]" && python scripts/make_hf_fixtures.py [--output tests/fixtures/hf]

Per fixture: ``config.json`` and safetensors as ``save_pretrained`` writes them (one fixture
sharded, with an index), ``reference.npz`` (prompts, transformers' prefill logits of every
position, 16 greedy tokens per prompt), and for one fixture a tokenizer: ``tokenizer.json`` (a word
vocabulary with special tokens), ``tokenizer_config.json`` with a ChatML ``chat_template`` as
transformers' ``save_pretrained`` writes them, and ``chat_reference.json``: transformers'
``apply_chat_template`` text and ids of a few chats (and the ones it refuses). Only the tokenizer
files (transformers without torch is enough): ``--tokenizer_only``.

* ``deepseek_v3``: MLA with query compression, DeepSeek-V3's own RoPE settings (YaRN factor 40 from
  4096 positions, rotary dim 64, interleaved), sigmoid group-limited routing with a random selection
  bias, a shared expert, one dense layer first.
* ``deepseek_v3_fp8``: no query compression (``q_lora_rank`` null), hidden size 144 (FP8 edge
  blocks), linear weights block-quantized to float8_e4m3fn with 128x128 ``weight_scale_inv`` as
  DeepSeek-V3 ships; the reference is transformers' model run on those weights dequantized as
  DeepSeek's ``weight_dequant`` does (block (i, j) of 128x128, edge blocks partial). transformers'
  own FP8 loader (``dequantize=True``) derives the block size from the scale grid instead
  (``rows // scale_rows``: 80 rows per block for 160 rows), which is wrong for edge blocks (and
  refuses DeepSeek-V3's 576-row ``kv_a_proj_with_mqa``), so it is not used.
* ``qwen3_moe``: q/k norms, softmax routing with ``norm_topk_prob``, dense and MoE layers alternating
  (``decoder_sparse_step`` 2), tied embeddings, sharded, with a tokenizer and a chat template.
* ``mixtral``: ``block_sparse_moe.experts.N.w1/w2/w3``, top-2.
* ``glm4_moe``: GQA with q/k/v biases, q/k norms and RoPE on half of each head
  (``partial_rotary_factor`` 0.5), DeepSeek-style sigmoid group routing with a random selection
  bias, a shared expert, one dense layer first, one MTP layer (saved, never read).
* ``kimi_k2``: DeepSeek-V3's modules with Kimi-K2's settings (one expert group, an expert count
  that is no power of two, YaRN factor 32 from 4096 positions with ``beta_fast`` = ``beta_slow``
  = 1, RoPE base 50000), saved by ``DeepseekV3ForCausalLM`` with ``model_type`` ``kimi_k2`` as
  Kimi-K2's own config.json has it (transformers has no ``kimi_k2`` class: Kimi ships
  DeepSeek-V3's code).

* ``gpt_oss``: biases on every attention projection, attention sinks, sliding-window (4 positions)
  and full layers alternating, YaRN with ``truncate`` false, a biased router (softmax over the
  top-k logits), biased experts with the clamped SwiGLU (``swiglu_limit`` 0.5, so the clamp bites),
  experts fused per layer as transformers saves them.
* ``gpt_oss_mxfp4``: the same model with its expert weights stored as OpenAI ships them, MXFP4
  ``*_blocks`` / ``*_scales`` (quantized here with torch); the reference is transformers' model
  loaded from that directory with its own MXFP4 dequantization (``Mxfp4Config(dequantize=True)``).

Biases (attention, selection bias, experts, attention sinks) are drawn at random: transformers
initialises them to zeros, which would leave the reading of them untested.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from jax_eplb.cli import HelpWithDefaults

PROMPTS = [[1, 5, 9, 2, 7, 3, 11, 4], [17, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [99, 7, 23]]
NEW_TOKENS = 16
TEXT = ("the quick brown fox jumps over the lazy dog while experts route tokens to ranks and the load "
        "balancer moves hot experts so every rank gets the same work in each step of the model")


def deepseek_v3(transformers, torch):
    config = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=64, v_head_dim=16, routed_scaling_factor=2.5, max_position_embeddings=163840,
        initializer_range=0.1, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                                "original_max_position_embeddings": 4096, "beta_fast": 32,
                                                "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    return _with_router_bias(transformers.DeepseekV3ForCausalLM(config), torch)


def deepseek_v3_fp8(transformers, torch):
    config = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=144, intermediate_size=160, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=24, routed_scaling_factor=1.5, max_position_embeddings=512,
        initializer_range=0.1)
    return _with_router_bias(transformers.DeepseekV3ForCausalLM(config), torch)


def qwen3_moe(transformers, torch):
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=16, num_experts_per_tok=4,
        decoder_sparse_step=2, norm_topk_prob=True, tie_word_embeddings=True, max_position_embeddings=512,
        initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    return transformers.Qwen3MoeForCausalLM(config)


def mixtral(transformers, torch):
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        initializer_range=0.1)
    return transformers.MixtralForCausalLM(config)


def glm4_moe(transformers, torch):
    config = transformers.Glm4MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, n_shared_experts=1, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        attention_bias=True, use_qk_norm=True, num_nextn_predict_layers=1, max_position_embeddings=512,
        initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                "partial_rotary_factor": 0.5})
    return _with_random_biases(transformers.Glm4MoeForCausalLM(config), torch)


def kimi_k2(transformers, torch):
    config = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=12, num_experts_per_tok=4,
        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=32, v_head_dim=16, routed_scaling_factor=2.827, max_position_embeddings=131072,
        initializer_range=0.1, rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0,
                                                "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                                                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    return _with_random_biases(transformers.DeepseekV3ForCausalLM(config), torch)


def gpt_oss(transformers, torch):
    config = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
        swiglu_limit=0.5, max_position_embeddings=131072, initializer_range=0.1,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return _with_random_biases(transformers.GptOssForCausalLM(config), torch)


def gpt_oss_mxfp4(transformers, torch):
    return gpt_oss(transformers, torch)


FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def quantize_mxfp4(directory: Path, torch) -> None:
    """Rewrites the saved gpt-oss checkpoint's expert weights as MXFP4, OpenAI's format: ``[E, out, in]``
    in blocks of 32 values along ``in`` (16 bytes, low nibble first) with a uint8 exponent (bias 127)
    per block, the exponent making the block's largest magnitude at most 6."""
    from safetensors.torch import load_file, save_file

    lut = torch.tensor(FP4_VALUES)
    tensors = load_file(directory / "model.safetensors")
    out = {}
    for name, value in tensors.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name] = value
            continue
        weight = value.float().transpose(1, 2)  # [E, out, in]
        blocks = weight.reshape(*weight.shape[:-1], -1, 32)
        exponent = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
        scaled = blocks / torch.exp2(exponent)[..., None]
        codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)
        out[name + "_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
        out[name + "_scales"] = (exponent + 127).to(torch.uint8)
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _with_router_bias(model, torch):
    """A random selection bias (transformers initialises it to zeros), so it steers routing."""
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape) * 0.1)
    return model


def _with_random_biases(model, torch):
    """Every bias (attention projections, the routers' selection bias, attention sinks) drawn at random."""
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("bias") or name.endswith("sinks"):
                tensor.copy_(torch.randn(tensor.shape) * (0.5 if name.endswith("sinks") else 0.1))
    return model


def as_model_type(directory: Path, model_type: str) -> None:
    """config.json's ``model_type`` rewritten (a checkpoint that ships another model type's code)."""
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = model_type
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def quantize_fp8(directory: Path, torch) -> None:
    """Rewrites a saved checkpoint with DeepSeek-V3's FP8 format: each linear weight (not embeddings,
    LM head, norms or the router) as float8_e4m3fn in 128x128 blocks scaled to the block's max."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    out = {}
    for name, value in tensors.items():
        if value.ndim != 2 or any(s in name for s in ("embed_tokens", "lm_head", "norm", ".gate.weight")):
            out[name] = value
            continue
        rows, cols = value.shape
        grid = (-(-rows // 128), -(-cols // 128))
        padded = torch.zeros(grid[0] * 128, grid[1] * 128)
        padded[:rows, :cols] = value
        scale_inv = padded.reshape(grid[0], 128, grid[1], 128).abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        scale = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
        out[name] = (value / scale).to(torch.float8_e4m3fn)
        out[name + "_scale_inv"] = scale_inv.float()
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def dequantized_model(directory: Path, transformers, torch):
    """transformers' model on the FP8 checkpoint's weights, dequantized as DeepSeek's format defines."""
    import tempfile

    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    plain = {}
    for name, value in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale_inv = tensors.get(name + "_scale_inv")
        if scale_inv is not None:
            rows, cols = value.shape
            value = value.float() * scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
        plain[name] = value
    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config")
    with tempfile.TemporaryDirectory() as scratch:
        save_file(plain, Path(scratch) / "model.safetensors", metadata={"format": "pt"})
        (Path(scratch) / "config.json").write_text(json.dumps(config))
        return transformers.AutoModelForCausalLM.from_pretrained(scratch, dtype=torch.float32).eval()


CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0].role == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- set rest = messages[1:] %}"
    "{%- else %}{%- set rest = messages %}{%- endif %}\n"
    "{% for message in rest %}\n"
    "    {% if message.role not in ['user', 'assistant'] %}"
    "{{ raise_exception('roles after an optional system message must be user or assistant') }}{% endif %}\n"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}"
    "{% if loop.last and message.name is defined %}{{ message.name | tojson }}{% endif %}\n"
    "{% endfor %}\n"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
CHATS = [
    [{"role": "user", "content": "the quick brown fox"}],
    [{"role": "system", "content": "every rank gets the same work"},
     {"role": "user", "content": "  route tokens to experts  "},
     {"role": "assistant", "content": "the load balancer moves hot experts"},
     {"role": "user", "content": "so each step of the model", "name": "dog <&>"}],
]
REFUSED_CHATS = [[{"role": "user", "content": "hot"}, {"role": "tool", "content": "dog"}]]


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """tokenizer.json, tokenizer_config.json (chat template) and chat_reference.json, written by transformers."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.split()))[:vocab_size - 4]
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "<|im_start|>", "<|im_end|>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    reference = {"chats": [], "refused": []}
    for chat in CHATS:
        for generation_prompt in (True, False):
            text = fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
            ids = fast.apply_chat_template(chat, tokenize=True, add_generation_prompt=generation_prompt,
                                           return_dict=False)
            reference["chats"].append({"messages": chat, "add_generation_prompt": generation_prompt, "text": text,
                                       "ids": list(ids)})
    for chat in REFUSED_CHATS:
        try:
            fast.apply_chat_template(chat, tokenize=False)
        except Exception as err:  # noqa: BLE001 - jinja2's TemplateError, whatever transformers wraps it in
            reference["refused"].append({"messages": chat, "error": str(err)})
        else:
            raise AssertionError("the template should refuse a tool message")
    reference["prompt"] = {"text": TEXT, "ids": fast(TEXT)["input_ids"]}
    (directory / "chat_reference.json").write_text(json.dumps(reference, indent=1) + "\n")


def reference(model, torch) -> dict:
    """transformers' prefill logits (every position) and greedy tokens for each prompt."""
    width = max(map(len, PROMPTS))
    logits = np.zeros((len(PROMPTS), width, model.config.vocab_size), np.float32)
    tokens = np.zeros((len(PROMPTS), NEW_TOKENS), np.int64)
    prompts = np.zeros((len(PROMPTS), width), np.int64)
    model.generation_config.eos_token_id = None  # exactly NEW_TOKENS greedy tokens, as the runner with --eos_id -1
    model.generation_config.pad_token_id = 0
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits[i, :len(prompt)] = model(ids).logits[0].float().numpy()
            generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        tokens[i] = generated[0, len(prompt):].numpy()
        prompts[i, :len(prompt)] = prompt
    return {"prompts": prompts, "lengths": np.array([len(p) for p in PROMPTS]), "logits": logits, "tokens": tokens}


# The index is the seed.
BUILDS = (deepseek_v3, deepseek_v3_fp8, qwen3_moe, mixtral, glm4_moe, kimi_k2, gpt_oss, gpt_oss_mxfp4)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/hf")
    parser.add_argument("--only", nargs="+", choices=[b.__name__ for b in BUILDS],
                        help="rebuild just these fixtures (the others stay as they are)")
    parser.add_argument("--tokenizer_only", action="store_true",
                        help="only rewrite qwen3_moe's tokenizer files and chat reference (needs transformers, "
                             "not torch)")
    args = parser.parse_args()
    if args.tokenizer_only:
        directory = args.output / "qwen3_moe"
        write_tokenizer(directory, json.loads((directory / "config.json").read_text())["vocab_size"])
        print(f"tokenizer and chat reference -> {directory}")
        return
    import torch
    import transformers

    for seed, build in enumerate(BUILDS):
        name = build.__name__
        if args.only and name not in args.only:
            continue
        torch.manual_seed(seed)
        directory = args.output / name
        shutil.rmtree(directory, ignore_errors=True)
        model = build(transformers, torch).eval()
        shard = "200KB" if name == "qwen3_moe" else "50MB"  # one fixture exercises the sharded layout
        model.save_pretrained(directory, max_shard_size=shard)
        if name.endswith("_fp8"):
            quantize_fp8(directory, torch)
            model = dequantized_model(directory, transformers, torch)
        if name.endswith("_mxfp4"):
            quantize_mxfp4(directory, torch)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
        if name == "kimi_k2":
            as_model_type(directory, "kimi_k2")
        if name == "qwen3_moe":
            write_tokenizer(directory, model.config.vocab_size)
        np.savez_compressed(directory / "reference.npz", **reference(model, torch))
        for extra in ("generation_config.json",):
            (directory / extra).unlink(missing_ok=True)
        size = sum(f.stat().st_size for f in directory.iterdir())
        print(f"{name}: {size / 1e6:.2f} MB -> {directory}")


if __name__ == "__main__":
    main()
