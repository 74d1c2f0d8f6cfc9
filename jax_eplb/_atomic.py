"""Atomic writes: a reader never sees a half-written file or directory, a failed write leaves none.
Files get the permissions the umask allows (as ``open`` would), not ``mkstemp``'s 0600."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is renamed onto `path`.

    On an exception the temporary file is removed and `path` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace_existing: bool = False) -> Iterator[Path]:
    """Yields a new temporary directory beside ``path``; on success it is renamed to ``path``, so the
    directory appears complete or not at all. ``path`` must not exist or be empty, unless
    ``replace_existing`` (the caller checked that it holds only its own earlier output): then the old
    directory is moved aside, the new one renamed in, and the old one deleted (restored if that rename
    fails). Whatever was written inside gets the umask's permissions (some writers, safetensors' among
    them, make 0600)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        mask = _umask()
        for root, dirs, files in os.walk(staging):
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        os.chmod(staging, 0o777 & ~mask)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if replace_existing and target.is_dir():
            _swap_in(staging, target)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, target: Path) -> None:
    """Replaces the directory ``target`` by ``staging``: old one aside, new one in, old one deleted."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    try:
        os.replace(target, aside / target.name)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(aside / target.name, target)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
