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
