"""Weights into the model: a ``WeightSource`` fills the NNX structure without random init.

Axis legend: V vocab, H hidden, D = heads*head_dim, G = kv_heads*head_dim, Fd dense FFN,
Ld dense layers, Lm MoE layers, E experts, S slots, F expert FFN, Fs shared FFN.

A source gives (1) every parameter but the routed experts, as a nested dict shaped like the
model's state (``nnx.State.to_pure_dict()``), (2) the routed experts laid into the slots of a
placement, read per device shard, and (3) host access to single experts (``ExpertSource``) for
re-placing them later. ``build_model`` checks (1) against the model's structure: a missing,
extra or misshapen tensor is an error naming its path.

``SeededWeights``: random weights from a seed; an expert is a pure function of (seed, MoE
layer, expert id), so slot weights are generated per shard directly under any placement (no
device or host ever holds all experts) and equal the logical experts laid out by the plan.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_eplb._assignment import UNUSED_SLOT, AssignmentTables
from jax_eplb._errors import EplbInputError
from jax_eplb._synthetic import expert_popularity
from jax_eplb.model._config import ModelConfig
from jax_eplb.model._transformer import MoETransformer
from jax_eplb.moe import ExpertSource, ExpertWeights, HostExperts, MoEOptions, PlacementTable, SlotParam
from jax_eplb.sharding import replicated, stacked_over_ranks


class WeightSource(Protocol):
    def params(self, config: ModelConfig) -> dict:
        """Every parameter but the routed experts, nested like the model's state."""

    def slot_experts(self, config: ModelConfig, mesh, slot_to_expert: np.ndarray) -> ExpertWeights:
        """Routed experts ``[Lm, S, ...]`` for the placement ``[Lm, S]``, sharded over ``ep``."""

    def expert_source(self, config: ModelConfig) -> ExpertSource:
        """Host access to single logical experts (the online balancer's source for rewritten slots)."""


def build_model(config: ModelConfig, mesh, tables: AssignmentTables, weights: WeightSource, *,
                options: MoEOptions = MoEOptions()) -> MoETransformer:
    """A ``MoETransformer`` on ``mesh`` with ``weights`` under the placement ``tables``."""
    abstract = abstract_model(config, mesh, tables, options=options)
    graphdef, slots, placement, params = nnx.split(abstract, SlotParam, PlacementTable, ...)
    nnx.replace_by_pure_dict(params, _place_params(nnx.to_pure_dict(params), weights.params(config), replicated(mesh)))
    model = nnx.merge(graphdef, slots, placement, params)
    model.set_slot_experts(weights.slot_experts(config, mesh, tables.slot_to_expert))
    model.set_tables(tables)
    return model


