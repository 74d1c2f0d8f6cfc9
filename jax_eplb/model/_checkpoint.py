"""Orbax checkpoints of *logical* weights; restored onto any mesh, ep size and placement.

Layout of a checkpoint directory::

    model_config.yaml   # the ModelConfig it was made for (checked on restore)
    weights/            # orbax StandardCheckpointer: ModelWeights with experts [Lm, E, ...]

On restore, everything but the experts is replicated on the mesh; the experts are restored
to host memory and each device's shard is laid from the host copy by the plan
(``moe.slot_weights_from_logical``), so no accelerator ever holds all experts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jax_eplb._errors import EplbInputError
from jax_eplb.model._config import ModelConfig
from jax_eplb.model._weights import ModelWeights, init_weights
from jax_eplb.moe import slot_weights_from_logical

CONFIG_FILE = "model_config.yaml"
WEIGHTS_DIR = "weights"


def save_checkpoint(path, config: ModelConfig, weights: ModelWeights) -> Path:
    """Writes logical ``weights`` (experts ``[Lm, E, ...]``) to a new directory ``path``."""
    path = Path(path).absolute()
    if path.exists():
        raise EplbInputError(f"checkpoint directory {path} already exists; choose a new path")
    experts = weights.moe.experts
    if experts.gate.shape[1] != config.num_experts:
        raise ValueError(f"save logical experts [Lm, {config.num_experts}, ...], got {experts.gate.shape}")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / WEIGHTS_DIR, weights)
    checkpointer.wait_until_finished()
    (path / CONFIG_FILE).write_text(yaml.safe_dump({"model": dataclasses.asdict(config)}, sort_keys=False))
    return path


def create_random_checkpoint(path, config: ModelConfig, seed: int = 0) -> Path:
    """A seeded random checkpoint for ``config`` (the same weights ``init_weights`` places)."""
    return save_checkpoint(path, config, init_weights(config, seed, mesh=None))


def _abstract(config: ModelConfig, target_sharding) -> ModelWeights:
    shapes = jax.eval_shape(lambda: init_weights(config, 0, mesh=None))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=target_sharding), shapes)


def restore_checkpoint(path, config: ModelConfig, mesh, slot_to_expert) -> ModelWeights:
    """Weights from ``path`` with experts laid into ``slot_to_expert`` ``[Lm, S]`` on ``mesh``."""
    path = Path(path).absolute()
    if not (path / WEIGHTS_DIR).is_dir() or not (path / CONFIG_FILE).is_file():
        raise EplbInputError(f"{path} is not a jax_eplb checkpoint (expected {CONFIG_FILE} and {WEIGHTS_DIR}/)")
    saved = ModelConfig.from_yaml(path / CONFIG_FILE)
    shape_keys = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("name",)]
    differ = [k for k in shape_keys if getattr(saved, k) != getattr(config, k)]
    if differ:
        raise EplbInputError(f"checkpoint {path} was made for a different model: {differ} differ")
    host = SingleDeviceSharding(jax.devices("cpu")[0])
    target = _abstract(config, NamedSharding(mesh, P()))
    target = target._replace(moe=target.moe._replace(
        experts=jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=host), target.moe.experts)))
    restored = ocp.StandardCheckpointer().restore(path / WEIGHTS_DIR, target)
    logical = jax.tree.map(np.asarray, restored.moe.experts)
    experts = slot_weights_from_logical(logical, slot_to_expert, mesh)
    return restored._replace(moe=restored.moe._replace(experts=experts))


def restore_logical_experts(path, config: ModelConfig):
    """The checkpoint's logical experts ``[Lm, E, ...]`` as host NumPy arrays (for re-placing)."""
    path = Path(path).absolute()
    host = SingleDeviceSharding(jax.devices("cpu")[0])
    target = _abstract(config, host)
    restored = ocp.StandardCheckpointer().restore(path / WEIGHTS_DIR, target)
    return jax.tree.map(np.asarray, restored.moe.experts)
