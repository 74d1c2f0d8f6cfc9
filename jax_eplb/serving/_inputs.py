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


def model_source(model: str, model_path: str | None = None, seed: int = 0, *,
                 max_seq_len: int | None = None, weight_dtype: str = "auto") -> tuple[ModelConfig, WeightSource]:
    """``--model`` and ``--model_path`` -> (config, weight source).

    ``--model_path`` a Hugging Face checkpoint directory (``config.json`` + safetensors): the
    architecture comes from its config and ``--model`` is only a label (as in trtllm-bench); an
    orbax checkpoint written by ``create-checkpoint``: ``--model`` names its config; none: seeded
    random weights for the config ``--model`` (YAML or shipped name). ``weight_dtype``
    (``--weight_dtype``): how a Hugging Face checkpoint's weights are held (``auto``: as stored).
    """
    hugging_face = _is_hugging_face(model_path)
    if weight_dtype != "auto" and not hugging_face:
        raise EplbInputError(f"--weight_dtype {weight_dtype} goes with a Hugging Face --model_path (other models hold "
                             f"their weights in the model config's dtype)")
    if model_path is None:
        return load_model_config(model), SeededWeights(seed)
    path = Path(model_path)
    if not path.is_dir():
        raise EplbInputError(f"--model_path {model_path} does not exist or is not a directory")
    if hugging_face:
        from jax_eplb.hf import HuggingFaceCheckpoint

        checkpoint = HuggingFaceCheckpoint(path, name=model, max_seq_len=max_seq_len, weight_dtype=weight_dtype)
        checkpoint.check()
        return checkpoint.config, checkpoint
    config = load_model_config(model)
    checkpoint = OrbaxCheckpoint(model_path)
    checkpoint.check(config)
    return config, checkpoint


def _tokenizer(model_path: str | None):
    path = Path(model_path) / "tokenizer.json" if model_path else None
    if path is None or not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - the library raises plain Exceptions for bad files
        raise EplbInputError(f"{path}: not a readable tokenizer ({err})") from None


def _is_hugging_face(model_path: str | None) -> bool:
    return model_path is not None and (Path(model_path) / "config.json").is_file()


