"""Model configuration: a decoder-only MoE transformer, read strictly from YAML (or from a Hugging
Face ``config.json`` by ``jax_eplb.hf``).

A config file has one top-level ``model:`` mapping with the keys of :class:`ModelConfig`
(unknown keys and values of the wrong type are errors, so a typo never silently falls back to a
default).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
from jax_eplb._errors import EplbInputError
from jax_eplb._yaml import load_yaml
from jax_eplb.moe import MoEConfig

ATTENTIONS = ("gqa", "mla")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and routing of the model.

    Layers: decoder layer l has an MoE MLP when ``l >= first_k_dense``, ``l`` is not in
    ``mlp_only_layers`` and ``(l + 1) % decoder_sparse_step == 0`` (Qwen3-MoE's rule; DeepSeek's
    ``first_k_dense_replace`` is ``first_k_dense``); the others have a dense SwiGLU MLP.

    Experts: ``activation``, ``swiglu_alpha``, ``swiglu_limit``, ``expert_bias`` and the router's
    ``router_logit_bias`` as ``MoEConfig`` defines them (gpt-oss: clamped SwiGLU, biased experts,
    ``router`` ``topk_softmax``).

    Attention: ``gqa`` (grouped-query, ``head_dim`` per head; optional per-head q/k RMSNorm:
    Qwen3, GLM-4.5; ``attention_bias``: biases on the q, k and v projections, GLM-4.5, gpt-oss;
    ``attention_out_bias``: on the output projection too, gpt-oss; ``attention_sinks``: one learned
    logit per head joins each softmax and takes its share of the weight, gpt-oss; ``sliding_window``:
    the decoder layers in ``sliding_window_layers`` see only the last ``sliding_window`` positions,
    gpt-oss; ``rotary_dim``: RoPE on each head's first ``rotary_dim`` dims only, GLM-4.5's
    ``partial_rotary_factor``) or ``mla`` (DeepSeek multi-head latent attention: ``q_lora_rank``
    (None: no query compression), ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``,
    ``v_head_dim``; the cache holds the compressed latent and the rotary key). ``rope_interleave``
    rotates interleaved pairs (DeepSeek's layout) instead of halves. ``yarn_*``: YaRN
    ``rope_scaling`` (``yarn_factor`` None: plain RoPE; ``yarn_truncate`` False: the correction
    range is not rounded to whole dims, gpt-oss). ``max_position_embeddings`` is the model's longest
    supported sequence; ``max_seq_len`` the KV-cache length this run allocates.

    ``dtype`` is the compute dtype (activations, caches, and every weight not held in FP8);
    ``fp8_block`` (a checkpoint's ``weight_block_size``, ``[out, in]``): the linear layers'
    weights (attention projections, dense MLPs, shared and routed experts) stay FP8 e4m3 with one
    float32 scale per block and are dequantized in the step right before their matmul; None: every
    weight in ``dtype``.

    ``router_logit_std``, ``router_bias_scale``, ``popularity_seed``, ``init_std`` only shape
    *seeded random* weights: each MoE layer gets a selection bias (standardized log-normal
    popularity, different experts hot in different layers), so a random model routes with
    real-model skew.
    """

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    first_k_dense: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dense_ffn_size: int
    num_experts: int
    top_k: int
    expert_ffn_size: int
    max_seq_len: int
    router: str = "deepseek"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    renormalize: bool = True
    num_shared_experts: int = 0
    shared_ffn_size: int | None = None
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    attention: str = "gqa"
    qk_norm: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    attention_sinks: bool = False
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] = ()
    rotary_dim: int | None = None
    router_logit_bias: bool = False
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_theta: float = 10000.0
    rope_interleave: bool = False
    yarn_factor: float | None = None
    yarn_original_max_position: int | None = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    yarn_truncate: bool = True
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    dtype: str = "float32"
    fp8_block: tuple[int, ...] | None = None
    init_std: float = 0.02
    router_logit_std: float = 0.16
    router_bias_scale: float = 0.0
    popularity_seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers or ()))
        object.__setattr__(self, "sliding_window_layers", tuple(self.sliding_window_layers or ()))
        if isinstance(self.fp8_block, list):
            object.__setattr__(self, "fp8_block", tuple(self.fp8_block))
        _check_types(self)
        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "dense_ffn_size", "num_experts", "top_k", "expert_ffn_size", "max_seq_len", "decoder_sparse_step"]
        if self.attention == "mla":
            positive += ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
        for key in positive:
            if getattr(self, key) < 1:
                self._error(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
            if not getattr(self, key) > 0:
                self._error(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not 0 <= self.first_k_dense < self.num_layers:
            self._error(f"first_k_dense must be in [0, num_layers), got {self.first_k_dense}")
        if self.num_heads % self.num_kv_heads:
            self._error(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self._check_choices()
        if not self.moe_layer_ids:
            self._error("no decoder layer has an MoE MLP (first_k_dense, mlp_only_layers, decoder_sparse_step)")
        try:
            self.moe
        except ValueError as err:
            self._error(str(err))

    def _check_choices(self):
        if self.dtype not in DTYPES:
            self._error(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention not in ATTENTIONS:
            self._error(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.yarn_factor is not None and (self.yarn_factor <= 0 or not self.yarn_original_max_position):
            self._error("yarn_factor needs a positive value and yarn_original_max_position")
        if self.sliding_window_layers and (self.sliding_window is None or self.sliding_window < 1):
            self._error("sliding_window_layers need a positive sliding_window")
        if any(not 0 <= l < self.num_layers for l in self.sliding_window_layers):
            self._error(f"sliding_window_layers must be decoder layers in [0, {self.num_layers})")
        if self.attention != "gqa" and (self.sliding_window_layers or self.attention_sinks or self.attention_bias):
            self._error("sliding windows, attention sinks and attention biases are implemented for gqa attention")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            self._error(f"rotary_dim must be an even number in [2, head_dim={self.head_dim}], got {self.rotary_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            self._error(f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.fp8_block is not None and (len(self.fp8_block) != 2 or min(self.fp8_block) < 1):
            self._error(f"fp8_block must be two positive integers [out, in], got {list(self.fp8_block)}")
        if self.max_position_embeddings is not None and self.max_seq_len > self.max_position_embeddings:
            self._error(f"max_seq_len ({self.max_seq_len}) exceeds max_position_embeddings "
                        f"({self.max_position_embeddings})")

    def _error(self, message: str):
        raise EplbInputError(f"model config {self.name!r}: {message}")

    @property
    def moe(self) -> MoEConfig:
        return MoEConfig(hidden_size=self.hidden_size, expert_ffn_size=self.expert_ffn_size,
                         num_experts=self.num_experts, top_k=self.top_k, router=self.router,
                         renormalize=self.renormalize, n_group=self.n_group, topk_group=self.topk_group,
                         routed_scaling_factor=self.routed_scaling_factor,
                         num_shared_experts=self.num_shared_experts, shared_ffn_size=self.shared_ffn_size,
                         router_logit_bias=self.router_logit_bias, activation=self.activation,
                         swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit, expert_bias=self.expert_bias)

    @property
    def moe_layer_ids(self) -> list[int]:
        """Decoder-layer indices of the MoE layers (the statistics' and plans' layer keys)."""
        return [l for l in range(self.num_layers) if l >= self.first_k_dense and l not in self.mlp_only_layers
                and (l + 1) % self.decoder_sparse_step == 0]

    def layer_windows(self, layers) -> tuple[int, ...]:
        """The attention window of each decoder layer in ``layers`` (0: the whole sequence)."""
        return tuple(self.sliding_window if l in self.sliding_window_layers else 0 for l in layers)

    @property
    def dense_layer_ids(self) -> list[int]:
        moe = set(self.moe_layer_ids)
        return [l for l in range(self.num_layers) if l not in moe]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_block(self) -> tuple[int, int] | None:
        """The FP8 block in the model's ``[in, out]`` orientation (``fp8_block`` swapped), or None."""
        return None if self.fp8_block is None else (self.fp8_block[1], self.fp8_block[0])

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<config>") -> "ModelConfig":
        if not isinstance(raw, Mapping) or "model" not in raw or not isinstance(raw["model"], Mapping):
            raise EplbInputError(f"{source}: expected a top-level 'model:' mapping")
        body = dict(raw["model"])
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - fields)
        if unknown:
            raise EplbInputError(f"{source}: unknown model key(s) {unknown}")
        body.setdefault("name", Path(source).stem)
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(body))
        if missing:
            raise EplbInputError(f"{source}: missing model key(s) {missing}")
        try:
            return cls(**body)
        except EplbInputError as err:  # name the file, not only the model
            raise EplbInputError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path) -> "ModelConfig":
        return cls.from_dict(load_yaml(path, "model config"), str(path))


_HINTS = typing.get_type_hints(ModelConfig)


def _check_types(config: ModelConfig) -> None:
    """Every field holds a value of its annotated type (``1`` is a float; ``True`` is no int)."""
    for field in dataclasses.fields(ModelConfig):
        value, hint = getattr(config, field.name), _HINTS[field.name]
        allowed = (hint,) if typing.get_origin(hint) is tuple else (typing.get_args(hint) or (hint,))
        if value is None and type(None) in allowed:
            continue
        if any(_is(value, kind) for kind in allowed if kind is not type(None)):
            continue
        raise EplbInputError(f"model config {config.name!r}: {field.name} must be {_describe(allowed)}, "
                             f"got {value!r}")


def _is(value, kind) -> bool:
    origin = typing.get_origin(kind)
    if origin is tuple:
        return isinstance(value, tuple) and all(_is(v, int) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(allowed) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return " or ".join(names.get(kind, "a list of integers") for kind in allowed)


def resolve_model_config(spec: str) -> Path:
    """A model config YAML path, or the name of a shipped config (``tiny``, ``deepseek_v3_slice``)."""
    path = Path(spec)
    if path.is_file():
        return path
    import jax_eplb_configs

    if spec in jax_eplb_configs.available():
        return jax_eplb_configs.config_path(spec)
    if path.exists():
        raise EplbInputError(f"model config {spec} is not a file")
    raise EplbInputError(f"model config {spec} does not exist (shipped configs: {jax_eplb_configs.available()})")


def load_model_config(spec: str) -> ModelConfig:
    """The :class:`ModelConfig` of a YAML path or a shipped config name."""
    return ModelConfig.from_yaml(resolve_model_config(spec))
