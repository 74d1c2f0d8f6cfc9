"""Random checkpoints (``create-checkpoint``) carry a marker file, so that a re-run may replace its own
earlier output whole while any other existing directory - a real checkpoint above all - is refused."""

from __future__ import annotations

import json
from pathlib import Path

from jax_eplb._errors import EplbInputError

MARKER_FILE = ".jax_eplb_random_checkpoint"


def check_random_checkpoint_target(path, flag: str = "--output") -> bool:
    """Input error unless ``path`` is new, an empty directory, or a random checkpoint written earlier.

    Returns whether an earlier random checkpoint is there (to be replaced whole)."""
    target = Path(path)
    if not target.exists():
        return False
    if not target.is_dir():
        raise EplbInputError(f"{flag} {path} exists and is not a directory")
    if (target / MARKER_FILE).is_file() or not any(target.iterdir()):
        return True
    raise EplbInputError(f"{flag} {path} already exists and is not a checkpoint create-checkpoint wrote; "
                         f"remove it or give a new directory")


def mark_random_checkpoint(staging: Path, **recipe) -> None:
    """Writes the marker (with what made the checkpoint) into the directory being written."""
    (staging / MARKER_FILE).write_text(json.dumps(recipe, sort_keys=True) + "\n")
