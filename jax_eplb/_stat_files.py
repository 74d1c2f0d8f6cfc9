"""Statistics files other than TensorRT-LLM dumps, and ``load_statistics`` for any format.

* SGLang expert-distribution JSON: ``{"logical_count": [L][E]}`` (or ``[I][L][E]``); layers whose
  counts are all zero (dense layers) are dropped, real layer indices kept. It carries no rank split.
* NumPy: ``.npy`` holding ``[I, L, E]`` or ``[L, E]``; ``.npz`` with ``counts`` (and optionally
  ``layer_ids``, ``iter_start``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from jax_eplb._errors import EplbInputError
from jax_eplb._stats import ExpertLoadStats
from jax_eplb._trtllm_dump import load_trtllm_dump


def _from_array(array: np.ndarray, source: Path, layer_ids=None, iter_start: int = 0,
                drop_zero_layers: bool = False, top_k: int | None = None) -> ExpertLoadStats:
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise EplbInputError(f"{source}: expected [layers, experts] or [iters, layers, experts], "
                             f"got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise EplbInputError(f"{source}: counts contain NaN or infinite values")
    if np.any(array < 0):
        raise EplbInputError(f"{source}: counts contain negative values")
    if layer_ids is None:
        layer_ids = np.arange(array.shape[1])
    layer_ids = np.asarray(layer_ids)
    if drop_zero_layers:
        keep = array.sum(axis=(0, 2)) > 0
        if not keep.any():
            raise EplbInputError(f"{source}: every layer's counts are zero")
        array, layer_ids = array[:, keep], layer_ids[keep]
    try:
        return ExpertLoadStats(array, tuple(layer_ids.tolist()), iter_start=iter_start,
                               num_experts_per_token=top_k)
    except EplbInputError as err:
        raise EplbInputError(f"{source}: {err}") from None


def load_sglang_json(path: str | os.PathLike, num_experts_per_token: int | None = None) -> ExpertLoadStats:
    """Reads SGLang's ``{"logical_count": ...}`` JSON; all-zero (dense) layers are dropped."""
    source = Path(path)
    try:
        payload = json.loads(source.read_text())
        array = np.asarray(payload["logical_count"], dtype=np.float64)
    except FileNotFoundError:
        raise EplbInputError(f"{source}: file does not exist") from None
    except (ValueError, KeyError, TypeError) as err:
        raise EplbInputError(
            f"{source}: expected JSON with a rectangular numeric 'logical_count' array "
            f"({type(err).__name__}: {err})") from None
    return _from_array(array, source, drop_zero_layers=True, top_k=num_experts_per_token)


def load_numpy(path: str | os.PathLike) -> ExpertLoadStats:
    """Reads ``.npy`` ``[I, L, E]``/``[L, E]`` or ``.npz`` with ``counts`` [+ ``layer_ids``]."""
    source = Path(path)
    try:
        loaded = np.load(source, allow_pickle=False)
    except FileNotFoundError:
        raise EplbInputError(f"{source}: file does not exist") from None
    except (ValueError, OSError) as err:
        raise EplbInputError(f"{source}: not a readable NumPy file ({err})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if "counts" not in loaded.files:
                raise EplbInputError(f"{source}: .npz needs a 'counts' array (found {loaded.files})")
            array = loaded["counts"]
            layer_ids = loaded["layer_ids"] if "layer_ids" in loaded.files else None
            iter_start = int(loaded["iter_start"]) if "iter_start" in loaded.files else 0
        return _from_array(np.asarray(array, np.float64), source, layer_ids, iter_start)
    return _from_array(np.asarray(loaded, np.float64), source)


def load_statistics(path: str | os.PathLike, ep_size: int | None = None,
                    num_experts_per_token: int | None = None) -> ExpertLoadStats:
    """Loads any supported format, chosen by what ``path`` is (directory, .json, .npy/.npz)."""
    source = Path(path)
    if source.is_dir():
        return load_trtllm_dump(source, ep_size=ep_size)
    if not source.exists():
        raise EplbInputError(f"{source}: does not exist")
    suffix = source.suffix.lower()
    if suffix == ".json":
        stats = load_sglang_json(source, num_experts_per_token)
    elif suffix in (".npy", ".npz"):
        stats = load_numpy(source)
    else:
        raise EplbInputError(
            f"{source}: unknown statistics format (expected a TensorRT-LLM dump directory, "
            "SGLang .json, .npy or .npz)")
    if ep_size is not None:
        stats = dataclasses.replace(stats, ep_size=int(ep_size))
    return stats
