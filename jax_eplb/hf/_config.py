"""``config.json`` -> ``ModelConfig``: strict reading shared by the architectures.

Every key of a config must be one the architecture reads, one that has no effect on inference
(training-only settings, token ids, bookkeeping), or an error: a field the model does not
implement (a sliding window, attention biases, another activation) is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jax_eplb._errors import EplbInputError

# Keys of any transformers config that change nothing in inference here.
NO_EFFECT = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "auto_map", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "attention_dropout", "output_router_logits",
    "router_aux_loss_coef", "pretraining_tp", "torch_dtype", "dtype", "quantization_config", "_attn_implementation",
    "return_dict", "output_hidden_states", "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder",
    "tokenizer_class", "head_dim", "qk_head_dim", "num_nextn_predict_layers", "rope_theta", "rope_scaling",
    "rope_parameters", "id2label", "label2id", "problem_type", "tie_word_embeddings", "hidden_act",
    "attention_bias", "max_position_embeddings", "rms_norm_eps", "vocab_size", "hidden_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "num_experts_per_tok",
})
MISSING = object()


@dataclasses.dataclass
class ConfigReader:
    """Typed access to a parsed ``config.json``; remembers which keys an architecture handled."""

    raw: dict
    source: str
    handled: set = dataclasses.field(default_factory=set)

    def _value(self, key: str, default):
        self.handled.add(key)
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        if default is MISSING:
            raise EplbInputError(f"{self.source}: missing field {key!r}")
        return default

    def int(self, key: str, default: Any = MISSING, minimum: int = 1) -> int:
        value = self._value(key, default)
        if value is None:
            return value
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise EplbInputError(f"{self.source}: {key} must be an integer >= {minimum}, got {value!r}")
        return value

    def optional_int(self, key: str) -> int | None:
        self.handled.add(key)
        return None if self.raw.get(key) is None else self.int(key)

    def float(self, key: str, default: Any = MISSING) -> float:
        value = self._value(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise EplbInputError(f"{self.source}: {key} must be a number, got {value!r}")
        return float(value)

    def bool(self, key: str, default: Any = MISSING) -> bool:
        value = self._value(key, default)
        if not isinstance(value, bool):
            raise EplbInputError(f"{self.source}: {key} must be true or false, got {value!r}")
        return value

    def require(self, key: str, allowed: tuple, default: Any = None, why: str = "") -> Any:
        """The value of ``key``, which must be one of ``allowed`` (what this model implements)."""
        self.handled.add(key)
        value = self.raw.get(key, default)
        if value not in allowed:
            raise EplbInputError(f"{self.source}: {key}={value!r} is not supported (supported: {list(allowed)})"
                                 f"{'; ' + why if why else ''}")
        return value

    def ignore(self, *keys: str) -> None:
        """Keys known to change nothing at inference (training-only settings)."""
        self.handled.update(keys)

    def check_all_handled(self, model_type: str) -> None:
        unknown = sorted(set(self.raw) - self.handled - NO_EFFECT)
        if unknown:
            raise EplbInputError(f"{self.source}: field(s) {unknown} are not implemented by jax_eplb's {model_type} "
                                 f"model (refusing to ignore them silently)")


def read_config_json(path) -> dict:
    """A checkpoint directory's ``config.json`` (or a config file given directly), parsed."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EplbInputError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
        path = path / "config.json"
    elif not path.is_file():
        raise EplbInputError(f"{path}: no such file")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise EplbInputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise EplbInputError(f"{path}: expected a JSON object")
    return raw


@dataclasses.dataclass(frozen=True)
class Rope:
    theta: float
    yarn: dict | None  # factor, original_max_position_embeddings, beta_fast, beta_slow, mscale_all_dim


def read_rope(reader: ConfigReader, allow_yarn: bool) -> Rope:
    """``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (the published configs)."""
    params = reader.raw.get("rope_parameters") or {}
    scaling = reader.raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise EplbInputError(f"{reader.source}: rope_parameters / rope_scaling must be objects")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", reader.raw.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "default":
        return Rope(float(theta), None)
    if kind != "yarn" or not allow_yarn:
        supported = ["default", "yarn"] if allow_yarn else ["default"]
        raise EplbInputError(f"{reader.source}: rope type {kind!r} is not implemented (supported: {supported})")
    if merged.get("attention_factor") is not None:
        raise EplbInputError(f"{reader.source}: YaRN with an explicit attention_factor is not implemented")
    # transformers' YaRN scales attention by (0.1 * ln(factor) + 1)^2 when neither mscale key is set
    # (gpt-oss), which is mscale_all_dim 1.0 here; DeepSeek-V3/R1 and Kimi-K2 set both to 1.0.
    default_mscale = 1.0 if "mscale" not in merged and "mscale_all_dim" not in merged else 0
    yarn = {"factor": float(merged["factor"]),
            "original_max_position_embeddings": int(merged["original_max_position_embeddings"]),
            "beta_fast": float(merged.get("beta_fast") or 32), "beta_slow": float(merged.get("beta_slow") or 1),
            "mscale_all_dim": float(merged.get("mscale_all_dim") or default_mscale),
            "truncate": bool(merged.get("truncate", True))}
    if merged.get("mscale", 1) != merged.get("mscale_all_dim", merged.get("mscale", 1)):
        raise EplbInputError(f"{reader.source}: YaRN with mscale != mscale_all_dim is not implemented "
                             f"(DeepSeek-V3/R1 use 1.0 for both)")
    return Rope(float(theta), yarn)


def common_fields(reader: ConfigReader, attention_bias: bool = False) -> dict:
    """The ``ModelConfig`` fields every supported architecture reads the same way (``attention_bias``:
    whether the architecture's attention may have biases)."""
    reader.require("hidden_act", ("silu",), "silu")
    if not attention_bias:
        reader.require("attention_bias", (False, None), False, "attention biases")
    return dict(vocab_size=reader.int("vocab_size"), hidden_size=reader.int("hidden_size"),
                num_layers=reader.int("num_hidden_layers"), num_heads=reader.int("num_attention_heads"),
                top_k=reader.int("num_experts_per_tok"), rms_norm_eps=reader.float("rms_norm_eps", 1e-6),
                max_position_embeddings=reader.int("max_position_embeddings"),
                tie_word_embeddings=reader.bool("tie_word_embeddings", False))

