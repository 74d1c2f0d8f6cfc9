"""The online balancer's saved state (orbax: decayed statistics ``[Lm, E]`` and the plan
``[Lm, S]``), checked against a model's geometry from its metadata alone - before any work.

A save is written to ``DIR.saving`` and swapped in; the previous state is renamed ``DIR.old``
first and removed last, so at every moment a complete state exists: ``DIR``, or ``DIR.old`` when a
crash hit the swap (``saved_state`` finds it)."""

from __future__ import annotations

from pathlib import Path

from jax_eplb._errors import EplbInputError

STATE_KEYS = ("statistics", "slot_to_expert")


def previous_state_path(path) -> Path:
    path = Path(path).absolute()
    return path.with_name(path.name + ".old")


def saved_state(path) -> Path | None:
    """The complete saved state to restore for ``--online_state path``: the directory, or the previous
    state a crash during a save left as ``path.old``; None when neither exists."""
    path = Path(path).absolute()
    if path.exists():
        return path
    previous = previous_state_path(path)
    return previous if previous.exists() else None


def saved_state_shapes(path) -> dict[str, tuple[int, ...]]:
    """``{"statistics": (Lm, E), "slot_to_expert": (Lm, S)}`` read from the checkpoint's metadata."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    try:
        metadata = ocp.StandardCheckpointer().metadata(path)
        tree = getattr(metadata, "item_metadata", metadata)  # StepMetadata (newer orbax) or the tree
        tree = getattr(tree, "tree", tree)
        return {key: tuple(int(n) for n in tree[key].shape) for key in STATE_KEYS}
    except Exception as err:  # orbax raises many kinds for a directory it did not write
        raise EplbInputError(f"--online_state {path}: not an online balancer state "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def check_saved_state(path, num_moe_layers: int, num_experts: int, num_slots: int) -> None:
    """A state saved for another model or plan geometry is an error, not a crash mid-run."""
    shapes = saved_state_shapes(path)
    expected = {"statistics": (num_moe_layers, num_experts), "slot_to_expert": (num_moe_layers, num_slots)}
    if shapes != expected:
        raise EplbInputError(
            f"--online_state {path} was saved for {shapes['slot_to_expert'][0]} MoE layers, "
            f"{shapes['statistics'][-1]} experts, {shapes['slot_to_expert'][-1]} slots; this run has "
            f"{num_moe_layers} MoE layers, {num_experts} experts, {num_slots} slots (use another directory)")
