"""A Hugging Face checkpoint directory as a weight source: ``config.json`` + safetensors.

``HuggingFaceCheckpoint`` reads the architecture from ``config.json`` (``model_type``), checks
every tensor the model needs against the config from the safetensors headers alone (names,
shapes, FP8 scales) before any device work, and then reads tensors through memory-mapped
``safe_open``: the non-expert parameters once, the routed experts per device shard (each
process reads only the experts of its own slots, a replicated expert once) and, for online
rebalancing, single experts on demand (``ExpertSource``): no full host copy of the experts.

Axis legend: Lm MoE layers, E experts, S slots, n rows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from jax_eplb._assignment import UNUSED_SLOT
from jax_eplb._errors import EplbInputError
from jax_eplb.hf import _deepseek_v3, _glm4_moe, _gpt_oss, _kimi_k2, _mixtral, _qwen3_moe
from jax_eplb.hf._config import ConfigReader, read_config_json
from jax_eplb.hf._layout import MoELayout, expert, model_params, visit_all
from jax_eplb.hf._safetensors import SafetensorsCheckpoint, StoredTensor, finish_on_device
from jax_eplb.model import ModelConfig
from jax_eplb.moe import FP8_DTYPE, BlockFp8, ExpertWeights, scale_shape
from jax_eplb.moe._slots import set_layer_slots, zero_slot_buffers
from jax_eplb.sharding import over_ranks

ARCHITECTURES = {module.MODEL_TYPE: module for module in (_deepseek_v3, _kimi_k2, _glm4_moe, _gpt_oss, _qwen3_moe,
                                                                _mixtral)}
DEFAULT_CACHE_LENGTH = 4096
WEIGHT_DTYPES = ("auto", "fp8", "bf16", "float32")
_FLOAT_WEIGHTS = {"bf16": "bfloat16", "float32": "float32"}


def fp8_block_size(raw: dict, source: str) -> tuple[int, int] | None:
    """``quantization_config``'s FP8 block ``[out, in]`` (None: not FP8); anything but DeepSeek's
    block-wise e4m3 FP8, or a format the architecture's own layout reads (its ``OWN_QUANTIZATIONS``:
    gpt-oss' MXFP4 experts), is refused in one line."""
    quantization = raw.get("quantization_config")
    if not quantization:
        return None
    own = getattr(ARCHITECTURES.get(raw.get("model_type")), "OWN_QUANTIZATIONS", ())
    if isinstance(quantization, dict) and quantization.get("quant_method") in own:
        return None
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "fp8":
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise EplbInputError(f"{source}: quantization {method!r} is not supported (block-wise FP8, quant_method "
                             f"'fp8' with weight_block_size, is)")
    block = quantization.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise EplbInputError(f"{source}: quantization_config.weight_block_size must be two positive integers "
                             f"(per-tensor FP8 is not supported), got {block!r}")
    if quantization.get("fmt", "e4m3") != "e4m3":
        raise EplbInputError(f"{source}: FP8 format {quantization.get('fmt')!r} is not supported (e4m3 is)")
    return tuple(block)