def _cache_length(config: ModelConfig, requests, max_seq_len: int | None, fit: bool) -> ModelConfig:
    """The KV-cache length: ``--max_seq_len``; else, with ``fit`` (Hugging Face models, whose
    ``max_position_embeddings`` can be 163840), the longest request (prompt + output) rounded up to 16;
    else the config's."""
    longest = max(len(r.input_ids) + r.output_tokens for r in requests)
    length = max_seq_len or (min(-(-longest // 16) * 16, config.max_position_embeddings) if fit
                             else config.max_seq_len)
    if config.max_position_embeddings is not None and length > config.max_position_embeddings:
        raise EplbInputError(f"--max_seq_len {length} exceeds the model's max_position_embeddings "
                             f"({config.max_position_embeddings})")
    if longest > length:
        raise EplbInputError(f"a request needs {longest} positions (prompt + output_tokens) but the cache holds "
                             f"{length} (--max_seq_len)")
    return dataclasses.replace(config, max_seq_len=length)


def read_bench_inputs(model: str, dataset: str, ep: int, *, model_path: str | None = None, seed: int = 0,
                      extra_llm_api_options: str | None = None, max_seq_len: int | None = None,
                      weight_dtype: str = "auto", environ: Mapping[str, str] = os.environ) -> BenchInputs:
    if max_seq_len is not None and max_seq_len < 1:
        raise EplbInputError(f"--max_seq_len must be >= 1, got {max_seq_len}")
    config, weights = model_source(model, model_path, seed, weight_dtype=weight_dtype)
    hugging_face = _is_hugging_face(model_path)
    limit = max_seq_len or (config.max_position_embeddings if hugging_face else config.max_seq_len)
    requests = load_dataset(dataset, config.vocab_size, limit, _tokenizer(model_path))
    config = _cache_length(config, requests, max_seq_len, fit=hugging_face)
    if hugging_face:
        weights = weights.with_config(config)
    options, recorder = _balancer_and_recorder(config, ep, extra_llm_api_options, environ)
    return BenchInputs(config, weights, requests, options, recorder)


def _balancer_and_recorder(config: ModelConfig, ep: int, extra_llm_api_options: str | None,
                           environ: Mapping[str, str]) -> tuple[ExtraOptions, StatisticsRecorder | None]:
    """``--extra_llm_api_options`` (its plan checked against the model's experts and ``ep``) and the
    ``EXPERT_STATISTIC_*`` recorder, if asked for."""
    options = load_extra_options(extra_llm_api_options)
    plan = options.load_balancer
    num_slots = plan.resolved_num_slots(config.num_experts) if plan is not None else config.num_experts
    try:
        check_slot_geometry(config.num_experts, num_slots, ep)
    except EplbInputError as err:
        raise EplbInputError(f"{plan.source}: {err}" if plan is not None else str(err)) from None
    recorder = StatisticsRecorder.from_environment(config.moe_layer_ids, config.top_k, environ)
    return options, recorder


def check_memory_fits(config: ModelConfig, options: ExtraOptions, mesh, max_batch_size: int, what: str) -> None:
    """Before building: the model at this geometry (``jax-eplb memory``'s figures) must fit the mesh's
    devices, else one line; devices that report no memory size (CPU) are not checked."""
    from jax_eplb.model import check_fits, device_limit, device_memory

    device = mesh.devices.flat[0]
    if device_limit(device) is None:
        return
    plan = options.load_balancer
    num_slots = plan.resolved_num_slots(config.num_experts) if plan is not None else config.num_experts
    memory = device_memory(config, ep_size=mesh.devices.size, num_slots=num_slots, max_batch_size=max_batch_size)
    check_fits(memory, device, what)


@dataclasses.dataclass(frozen=True)
class ServeInputs:
    config: ModelConfig  # max_seq_len: the KV-cache length per row
    weights: WeightSource
    options: ExtraOptions
    recorder: StatisticsRecorder | None
    eos_ids: frozenset  # the checkpoint's end-of-sequence ids (config.json / generation_config.json)


SERVE_DEFAULT_SEQ_LEN = 2048  # Hugging Face models without --max_seq_len: the cache length (not 163840)


def read_serve_inputs(model: str, ep: int, *, model_path: str | None = None, seed: int = 0,
                      extra_llm_api_options: str | None = None, max_seq_len: int | None = None,
                      weight_dtype: str = "auto", environ: Mapping[str, str] = os.environ) -> ServeInputs:
    """``jax-eplb serve``'s model, weights, options and recorder, checked before any device work.
    The KV-cache length: ``--max_seq_len``, else the config's (Hugging Face models: at most
    ``SERVE_DEFAULT_SEQ_LEN``)."""
    if max_seq_len is not None and max_seq_len < 2:
        raise EplbInputError(f"--max_seq_len must be >= 2 (a prompt token and a generated one), got {max_seq_len}")
    config, weights = model_source(model, model_path, seed, weight_dtype=weight_dtype)
    hugging_face = _is_hugging_face(model_path)
    limit = config.max_position_embeddings
    length = max_seq_len or (min(SERVE_DEFAULT_SEQ_LEN, limit or SERVE_DEFAULT_SEQ_LEN) if hugging_face
                             else config.max_seq_len)
    if limit is not None and length > limit:
        raise EplbInputError(f"--max_seq_len {length} exceeds the model's max_position_embeddings ({limit})")
    config = dataclasses.replace(config, max_seq_len=length)
    if hugging_face:
        weights = weights.with_config(config)
    options, recorder = _balancer_and_recorder(config, ep, extra_llm_api_options, environ)
    return ServeInputs(config, weights, options, recorder, _eos_ids(model_path) if hugging_face else frozenset())


def _eos_ids(model_path: str) -> frozenset:
    """``eos_token_id`` (an id or a list) of ``generation_config.json``, else of ``config.json``."""
    import json

    for name in ("generation_config.json", "config.json"):
        path = Path(model_path) / name
        if path.is_file():
            try:
                value = json.loads(path.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise EplbInputError(f"{path}: not a JSON object") from None
            if value is not None:
                values = value if isinstance(value, list) else [value]
                return frozenset(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return frozenset()
