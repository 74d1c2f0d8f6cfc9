"""TensorRT-LLM's statistics dump (``EXPERT_STATISTIC_PATH``), read and written whole.

A directory: ``meta_info.json`` (``num_experts``, ``num_experts_per_token``; ours also record
``ep_size``, ``iter_start``, ``iter_stop``, ``layers`` - the keys TensorRT-LLM's scripts derive
and overwrite - and ``partial`` for an interrupted run) and ``rank{R}.safetensors`` with int64
``[E]`` tensors under keys ``"{iter}_{layer}"``. Loading checks the dump as a whole (rank files
``rank0..rank{R-1}``, every one holding the same contiguous iterations and layers, agreeing with
the recorded metadata) and sums the rank files. A dump is written into a sibling directory and
renamed: it appears whole or not at all, and replaces an earlier dump at its path whole (never a
directory holding anything else).
Axis legend: R ranks, I iterations, L layers, E experts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from jax_eplb._atomic import atomic_directory
from jax_eplb._errors import EplbInputError
from jax_eplb._stats import ExpertLoadStats

META_INFO_FILE = "meta_info.json"
_RANK_FILE_RE = re.compile(r"^rank(\d+)\.safetensors$")
_KEY_RE = re.compile(r"^(\d+)_(\d+)$")


def _safetensors_load(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise EplbInputError(f"{path}: not a readable safetensors file ({err})") from None


def load_trtllm_dump(path: str | os.PathLike, ep_size: int | None = None) -> ExpertLoadStats:
    """Reads a TensorRT-LLM ``EXPERT_STATISTIC_PATH`` directory (rank files summed).

    ``ep_size``: when given, must equal the number of ranks that recorded the dump."""
    directory = Path(path)
    if not directory.is_dir():
        raise EplbInputError(f"{directory}: statistics directory does not exist")
    meta = _read_meta(directory / META_INFO_FILE)
    num_experts = meta["num_experts"]
    ranks = _rank_files(directory)
    per_rank = [_read_rank(path, num_experts) for path in ranks]
    keys = set(per_rank[0])
    for path, counts in zip(ranks[1:], per_rank[1:]):
        if set(counts) != keys:
            odd = sorted(set(counts) ^ keys)[:3]
            raise EplbInputError(f"{path}: holds other iterations/layers than {ranks[0].name} (e.g. "
                                 f"{['%d_%d' % k for k in odd]}); the rank files are not of one run")
    iters = sorted({i for i, _ in keys})
    layers = sorted({layer for _, layer in keys})
    if iters[-1] + 1 - iters[0] != len(iters):
        missing = sorted(set(range(iters[0], iters[-1] + 1)) - set(iters))
        raise EplbInputError(f"{directory}: iterations are not contiguous (missing {missing[:5]})")
    absent = [(it, layer) for it in iters for layer in layers if (it, layer) not in keys]
    if absent:
        raise EplbInputError(f"{directory}: iteration {absent[0][0]} has no counts for layer {absent[0][1]}")
    _check_meta(directory, meta, len(ranks), iters, layers)
    if ep_size is not None and int(ep_size) != len(ranks):
        raise EplbInputError(f"{directory}: recorded by {len(ranks)} ranks, but --ep_size is {ep_size} (a slot's "
                             f"rank is fixed by the recording run)")
    counts = np.stack([np.stack([sum(r[(it, layer)] for r in per_rank) for layer in layers]) for it in iters])
    return ExpertLoadStats(counts=counts, layer_ids=tuple(layers), iter_start=iters[0],
                           num_experts_per_token=meta["num_experts_per_token"], ep_size=len(ranks),
                           partial=bool(meta.get("partial", False)))


def _read_meta(meta_path: Path) -> dict:
    if not meta_path.is_file():
        raise EplbInputError(f"{meta_path}: missing (not a TensorRT-LLM statistics directory?)")
    try:
        meta = json.loads(meta_path.read_text())
        meta["num_experts"] = int(meta["num_experts"])
        meta["num_experts_per_token"] = int(meta["num_experts_per_token"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise EplbInputError(
            f"{meta_path}: expected JSON with integer 'num_experts' and "
            f"'num_experts_per_token' ({type(err).__name__}: {err})") from None
    return meta


def _rank_files(directory: Path) -> list[Path]:
    found = {int(m.group(1)): p for p in directory.iterdir() if (m := _RANK_FILE_RE.match(p.name))}
    if not found:
        raise EplbInputError(f"{directory}: no rank*.safetensors files")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise EplbInputError(f"{directory}: rank file(s) {['rank%d.safetensors' % r for r in missing[:5]]} missing "
                             f"(found ranks {sorted(found)}): the dump is incomplete")
    return [found[r] for r in range(len(found))]


def _read_rank(rank_file: Path, num_experts: int) -> dict[tuple[int, int], np.ndarray]:
    out = {}
    for key, value in _safetensors_load(rank_file).items():
        match = _KEY_RE.match(key)
        if match is None:
            raise EplbInputError(f"{rank_file}: key {key!r} is not '{{iter}}_{{layer}}'")
        value = np.asarray(value)
        if value.shape != (num_experts,):
            raise EplbInputError(f"{rank_file}: key {key!r} has shape {value.shape}, expected ({num_experts},) "
                                 f"from {META_INFO_FILE}")
        out[(int(match.group(1)), int(match.group(2)))] = value.astype(np.float64)
    if not out:
        raise EplbInputError(f"{rank_file}: holds no counts")
    return out


def _check_meta(directory: Path, meta: dict, num_ranks: int, iters: list[int], layers: list[int]) -> None:
    """Our dumps' extra metadata must describe what the rank files hold."""
    found = {"ep_size": num_ranks, "iter_start": iters[0], "iter_stop": iters[-1] + 1, "layers": layers}
    for key, value in found.items():
        if key in meta and meta[key] != value:
            raise EplbInputError(f"{directory / META_INFO_FILE}: records {key}={meta[key]!r} but the rank files "
                                 f"hold {value!r}: the dump is incomplete or mixed")


