"""Model configuration: a decoder-only MoE transformer, read strictly from YAML.

A config file has one top-level ``model:`` mapping with the keys of :class:`ModelConfig`
(unknown keys are errors, so a typo never silently falls back to a default).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import yaml

from jax_eplb._errors import EplbInputError
from jax_eplb.moe import MoEConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and routing of the model.

    The first ``first_k_dense`` decoder layers have a dense SwiGLU MLP, the rest an MoE MLP.
    ``router_logit_std`` (spread of random router logits, independent of H),
    ``router_bias_scale`` and ``popularity_seed`` only shape *random* initialisation: each MoE
    layer gets a selection bias (standardized log-normal popularity, different experts hot in
    different layers), so a random model routes with real-model skew.
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
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    dtype: str = "float32"
    init_std: float = 0.02
    router_logit_std: float = 0.16
    router_bias_scale: float = 0.0
    popularity_seed: int = 0

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "num_experts", "top_k", "expert_ffn_size", "max_seq_len")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise EplbInputError(f"model config {self.name!r}: {key} must be a positive integer, got {value!r}")
        if not 0 <= self.first_k_dense < self.num_layers:
            raise EplbInputError(f"model config {self.name!r}: first_k_dense must be in [0, num_layers), "
                                 f"got {self.first_k_dense}")
        if self.num_heads % self.num_kv_heads:
            raise EplbInputError(f"model config {self.name!r}: num_heads ({self.num_heads}) must be a multiple "
                                 f"of num_kv_heads ({self.num_kv_heads})")
        if self.dtype not in ("float32", "bfloat16"):
            raise EplbInputError(f"model config {self.name!r}: dtype must be float32 or bfloat16, got {self.dtype!r}")
        try:
            self.moe
        except ValueError as err:
            raise EplbInputError(f"model config {self.name!r}: {err}") from None

    @property
    def moe(self) -> MoEConfig:
        return MoEConfig(hidden_size=self.hidden_size, expert_ffn_size=self.expert_ffn_size,
                         num_experts=self.num_experts, top_k=self.top_k, router=self.router,
                         renormalize=self.renormalize, n_group=self.n_group, topk_group=self.topk_group,
                         routed_scaling_factor=self.routed_scaling_factor,
                         num_shared_experts=self.num_shared_experts, shared_ffn_size=self.shared_ffn_size)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    @property
    def moe_layer_ids(self) -> list[int]:
        """Decoder-layer indices of the MoE layers (the statistics' and plans' layer keys)."""
        return list(range(self.first_k_dense, self.num_layers))

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

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
        return cls(**body)

    @classmethod
    def from_yaml(cls, path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise EplbInputError(f"model config {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise EplbInputError(f"{path}: not valid YAML ({err})") from None
        return cls.from_dict(raw, str(path))


def resolve_model_config(spec: str) -> Path:
    """A model config YAML path, or the name of a shipped config (``tiny``, ``deepseek_v3_slice``)."""
    path = Path(spec)
    if path.is_file():
        return path
    import jax_eplb_configs

    if spec in jax_eplb_configs.available():
        return jax_eplb_configs.config_path(spec)
    raise EplbInputError(f"model config {spec} does not exist (shipped configs: {jax_eplb_configs.available()})")


def load_model_config(spec: str) -> ModelConfig:
    """The :class:`ModelConfig` of a YAML path or a shipped config name."""
    return ModelConfig.from_yaml(resolve_model_config(spec))
