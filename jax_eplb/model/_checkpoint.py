"""Orbax checkpoints of *logical* weights, restored onto any mesh, ep size and placement.

Layout of a checkpoint directory::

    model_config.yaml   # the ModelConfig it was made for (checked on restore)
    weights/            # orbax StandardCheckpointer: the model's parameters nested as its state,
                        # routed experts in their logical layout [Lm, E, ...], no assignment tables

On restore, everything but the experts is replicated on the mesh; the experts are restored to
host memory and each device's shard is laid from the host copy by the plan, so no accelerator
ever holds all experts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.sharding import SingleDeviceSharding

from jax_eplb._atomic import atomic_directory
from jax_eplb._random_checkpoint_marker import check_random_checkpoint_target, mark_random_checkpoint
from jax_eplb._errors import EplbInputError
from jax_eplb.model._config import ModelConfig
from jax_eplb.model._weights import SeededWeights, logical_weights, split_logical_experts
from jax_eplb.moe import ExpertSource, ExpertWeights, HostExperts, slot_weights_from_logical

CONFIG_FILE = "model_config.yaml"
WEIGHTS_DIR = "weights"


def save_checkpoint(path, config: ModelConfig, params: dict) -> Path:
    """Writes ``params`` (``logical_weights``: experts ``[Lm, E, ...]``) to a new directory ``path``."""
    path = Path(path).absolute()
    if path.exists():
        raise EplbInputError(f"checkpoint directory {path} already exists; choose a new path")
    return _write(path, config, params, replace=False)


def create_random_checkpoint(path, config: ModelConfig, seed: int = 0) -> Path:
    """A seeded random checkpoint for ``config`` (the same weights ``SeededWeights(seed)`` places); replaces
    an earlier random checkpoint at ``path`` whole, refuses any other existing directory."""
    path = Path(path).absolute()
    replace = check_random_checkpoint_target(path, "checkpoint directory")  # before the weights are made
    return _write(path, config, logical_weights(config, SeededWeights(seed)), replace=replace,
                  random_recipe={"model": config.name, "seed": seed})


def _write(path: Path, config: ModelConfig, params: dict, *, replace: bool, random_recipe: dict | None = None) -> Path:
    """The checkpoint directory, whole or not at all (``random_recipe``: marked as a random checkpoint)."""
    _, experts = split_logical_experts(params)
    if experts.gate.shape[1] != config.num_experts:
        raise ValueError(f"save logical experts [Lm, {config.num_experts}, ...], got {experts.gate.shape}")
    with atomic_directory(path, replace_existing=replace) as staging:
        if random_recipe is not None:
            mark_random_checkpoint(staging, **random_recipe)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / WEIGHTS_DIR, params)
        checkpointer.wait_until_finished()
        (staging / CONFIG_FILE).write_text(yaml.safe_dump({"model": dataclasses.asdict(config)}, sort_keys=False))
    return path


class OrbaxCheckpoint:
    """A ``WeightSource`` over a checkpoint written by ``save_checkpoint`` (restored once, on first use)."""

    def __init__(self, path):
        self.path = Path(path).absolute()
        if not (self.path / WEIGHTS_DIR).is_dir() or not (self.path / CONFIG_FILE).is_file():
            raise EplbInputError(f"{self.path} is not a jax_eplb checkpoint "
                                 f"(expected {CONFIG_FILE} and {WEIGHTS_DIR}/)")
        self._cache: dict[ModelConfig, tuple[dict, ExpertWeights]] = {}

    def check(self, config: ModelConfig) -> None:
        """Input error unless the checkpoint was made for a model of ``config``'s shapes."""
        saved = ModelConfig.from_yaml(self.path / CONFIG_FILE)
        differ = [f.name for f in dataclasses.fields(ModelConfig)
                  if f.name not in ("name", "max_seq_len") and getattr(saved, f.name) != getattr(config, f.name)]
        if differ:
            raise EplbInputError(f"checkpoint {self.path} was made for a different model: {differ} differ")

    def _restored(self, config: ModelConfig) -> tuple[dict, ExpertWeights]:
        if config in self._cache:
            return self._cache[config]
        self.check(config)
        host = SingleDeviceSharding(jax.devices("cpu")[0])
        shapes = jax.eval_shape(lambda: logical_weights_shapes(config))
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=host), shapes)
        restored = ocp.StandardCheckpointer().restore(self.path / WEIGHTS_DIR, target)
        self._cache = {config: split_logical_experts(jax.tree.map(np.asarray, restored))}
        return self._cache[config]

    def params(self, config: ModelConfig) -> dict:
        return self._restored(config)[0]

    def slot_experts(self, config: ModelConfig, mesh, slot_to_expert) -> ExpertWeights:
        return slot_weights_from_logical(self.expert_source(config), slot_to_expert, mesh)

    def expert_source(self, config: ModelConfig) -> ExpertSource:
        return HostExperts(self._restored(config)[1])


def logical_weights_shapes(config: ModelConfig) -> dict:
    """The tree ``save_checkpoint`` writes for ``config`` (traced: call under ``jax.eval_shape``)."""
    from jax_eplb.model._weights import expert_weights, seeded_params

    params = seeded_params(config, 0)
    identity = jax.numpy.tile(jax.numpy.arange(config.num_experts), (config.num_moe_layers, 1))
    experts = expert_weights(config, 0, identity)
    params["moe_layers"]["layers"]["mlp"].update(w_gate=experts.gate, w_up=experts.up, w_down=experts.down)
    return params
