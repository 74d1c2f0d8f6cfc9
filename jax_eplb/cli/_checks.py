"""Checks of command-line values, run before any work: sizes, output paths."""

from __future__ import annotations

import os
from pathlib import Path

from jax_eplb._errors import EplbInputError


def at_least(value, minimum: int, flag: str):
    """``value`` (None passes) must be >= ``minimum``."""
    if value is not None and value < minimum:
        raise EplbInputError(f"{flag} must be >= {minimum}, got {value}")
    return value


def output_file(path, flag: str) -> None:
    """``path`` can be written: not a directory, its folder exists (or can be made) and is writable.

    An existing regular file passes: every writer replaces its output atomically (a temporary file in the same
    folder, then ``os.replace``), so a re-run over its own outputs gets the new content or, on failure, the old.
    """
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise EplbInputError(f"{flag} {path} is a directory; give a file path")
    if target.exists() and not target.is_file():
        raise EplbInputError(f"{flag} {path} exists and is not a regular file")
    if target.exists() and not os.access(target, os.W_OK):
        raise EplbInputError(f"{flag} {path} is not writable")
    folder = next((p for p in target.absolute().parents if p.exists()), None)
    if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise EplbInputError(f"{flag} {path}: cannot create files in {folder}")


def output_folder(path, flag: str) -> None:
    """``path`` is a writable directory, or can be made one."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise EplbInputError(f"{flag} {path} exists and is not a directory")
    folder = next(p for p in (target.absolute(), *target.absolute().parents) if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise EplbInputError(f"{flag} {path}: cannot create files in {folder}")


def trtllm_parallel_flags(tool: str, tp: tuple[str, int | None], ep: tuple[str, int], backend: str | None,
                          kv_fraction: tuple[str, float | None]) -> list[str]:
    """Checks the flags TensorRT-LLM's ``tool`` (trtllm-bench, trtllm-serve) takes that mean little or
    nothing here (each given as (flag name, value)); returns notes about them."""
    (tp_flag, tp_value), (ep_flag, ep_value), (kv_flag, kv_value) = tp, ep, kv_fraction
    notes = []
    if tp_value is not None and tp_value != ep_value:
        raise EplbInputError(f"{tp_flag} {tp_value} must equal {ep_flag} {ep_value}: attention is data-parallel "
                             f"over the ep ranks here (TensorRT-LLM's enable_attention_dp)")
    if tp_value is not None:
        notes.append(f"{tp_flag} {tp_value}: attention data-parallel over the {ep_value} ep ranks")
    if backend is not None and backend not in ("pytorch", "_autodeploy"):
        raise EplbInputError(f"--backend {backend!r}: jax_eplb runs one backend (pytorch's place in {tool}); got an "
                             f"unknown one")
    if kv_value is not None:
        if not 0 < kv_value <= 1:
            raise EplbInputError(f"{kv_flag} must be in (0, 1], got {kv_value}")
        notes.append(f"{kv_flag} has no effect (the KV cache is --max_seq_len x batch rows)")
    return notes


SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client", "jinja2")


def require_serve_extra() -> None:
    """One line naming the ``serve`` extra unless FastAPI, uvicorn, prometheus_client and jinja2 are installed
    (checked here, outside ``jax_eplb.server``, whose import needs them)."""
    import importlib.util

    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise EplbInputError(f"jax-eplb serve needs {', '.join(missing)}: pip install 'jax-eplb[serve]'")
