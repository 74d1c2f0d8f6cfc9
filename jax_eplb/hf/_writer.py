"""Random checkpoints in the Hugging Face layout of a real architecture (``create-checkpoint
--hf_config``): real layer shapes for benchmarks without downloading a model.

Tensors are drawn per name from a seeded generator (norm weights 1, DeepSeek's selection bias a
skewed per-layer popularity as in the stand-in models), optionally block-quantized to FP8 as
DeepSeek-V3 stores its linear layers, and written as safetensors shards with an index.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from jax_eplb._atomic import atomic_directory
from jax_eplb._random_checkpoint_marker import check_random_checkpoint_target, mark_random_checkpoint
from jax_eplb._errors import EplbInputError
from jax_eplb.hf._config import read_config_json
from jax_eplb.hf._layout import visit_all
from jax_eplb.hf._safetensors import INDEX_FILE, SCALE_SUFFIX, quantize_blocks

SHARD_BYTES = 2 << 30
FP8_BLOCK = (128, 128)
_NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm", ".gate.weight", "e_score_correction_bias")


def create_hf_checkpoint(hf_config, output, *, num_layers: int | None = None, num_experts: int | None = None,
                         vocab_size: int | None = None, fp8: bool = False, seed: int = 0,
                         dtype: str = "bfloat16", log=print) -> Path:
    """Writes a random checkpoint for ``hf_config`` (a ``config.json``) into the directory ``output``: new,
    empty, or an earlier random checkpoint (replaced whole); any other existing directory is refused.

    ``num_layers`` / ``num_experts`` / ``vocab_size`` shrink the model (DeepSeek keeps its dense
    layers first: ``first_k_dense_replace`` is capped at ``num_layers - 1``); ``fp8`` stores linear
    weights as ``float8_e4m3fn`` with 128x128 ``weight_scale_inv`` (DeepSeek-V3's format).
    """
    from jax_eplb.hf._checkpoint import hf_model_config

    import jax_eplb_configs

    try:
        hf_config = jax_eplb_configs.hf_config_path(str(hf_config))
    except FileNotFoundError as err:
        raise EplbInputError(f"--hf_config: {err}") from None
    output = Path(output)
    replace = check_random_checkpoint_target(output)
    raw = _shrunk(read_config_json(hf_config), hf_config, num_layers, num_experts, vocab_size, fp8, dtype)
    with atomic_directory(output, replace_existing=replace) as staging:
        mark_random_checkpoint(staging, hf_config=Path(hf_config).name, num_layers=num_layers,
                               num_experts=num_experts, vocab_size=vocab_size, fp8=fp8, seed=seed, dtype=dtype)
        (staging / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        config, layout, _ = hf_model_config(staging)
        writer = _ShardWriter(staging, np.random.default_rng(seed), fp8, dtype)
        visit_all(writer.tensor, config, layout)
        writer.close()
    log(f"wrote {config.name} checkpoint: {config.num_layers} layers ({config.num_moe_layers} MoE, "
        f"{config.num_experts} experts){', FP8' if fp8 else ''}, {writer.total / 2**30:.2f} GiB -> {output}")
    return output


def _shrunk(raw: dict, hf_config, num_layers, num_experts, vocab_size, fp8: bool, dtype: str) -> dict:
    raw = dict(raw)
    if fp8 and raw.get("model_type") == "gpt_oss":
        raise EplbInputError(f"--hf_config {hf_config}: gpt-oss ships MXFP4 experts, not FP8 (write it without --fp8)")
    if num_layers is not None:
        raw["num_hidden_layers"] = num_layers
        if isinstance(raw.get("layer_types"), list):
            raw["layer_types"] = raw["layer_types"][:num_layers]
        if "first_k_dense_replace" in raw:
            raw["first_k_dense_replace"] = min(raw["first_k_dense_replace"], max(num_layers - 1, 0))
    if num_experts is not None:
        key = next((k for k in ("n_routed_experts", "num_experts", "num_local_experts") if k in raw), None)
        if key is None:
            raise EplbInputError(f"--hf_config {hf_config}: no expert count to override")
        raw[key] = num_experts
        if raw.get("n_group"):  # keep groups dividing the experts
            raw["n_group"] = min(raw["n_group"], num_experts)
            raw["topk_group"] = min(raw.get("topk_group", 1), raw["n_group"])
        raw["num_experts_per_tok"] = min(raw.get("num_experts_per_tok", 1), num_experts)
    if vocab_size is not None:
        raw["vocab_size"] = vocab_size
    raw["dtype"] = dtype
    raw.pop("torch_dtype", None)
    if fp8:
        raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": list(FP8_BLOCK)}
    else:
        raw.pop("quantization_config", None)
    return raw


class _ShardWriter:
    def __init__(self, directory: Path, rng, fp8: bool, dtype: str):
        self.directory, self.rng, self.fp8 = directory, rng, fp8
        self.dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.shards: list[str] = []
        self.total = 0

    def tensor(self, name: str, shape: tuple) -> np.ndarray:
        if name.endswith("norm.weight"):
            value = np.ones(shape, np.float32)
        elif name.endswith("e_score_correction_bias"):
            layer_rng = np.random.default_rng(zlib.crc32(name.encode()))
            popularity = np.log(layer_rng.lognormal(0.0, 1.0, shape))
            value = (0.035 * (popularity - popularity.mean()) / popularity.std()).astype(np.float32)
        else:
            value = self.rng.normal(0.0, 0.02, shape).astype(np.float32)
        if self.fp8 and len(shape) == 2 and not any(part in name for part in _NOT_QUANTIZED):
            weight, scale_inv = quantize_blocks(value, FP8_BLOCK)
            self._add(name, weight)
            self._add(name + SCALE_SUFFIX, scale_inv)
            return np.broadcast_to(np.float32(0), shape)
        stored = value if "e_score_correction_bias" in name or ".gate.weight" in name else value.astype(self.dtype)
        self._add(name, stored)
        return np.broadcast_to(np.float32(0), shape)

    def _add(self, name: str, value: np.ndarray) -> None:
        self.pending[name] = np.ascontiguousarray(value)
        self.pending_bytes += value.nbytes
        self.total += value.nbytes
        if self.pending_bytes >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        from safetensors.numpy import save_file

        shard = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(self.directory / shard), metadata={"format": "pt"})
        self.weight_map.update({name: shard for name in self.pending})
        self.shards.append(shard)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
