"""The command line's edge: files and environment variables -> the objects ``run_throughput`` takes.

Everything is read and checked here, before any device work: the model config, where the
weights come from, the dataset, ``--extra_llm_api_options`` and TensorRT-LLM's
``EXPERT_STATISTIC_*`` recording variables.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

from jax_eplb._assignment import check_slot_geometry
from jax_eplb._errors import EplbInputError
from jax_eplb.model import ModelConfig, OrbaxCheckpoint, SeededWeights, WeightSource, load_model_config
from jax_eplb.serving._dataset import Request, load_dataset
from jax_eplb.serving._options import ExtraOptions, load_extra_options
from jax_eplb.serving._recorder import StatisticsRecorder


@dataclasses.dataclass(frozen=True)
class BenchInputs:
    config: ModelConfig
    weights: WeightSource
    requests: list[Request]
    options: ExtraOptions
    recorder: StatisticsRecorder | None


def model_source(model: str, model_path: str | None = None, seed: int = 0) -> tuple[ModelConfig, WeightSource]:
    """``--model`` (config YAML or shipped name) and ``--model_path`` (orbax checkpoint; None: seeded weights)."""
    config = load_model_config(model)
    if model_path is None:
        return config, SeededWeights(seed)
    if not Path(model_path).is_dir():
        raise EplbInputError(f"--model_path {model_path} does not exist")
    checkpoint = OrbaxCheckpoint(model_path)
    checkpoint.check(config)
    return config, checkpoint


def read_bench_inputs(model: str, dataset: str, ep: int, *, model_path: str | None = None, seed: int = 0,
                      extra_llm_api_options: str | None = None,
                      environ: Mapping[str, str] = os.environ) -> BenchInputs:
    config, weights = model_source(model, model_path, seed)
    requests = load_dataset(dataset, config.vocab_size, config.max_seq_len)
    options = load_extra_options(extra_llm_api_options)
    plan = options.load_balancer
    num_slots = plan.resolved_num_slots(config.num_experts) if plan is not None else config.num_experts
    try:
        check_slot_geometry(config.num_experts, num_slots, ep)
    except EplbInputError as err:
        raise EplbInputError(f"{plan.source}: {err}" if plan is not None else str(err)) from None
    recorder = StatisticsRecorder.from_environment(config.moe_layer_ids, config.top_k, environ)
    return BenchInputs(config, weights, requests, options, recorder)
