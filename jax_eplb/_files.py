"""Reading a text file given on the command line: one clear error when it is missing, a
directory, or not text."""

from __future__ import annotations

from pathlib import Path

from jax_eplb._errors import EplbInputError


def read_text_file(path, what: str, kind: str) -> str:
    """The text of ``path``; ``what`` names the input (``"dataset"``), ``kind`` its format (``"YAML"``)."""
    path = Path(path)
    if not path.exists():
        raise EplbInputError(f"{what} {path} does not exist")
    if not path.is_file():
        raise EplbInputError(f"{what} {path} is not a file")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise EplbInputError(f"{what} {path} is not a text ({kind}) file") from None