class _ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` under ``nnx.eval_shape``, where only the shapes of initial values
    matter: every draw uses one fixed key. (A real ``nnx.Rngs`` updates a traced counter per draw,
    and flax compares each update's sharding against the whole trace so far: quadratic in the
    model's size, 20 s for DeepSeek-V3's 61 layers instead of about one.)"""

    def __init__(self):
        self._key = jax.random.key(0)

    def params(self):
        return self._key


def abstract_model(config: ModelConfig, mesh, tables: AssignmentTables, *,
                   options: MoEOptions = MoEOptions()) -> MoETransformer:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves (no arrays allocated)."""
    return nnx.eval_shape(lambda: MoETransformer(config, mesh, tables, options=options, rngs=_ShapeOnlyRngs()))


def _place_params(expected: Mapping, given: Mapping, sharding, path: str = "") -> dict:
    """``given`` arrays on ``sharding`` in the structure (and shapes, dtypes) of ``expected``."""
    if not isinstance(given, Mapping):
        raise EplbInputError(f"weights: {path or 'root'} should be a mapping of {sorted(expected)}")
    extra = sorted(set(given) - set(expected))
    if extra:
        raise EplbInputError(f"weights: unexpected {[f'{path}{k}' for k in extra]} (not a parameter of this model)")
    placed = {}
    for key, want in expected.items():
        where = f"{path}{key}"
        if key not in given:
            raise EplbInputError(f"weights: missing {where}")
        if isinstance(want, Mapping) and hasattr(given[key], "place_fp8"):  # an Fp8Weight from a checkpoint
            placed[key] = _place_fp8(want, given[key], sharding, where)
            continue
        if isinstance(want, Mapping):
            placed[key] = _place_params(want, given[key], sharding, where + ".")
            continue
        value = given[key]
        shape = tuple(value.shape) if hasattr(value, "place") else tuple(np.shape(value))
        if shape != tuple(want.shape):
            raise EplbInputError(f"weights: {where} has shape {shape}, the model expects {tuple(want.shape)}")
        if hasattr(value, "place"):  # a source's own transfer (e.g. a checkpoint tensor finished on the device)
            placed[key] = value.place(sharding, want.dtype)
        else:
            placed[key] = jax.device_put(jnp.asarray(value, want.dtype), sharding)
    return placed


def _place_fp8(want: Mapping, value, sharding, where: str) -> dict:
    """A stored FP8 tensor as an ``Fp8Weight``'s ``{values, scale_inv}``, kept one byte per weight."""
    placed = value.place_fp8(sharding, where)
    for part, array in (("values", placed.values), ("scale_inv", placed.scale_inv)):
        if tuple(array.shape) != tuple(want[part].shape):
            raise EplbInputError(f"weights: {where}.{part} has shape {tuple(array.shape)}, the model expects "
                                 f"{tuple(want[part].shape)}")
    return {"values": placed.values, "scale_inv": placed.scale_inv}


# ----------------------------------------------------------------------------- seeded random weights

def _normal(key, shape, std, dtype):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def _attention(key, config: ModelConfig, layers: int) -> dict:
    c, k = config, jax.random.split(key, 4)
    dt, d, g = c.jnp_dtype, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {"wq": _normal(k[0], (layers, c.hidden_size, d), c.init_std, dt),
            "wk": _normal(k[1], (layers, c.hidden_size, g), c.init_std, dt),
            "wv": _normal(k[2], (layers, c.hidden_size, g), c.init_std, dt),
            "wo": _normal(k[3], (layers, d, c.hidden_size), c.init_std, dt)}


def _mlp(key, layers: int, hidden: int, ffn: int, std: float, dtype) -> dict:
    k = jax.random.split(key, 3)
    return {"gate": _normal(k[0], (layers, hidden, ffn), std, dtype),
            "up": _normal(k[1], (layers, hidden, ffn), std, dtype),
            "down": _normal(k[2], (layers, ffn, hidden), std, dtype)}


def _norms(config: ModelConfig, layers: int) -> dict:
    ones = {"weight": jnp.ones((layers, config.hidden_size), config.jnp_dtype)}
    return {"attention_norm": ones, "mlp_norm": ones}


def _attention_params(key, config: ModelConfig, layers: int) -> dict:
    params = _attention(key, config, layers)
    if config.qk_norm:
        ones = {"weight": jnp.ones((layers, config.head_dim), config.jnp_dtype)}
        params.update(q_norm=ones, k_norm=ones)
    d, g = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    zeros = [("bq", d), ("bk", g), ("bv", g)] if config.attention_bias else []  # zero biases and sinks
    zeros += [("bo", config.hidden_size)] if config.attention_out_bias else []
    zeros += [("sinks", config.num_heads)] if config.attention_sinks else []
    params.update({name: jnp.zeros((layers, n), config.jnp_dtype) for name, n in zeros})
    return params


def router_bias(config: ModelConfig) -> np.ndarray:
    """``[Lm, E]`` selection bias: standardized log-popularity times ``router_bias_scale``."""
    popularity = expert_popularity(config.num_moe_layers, config.num_experts, config.popularity_seed)
    log = np.log(popularity)
    standardized = (log - log.mean(1, keepdims=True)) / log.std(1, keepdims=True)
    return (config.router_bias_scale * standardized).astype(np.float32)


def seeded_params(config: ModelConfig, seed: int) -> dict:
    """Every parameter but the routed experts, drawn from ``seed`` (nested like the model's state)."""
    c, dt = config, config.jnp_dtype
    if c.attention != "gqa":
        raise EplbInputError(f"model config {c.name!r}: seeded random weights cover gqa attention; for {c.attention} "
                             f"models use a checkpoint (jax-eplb create-checkpoint --hf_config ...)")
    k = jax.random.split(jax.random.key(seed), 6)
    params = {"embed": _normal(k[5], (c.vocab_size, c.hidden_size), 1.0, dt),
              "final_norm": {"weight": jnp.ones((c.hidden_size,), dt)},
              "lm_head": _normal(jax.random.fold_in(k[5], 1), (c.hidden_size, c.vocab_size), c.init_std, dt)}
    if c.tie_word_embeddings:
        params["lm_head"] = params["embed"].T
    if c.num_dense_layers:
        ld = c.num_dense_layers
        params["dense_layers"] = {"layers": {**_norms(c, ld), "attention": _attention_params(k[0], c, ld),
                                             "mlp": _mlp(k[1], ld, c.hidden_size, c.dense_ffn_size, c.init_std, dt)}}
    lm = c.num_moe_layers
    router_std = c.router_logit_std / np.sqrt(c.hidden_size)  # normed inputs: logits ~ N(0, router_logit_std)
    mlp = {"router_kernel": _normal(k[3], (lm, c.hidden_size, c.num_experts), router_std, jnp.float32),
           "correction_bias": jnp.asarray(router_bias(c))}
    if c.router_logit_bias:
        mlp["router_bias"] = jnp.zeros((lm, c.num_experts), jnp.float32)
    if c.num_shared_experts:
        mlp["shared"] = _mlp(k[2], lm, c.hidden_size, c.moe.shared_width, c.init_std, dt)
    params["moe_layers"] = {"layers": {**_norms(c, lm), "attention": _attention_params(k[4], c, lm), "mlp": mlp}}
    return params


def expert_weights(config: ModelConfig, seed: int, slot_to_expert: jax.Array) -> ExpertWeights:
    """Weights of the experts named by ``slot_to_expert`` ``[Lm, X]`` -> ``[Lm, X, ...]`` (jittable)."""
    c, dt = config, config.jnp_dtype
    base = jax.random.fold_in(jax.random.key(seed), 1)

    def one(layer, expert):
        k = jax.random.split(jax.random.fold_in(jax.random.fold_in(base, layer), expert), 3)
        return ExpertWeights(*(_normal(key, shape, c.init_std, dt) for key, shape in zip(k, c.moe.expert_shapes)))

    layers = jnp.arange(slot_to_expert.shape[0])[:, None] * jnp.ones_like(slot_to_expert)
    weights = jax.vmap(jax.vmap(one))(layers, slot_to_expert)
    serving = (slot_to_expert != UNUSED_SLOT)[..., None, None]  # a slot serving nothing holds zeros
    return ExpertWeights(*(jnp.where(serving, w, jnp.zeros((), w.dtype)) for w in weights))


def logical_experts(config: ModelConfig, seed: int) -> ExpertWeights:
    """All seeded experts ``[Lm, E, ...]`` as host arrays."""
    identity = jnp.tile(jnp.arange(config.num_experts), (config.num_moe_layers, 1))
    experts = jax.jit(expert_weights, static_argnums=(0, 1))(config, seed, identity)
    return ExpertWeights(*(np.asarray(w) for w in experts))


@dataclasses.dataclass(frozen=True)
class SeededWeights:
    """Random weights from ``seed`` (the same for any mesh, ep size and placement)."""

    seed: int = 0

    def params(self, config: ModelConfig) -> dict:
        return seeded_params(config, self.seed)

    def slot_experts(self, config: ModelConfig, mesh, slot_to_expert) -> ExpertWeights:
        sharding = stacked_over_ranks(mesh)
        placed = jax.jit(expert_weights, static_argnums=(0, 1), out_shardings=sharding)
        return placed(config, self.seed, jax.device_put(jnp.asarray(slot_to_expert, jnp.int32), sharding))

    def expert_source(self, config: ModelConfig) -> ExpertSource:
        return HostExperts(logical_experts(config, self.seed))


def logical_weights(config: ModelConfig, weights: WeightSource) -> dict:
    """Every parameter with the routed experts in their logical layout ``[Lm, E, ...]`` (host arrays):
    what a checkpoint holds."""
    params = jax.tree.map(np.asarray, weights.params(config))
    source = weights.expert_source(config)
    experts = [source.rows(layer, np.arange(config.num_experts)) for layer in range(config.num_moe_layers)]
    stacked = ExpertWeights(*(np.stack(leaf) for leaf in zip(*experts)))
    params["moe_layers"]["layers"]["mlp"].update(w_gate=stacked.gate, w_up=stacked.up, w_down=stacked.down)
    return params


EXPERT_KEYS = ("w_gate", "w_up", "w_down")


def split_logical_experts(params: dict) -> tuple[dict, ExpertWeights]:
    """(params without the routed experts, logical experts ``[Lm, E, ...]``) of a checkpoint's tree."""
    mlp = dict(params["moe_layers"]["layers"]["mlp"])
    experts = ExpertWeights(*(mlp.pop(key) for key in EXPERT_KEYS))
    rest = {**params, "moe_layers": {"layers": {**params["moe_layers"]["layers"], "mlp": mlp}}}
    return rest, experts

