"""Routing statistics: one in-memory type and the file formats it is read from / written to.

Axis legend: I iterations, L MoE layers, E experts (or slots when recorded under a plan),
R ranks.

Formats:
  * TensorRT-LLM dump directory: ``meta_info.json`` (``num_experts``, ``num_experts_per_token``)
    and ``rank{R}.safetensors`` with int64 ``[E]`` tensors under keys ``"{iter}_{layer}"``.
    Loading sums the rank files; iterations must be contiguous and every layer present in
    every iteration; ep_size is the number of rank files unless given.
  * SGLang expert-distribution JSON: ``{"logical_count": [L][E]}`` (or ``[I][L][E]``); layers
    whose counts are all zero (dense layers) are dropped, real layer indices kept.
  * NumPy: ``.npy`` holding ``[I, L, E]`` or ``[L, E]``; ``.npz`` with ``counts`` (and optionally
    ``layer_ids``, ``iter_start``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np

from jax_eplb._atomic import atomic_path, atomic_write_text
from jax_eplb._errors import EplbInputError

META_INFO_FILE = "meta_info.json"
_RANK_FILE_RE = re.compile(r"^rank(\d+)\.safetensors$")
_KEY_RE = re.compile(r"^(\d+)_(\d+)$")


@dataclasses.dataclass(frozen=True)
class ExpertLoadStats:
    """Per-iteration, per-layer routing counts.

    Attributes:
      counts: ``[I, L, E]`` float64, routed (token, k) entries per expert (or per slot).
      layer_ids: ``[L]`` decoder-layer index of each row (DeepSeek-V3: 3..60).
      iter_start: id of the first iteration; iterations are contiguous.
      num_experts_per_token: top-k of the model, when known.
      ep_size: number of ranks that recorded the counts, when known.
    """

    counts: np.ndarray
    layer_ids: tuple[int, ...]
    iter_start: int = 0
    num_experts_per_token: int | None = None
    ep_size: int | None = None

    def __post_init__(self):
        counts = np.asarray(self.counts, dtype=np.float64)
        if counts.ndim != 3:
            raise EplbInputError(f"counts must be [iters, layers, experts], got shape {counts.shape}")
        if counts.shape[0] == 0 or counts.shape[1] == 0 or counts.shape[2] == 0:
            raise EplbInputError(f"counts is empty (shape {counts.shape})")
        if not np.all(np.isfinite(counts)):
            raise EplbInputError("counts contain NaN or infinite values")
        if np.any(counts < 0):
            raise EplbInputError("counts contain negative values")
        layer_ids = tuple(int(i) for i in self.layer_ids)
        if len(layer_ids) != counts.shape[1]:
            raise EplbInputError(
                f"{len(layer_ids)} layer ids for {counts.shape[1]} layers of counts")
        if len(set(layer_ids)) != len(layer_ids):
            raise EplbInputError(f"duplicate layer ids: {layer_ids}")
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "layer_ids", layer_ids)

    @property
    def num_iters(self) -> int:
        return self.counts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[2]

    @property
    def iter_stop(self) -> int:
        return self.iter_start + self.num_iters

    def window(self, iter_start: int | None = None, iter_stop: int | None = None) -> "ExpertLoadStats":
        """The iterations ``[iter_start, iter_stop)`` (defaults: all recorded)."""
        start = self.iter_start if iter_start is None else int(iter_start)
        stop = self.iter_stop if iter_stop is None else int(iter_stop)
        if not (self.iter_start <= start < stop <= self.iter_stop):
            raise EplbInputError(
                f"iteration window [{start}, {stop}) is not inside the recorded "
                f"[{self.iter_start}, {self.iter_stop})")
        lo, hi = start - self.iter_start, stop - self.iter_start
        return dataclasses.replace(self, counts=self.counts[lo:hi], iter_start=start)

    def total(self) -> np.ndarray:
        """``[L, E]`` counts summed over the iterations (the planners' load input)."""
        return self.counts.sum(axis=0)


# ----------------------------------------------------------------------------- TensorRT-LLM dump


def _safetensors_load(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise EplbInputError(f"{path}: not a readable safetensors file ({err})") from None


def load_trtllm_dump(path: str | os.PathLike, ep_size: int | None = None) -> ExpertLoadStats:
    """Reads a TensorRT-LLM ``EXPERT_STATISTIC_PATH`` directory (rank files summed)."""
    directory = Path(path)
    if not directory.is_dir():
        raise EplbInputError(f"{directory}: statistics directory does not exist")
    meta_path = directory / META_INFO_FILE
    if not meta_path.is_file():
        raise EplbInputError(f"{meta_path}: missing (not a TensorRT-LLM statistics directory?)")
    try:
        meta = json.loads(meta_path.read_text())
        num_experts = int(meta["num_experts"])
        top_k = int(meta["num_experts_per_token"])
    except (ValueError, KeyError, TypeError) as err:
        raise EplbInputError(
            f"{meta_path}: expected JSON with integer 'num_experts' and "
            f"'num_experts_per_token' ({type(err).__name__}: {err})") from None

    rank_files = sorted(p for p in directory.iterdir() if _RANK_FILE_RE.match(p.name))
    if not rank_files:
        raise EplbInputError(f"{directory}: no rank*.safetensors files")

    summed: dict[tuple[int, int], np.ndarray] = {}
    for rank_file in rank_files:
        for key, value in _safetensors_load(rank_file).items():
            match = _KEY_RE.match(key)
            if match is None:
                raise EplbInputError(f"{rank_file}: key {key!r} is not '{{iter}}_{{layer}}'")
            value = np.asarray(value)
            if value.shape != (num_experts,):
                raise EplbInputError(
                    f"{rank_file}: key {key!r} has shape {value.shape}, expected "
                    f"({num_experts},) from {META_INFO_FILE}")
            ident = (int(match.group(1)), int(match.group(2)))
            summed[ident] = summed.get(ident, 0) + value.astype(np.float64)
    if not summed:
        raise EplbInputError(f"{directory}: rank files hold no counts")

    iters = sorted({i for i, _ in summed})
    layers = sorted({layer for _, layer in summed})
    if iters[-1] + 1 - iters[0] != len(iters):
        missing = sorted(set(range(iters[0], iters[-1] + 1)) - set(iters))
        raise EplbInputError(f"{directory}: iterations are not contiguous (missing {missing[:5]})")
    for it in iters:
        for layer in layers:
            if (it, layer) not in summed:
                raise EplbInputError(f"{directory}: iteration {it} has no counts for layer {layer}")
    counts = np.stack([np.stack([summed[(it, layer)] for layer in layers]) for it in iters])
    return ExpertLoadStats(
        counts=counts,
        layer_ids=tuple(layers),
        iter_start=iters[0],
        num_experts_per_token=top_k,
        ep_size=len(rank_files) if ep_size is None else int(ep_size),
    )


def save_trtllm_dump(
    path: str | os.PathLike,
    rank_counts: np.ndarray,
    layer_ids,
    iter_start: int,
    num_experts_per_token: int,
) -> None:
    """Writes a TensorRT-LLM statistics directory.

    Args:
      rank_counts: ``[R, I, L, E]`` integer counts of each rank's local tokens.
      layer_ids: ``[L]`` decoder-layer indices.
    Each file is written atomically; ``meta_info.json`` is written once (kept if present).
    """
    rank_counts = np.asarray(rank_counts)
    if rank_counts.ndim != 4:
        raise EplbInputError(f"rank_counts must be [ranks, iters, layers, experts], got {rank_counts.shape}")
    if not np.array_equal(rank_counts, np.round(rank_counts)) or np.any(rank_counts < 0):
        raise EplbInputError("rank_counts must be non-negative integers")
    layer_ids = [int(i) for i in layer_ids]
    if len(layer_ids) != rank_counts.shape[2]:
        raise EplbInputError(f"{len(layer_ids)} layer ids for {rank_counts.shape[2]} layers")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    meta_path = directory / META_INFO_FILE
    if not meta_path.exists():
        meta = {"num_experts": int(rank_counts.shape[3]), "num_experts_per_token": int(num_experts_per_token)}
        atomic_write_text(meta_path, json.dumps(meta))
    for rank, counts in enumerate(rank_counts.astype(np.int64)):
        tensors = {
            f"{iter_start + i}_{layer}": np.ascontiguousarray(counts[i, j])
            for i in range(counts.shape[0])
            for j, layer in enumerate(layer_ids)
        }
        with atomic_path(directory / f"rank{rank}.safetensors") as tmp:
            save_file(tensors, tmp)


# ----------------------------------------------------------------------------- SGLang / numpy


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
