"""``grouped_matmul="auto"``: ``padded`` on CPU; on a GPU the fastest candidate whose output is close to
``ragged_dot``'s, measured once at the served layer's shapes (``ExpertShapes``): XLA's ``ragged_dot``,
``tokamax`` where it can run, and our Triton ``pallas`` kernel on JAX < 0.11 only (JAX deprecates that
backend from 0.11 on). ``jax_eplb_kernels.fastest_correct`` times them and prints one line."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_eplb.moe._experts import expert_compute
from jax_eplb.moe._tokamax import require_tokamax, tokamax_unavailable
from jax_eplb.moe._types import GROUPED_MATMULS
from jax_eplb_kernels import fastest_correct, relative_close, triton_in_auto


class ExpertShapes(NamedTuple):
    """One rank's expert compute: ``rows`` received rows ``[P, hidden]``, ``local_slots`` experts ``[m, H, F]``."""

    rows: int
    hidden: int
    ffn: int
    local_slots: int
    dtype: str


def resolve_grouped_matmul(grouped_matmul: str, platform: str, shapes: ExpertShapes | None = None) -> str:
    """``auto`` -> ``padded`` on CPU; on a GPU the fastest close candidate at ``shapes`` (``ragged_dot``
    without shapes); other names as they are."""
    if grouped_matmul not in GROUPED_MATMULS:
        raise ValueError(f"grouped_matmul must be one of {GROUPED_MATMULS}, got {grouped_matmul!r}")
    if grouped_matmul == "tokamax":
        require_tokamax()
    if grouped_matmul != "auto":
        return grouped_matmul
    if platform == "cpu":
        return "padded"
    candidates = ["ragged_dot"] + (["tokamax"] if tokamax_unavailable() is None else []) + (
        ["pallas"] if triton_in_auto() and platform == "gpu" else [])
    if shapes is None or len(candidates) == 1:
        return "ragged_dot"
    return fastest_correct(lambda: _trials(shapes, candidates), ("grouped matmul", shapes, tuple(candidates)),
                           reference="ragged_dot", close=relative_close(3e-2),
                           subject=f"grouped matmul ({shapes.rows} rows x {shapes.hidden} -> {shapes.ffn}, "
                                   f"{shapes.local_slots} local slots, {shapes.dtype})")


def _trials(shapes: ExpertShapes, candidates: list[str]) -> dict:
    """Each candidate's SwiGLU expert compute on rows spread over the local slots (some empty)."""
    rng = np.random.default_rng(0)
    rows = jnp.asarray(rng.normal(size=(shapes.rows, shapes.hidden)), shapes.dtype)
    row_slot = jnp.asarray(rng.integers(0, shapes.local_slots + 1, shapes.rows), jnp.int32)  # m: empty rows
    scale = 1 / np.sqrt(shapes.hidden)
    weights = [jnp.asarray(rng.normal(size=(shapes.local_slots,) + s) * scale, shapes.dtype)
               for s in ((shapes.hidden, shapes.ffn), (shapes.hidden, shapes.ffn), (shapes.ffn, shapes.hidden))]
    runs = {}
    for name in candidates:
        compute = jax.jit(functools.partial(expert_compute, grouped_matmul=name))
        runs[name] = functools.partial(compute, rows, row_slot, *weights)
    return runs