def hf_model_config(directory, *, name: str | None = None, max_seq_len: int | None = None,
                    dtype: str | None = None, weight_dtype: str = "auto") -> tuple[ModelConfig, MoELayout, list[str]]:
    """(``ModelConfig``, tensor layout, notes) of a checkpoint directory's ``config.json``.

    ``max_seq_len``: the KV-cache length to allocate (default: the model's
    ``max_position_embeddings``, at most 4096); ``dtype``: compute dtype (default: the checkpoint's,
    float32 or bfloat16); ``weight_dtype`` (``WEIGHT_DTYPES``): ``auto`` keeps the weights as stored
    (an FP8 checkpoint's linear weights stay FP8 on the devices), ``fp8`` the same but refuses a
    checkpoint without FP8 weights, ``bf16`` / ``float32`` dequantize FP8 while loading and compute
    in that dtype.
    """
    raw = read_config_json(directory)
    source = str(Path(directory) / "config.json")
    if weight_dtype not in WEIGHT_DTYPES:
        raise EplbInputError(f"--weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    block = fp8_block_size(raw, source)
    if weight_dtype == "fp8" and block is None:
        raise EplbInputError(f"--weight_dtype fp8: {source} stores no FP8 weights (FP8 is kept as a checkpoint "
                             f"stores it, never made from other weights)")
    if weight_dtype in _FLOAT_WEIGHTS:
        if dtype not in (None, _FLOAT_WEIGHTS[weight_dtype]):
            raise EplbInputError(f"--weight_dtype {weight_dtype} with compute dtype {dtype}: they must agree")
        dtype, block = _FLOAT_WEIGHTS[weight_dtype], None
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise EplbInputError(f"{source}: model_type {model_type!r} is not supported; supported: "
                             f"{sorted(ARCHITECTURES)}")
    architecture = ARCHITECTURES[model_type]
    reader = ConfigReader(raw, source)
    try:
        fields, notes = architecture.model_fields(reader)
    except (KeyError, TypeError, ValueError) as err:
        raise EplbInputError(f"{source}: malformed field ({type(err).__name__}: {err})") from None
    reader.check_all_handled(model_type)
    stored = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    fields.update(name=name or model_type, dtype=dtype or ("float32" if stored == "float32" else "bfloat16"),
                  max_seq_len=max_seq_len or min(fields["max_position_embeddings"], DEFAULT_CACHE_LENGTH),
                  fp8_block=block)
    if stored not in ("float32", "bfloat16") and dtype is None:
        notes.append(f"checkpoint dtype {stored} computed in bfloat16")
    layout = architecture.layout(raw) if hasattr(architecture, "layout") else architecture.LAYOUT
    return ModelConfig(**fields), layout, notes


class HuggingFaceCheckpoint:
    """A ``WeightSource`` (and ``ExpertSource``) over a Hugging Face checkpoint directory."""

    def __init__(self, directory, *, name: str | None = None, max_seq_len: int | None = None,
                 dtype: str | None = None, weight_dtype: str = "auto"):
        self.directory = Path(directory)
        self.config, self.layout, self.notes = hf_model_config(directory, name=name, max_seq_len=max_seq_len,
                                                               dtype=dtype, weight_dtype=weight_dtype)
        # the stored FP8 block, also where the weights are dequantized while loading (config.fp8_block None)
        block = fp8_block_size(read_config_json(directory), str(directory))
        self.tensors = SafetensorsCheckpoint(directory, block)

    def with_config(self, config: ModelConfig) -> "HuggingFaceCheckpoint":
        """The same checkpoint serving ``config`` (e.g. another cache length)."""
        other = object.__new__(HuggingFaceCheckpoint)
        other.__dict__.update(self.__dict__, config=config)
        return other

    def check(self) -> None:
        """Every tensor the model needs is present with the shape config.json implies (headers only)."""
        c = self.config

        def declared(name: str, shape: tuple) -> np.ndarray:
            self.tensors.check(name, shape)
            return np.broadcast_to(np.float32(0), shape)

        visit_all(declared, c, self.layout)

    # ------------------------------------------------------------------ WeightSource

    def _require(self, config: ModelConfig) -> None:
        shape_fields = [f.name for f in dataclasses.fields(ModelConfig)
                        if f.name not in ("name", "max_seq_len", "dtype", "fp8_block")]
        differ = [k for k in shape_fields if getattr(config, k) != getattr(self.config, k)]
        if differ:
            raise EplbInputError(f"{self.directory} holds a different model than asked for: {differ} differ")

    def params(self, config: ModelConfig) -> dict:
        """Every parameter but the routed experts as ``StoredTensor``s (finished on the device, or
        kept FP8 where the model holds an ``Fp8Weight``)."""
        self._require(config)
        return model_params(self.tensors.stored, config, self.layout)

    def slot_experts(self, config: ModelConfig, mesh, slot_to_expert) -> ExpertWeights:
        """Routed experts ``[Lm, S, ...]``: per layer, each device's slots read as stored (a replicated
        expert once per process) and finished on the device (FP8 under ``config.fp8_block``: kept,
        with its scales, as ``BlockFp8``)."""
        self._require(config)
        index = np.asarray(slot_to_expert)
        buffers = zero_slot_buffers(self._for(config).expert_shapes(), index.shape, mesh)
        for layer, decoder_layer in enumerate(config.moe_layer_ids):
            buffers = set_layer_slots(buffers, self._layer_slots(config, decoder_layer, index[layer], mesh), layer)
        return buffers

    def _for(self, config: ModelConfig) -> "HuggingFaceCheckpoint":
        return self if config == self.config else self.with_config(config)

    def _layer_slots(self, config: ModelConfig, decoder_layer: int, slot_experts: np.ndarray,
                     mesh) -> ExpertWeights:
        c, sharding = config, over_ranks(mesh)
        stored: dict[int, tuple[StoredTensor, ...]] = {}  # expert -> its three tensors, read once

        def of(expert_id: int) -> tuple[StoredTensor, ...]:
            if expert_id not in stored:
                stored[expert_id] = expert(self.tensors.stored, decoder_layer, expert_id, c, self.layout)
            return stored[expert_id]

        def leaf(i: int) -> jax.Array:
            first = of(int(slot_experts[slot_experts != UNUSED_SLOT][0]))[i]

            def stacked(part: str, idx) -> np.ndarray:  # a slot serving nothing holds zeros
                return np.stack([getattr(of(int(e))[i], part) if e != UNUSED_SLOT
                                 else np.zeros(getattr(first, part).shape, getattr(first, part).dtype)
                                 for e in slot_experts[idx[0]]])

            value = jax.make_array_from_callback(
                (len(slot_experts),) + first.value.shape, sharding, lambda idx: stacked("value", idx))
            scale = None
            if first.scale_inv is not None:
                scale = jax.make_array_from_callback(
                    (len(slot_experts),) + first.scale_inv.shape, sharding, lambda idx: stacked("scale_inv", idx))
            if c.fp8_block is not None:  # kept as stored: one byte per weight, and its scales
                return StoredTensor(value, scale, first.block, first.transpose).place_fp8(
                    sharding, f"layer {decoder_layer} experts")
            return finish_on_device(value, scale, block=first.block, transpose=first.transpose, dtype=c.jnp_dtype)

        return ExpertWeights(*(leaf(i) for i in range(3)))

    def expert_source(self, config: ModelConfig) -> "HuggingFaceCheckpoint":
        self._require(config)
        return self._for(config)

    # ------------------------------------------------------------------ ExpertSource

    def expert_shapes(self) -> ExpertWeights:
        """One expert's shapes: the compute dtype, or ``BlockFp8`` (values and scales) under ``fp8_block``."""
        c, dt = self.config, self.config.jnp_dtype
        shapes = c.moe.expert_shapes
        if c.weight_block is None:
            return ExpertWeights(*(jax.ShapeDtypeStruct(shape, dt) for shape in shapes))
        return ExpertWeights(*(BlockFp8(jax.ShapeDtypeStruct(shape, FP8_DTYPE),
                                        jax.ShapeDtypeStruct(scale_shape(shape, c.weight_block), np.float32),
                                        c.weight_block) for shape in shapes))

    def rows(self, layer: int, experts: np.ndarray) -> ExpertWeights:
        """Experts ``[n]`` of MoE layer ``layer`` (0-based among the MoE layers), ``[n, ...]``: the compute
        dtype (dequantized), or as stored FP8 (``BlockFp8``, the host master copy moves as is) under ``fp8_block``."""
        decoder_layer = self.config.moe_layer_ids[layer]
        if self.config.fp8_block is None:  # dequantized on the host, in the compute dtype as expert_shapes says
            # fused experts (gpt-oss): the expert's rows of the stored layer tensors, read alone
            read = self.tensors.stored if self.layout.fused_experts else self.tensors.tensor
            weights = [[getattr(w, "value", w) for w in expert(read, decoder_layer, int(e), self.config, self.layout)]
                       for e in experts]
            return ExpertWeights(*(np.stack(leaf).astype(self.config.jnp_dtype) for leaf in zip(*weights)))
        stored = [[w.fp8(f"layer {decoder_layer} expert {e}")
                   for w in expert(self.tensors.stored, decoder_layer, int(e), self.config, self.layout)]
                  for e in experts]
        return ExpertWeights(*(BlockFp8(np.stack([w.values for w in leaf]), np.stack([w.scale_inv for w in leaf]),
                                        leaf[0].block) for leaf in zip(*stored)))