def holds_only_a_dump(directory: Path) -> bool:
    """``directory`` holds nothing but a statistics dump's files (``meta_info.json``, ``rank{R}.safetensors``)."""
    return all(p.is_file() and (p.name == META_INFO_FILE or _RANK_FILE_RE.match(p.name)) for p in directory.iterdir())


def check_dump_target(directory: Path, what: str | None = None) -> None:
    """Input error unless a dump can be written at ``directory``: it is new, empty, or an earlier dump
    (which the new one replaces whole)."""
    what = what or str(directory)
    if directory.exists() and not directory.is_dir():
        raise EplbInputError(f"{what} exists and is not a directory")
    if directory.is_dir() and not holds_only_a_dump(directory):
        raise EplbInputError(f"{what} holds files that are not a statistics dump; remove them or choose another "
                             f"path (a dump replaces only an earlier dump)")


def save_trtllm_dump(path: str | os.PathLike, rank_counts: np.ndarray, layer_ids, iter_start: int,
                     num_experts_per_token: int, partial: bool = False) -> None:
    """Writes a TensorRT-LLM statistics directory, whole or not at all (a sibling directory renamed).

    Args:
      rank_counts: ``[R, I, L, E]`` integer counts of each rank's local tokens.
      layer_ids: ``[L]`` decoder-layer indices.
      partial: the run was interrupted (recorded in ``meta_info.json``).
    ``path`` must not exist, be empty, or hold only an earlier dump (replaced whole).
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
    check_dump_target(directory)
    from safetensors.numpy import save_file

    num_ranks, num_iters = rank_counts.shape[:2]
    meta = {"num_experts": int(rank_counts.shape[3]), "num_experts_per_token": int(num_experts_per_token),
            "ep_size": num_ranks, "iter_start": int(iter_start), "iter_stop": int(iter_start) + num_iters,
            "layers": layer_ids}
    if partial:
        meta["partial"] = True
    with atomic_directory(directory, replace_existing=True) as staging:
        (staging / META_INFO_FILE).write_text(json.dumps(meta))
        for rank, counts in enumerate(rank_counts.astype(np.int64)):
            tensors = {f"{iter_start + i}_{layer}": np.ascontiguousarray(counts[i, j])
                       for i in range(counts.shape[0]) for j, layer in enumerate(layer_ids)}
            save_file(tensors, str(staging / f"rank{rank}.safetensors"))
