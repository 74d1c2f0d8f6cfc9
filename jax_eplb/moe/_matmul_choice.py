"""``grouped_matmul="auto"``: ``padded`` on CPU; on a GPU the fastest candidate whose output is close to
``ragged_dot``'s, measured once at the served layer's shapes (``ExpertShapes``): XLA's ``ragged_dot``,
``tokamax`` where it can run, and our Triton ``pallas`` kernel on JAX < 0.11 only (JAX deprecates that
backend from 0.11 on). ``jax_eplb_kernels.fastest_correct`` times them and prints one line.

The probe computes its inputs on the device (a hash of each element's index, in the layer's dtype) and holds at most
``PROBE_WEIGHT_BYTES`` of expert weights: fewer local slots than the layer when they do not fit, with
the rows cut in proportion, so each slot gets the rows it gets when serving (DeepSeek-V3 in bf16: 4 of
288 slots, 352 MB, instead of 25 GB)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_eplb.moe._experts import expert_compute
from jax_eplb.moe._tokamax import require_tokamax, tokamax_unavailable
from jax_eplb.moe._types import GROUPED_MATMULS
from jax_eplb_kernels import dtype_tolerance, fastest_correct, relative_close, triton_in_auto

PROBE_WEIGHT_BYTES = 384 << 20  # expert weights a grouped-matmul probe may hold


class ExpertShapes(NamedTuple):
    """One rank's expert compute: ``rows`` received rows ``[P, hidden]``, ``local_slots`` experts ``[m, H, F]``."""

    rows: int
    hidden: int
    ffn: int
    local_slots: int
    dtype: str


def probe_shapes(shapes: ExpertShapes, weight_bytes: int = PROBE_WEIGHT_BYTES) -> ExpertShapes:
    """What the probe runs: as many local slots as fit in ``weight_bytes`` (at least one), the rows cut in
    proportion (rows per slot as in ``shapes``)."""
    per_slot = 3 * shapes.hidden * shapes.ffn * jnp.dtype(shapes.dtype).itemsize
    slots = int(max(1, min(shapes.local_slots, weight_bytes // per_slot)))
    return shapes._replace(local_slots=slots, rows=max(1, -(-shapes.rows * slots // shapes.local_slots)))


def resolve_grouped_matmul(grouped_matmul: str, platform: str, shapes: ExpertShapes | None = None,
                           device=None) -> str:
    """``auto`` -> ``padded`` on CPU; on a GPU the fastest close candidate at ``shapes`` (``ragged_dot``
    without shapes), measured on ``device`` (default: the default device); other names as they are."""
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
    return fastest_correct(lambda: matmul_trials(shapes, candidates),
                           ("grouped matmul", platform, shapes, tuple(candidates)), reference="ragged_dot",
                           close=relative_close(dtype_tolerance(shapes.dtype)), device=device,
                           subject=f"grouped matmul ({shapes.rows} rows x {shapes.hidden} -> {shapes.ffn}, "
                                   f"{shapes.local_slots} local slots, {shapes.dtype})")


def matmul_trials(shapes: ExpertShapes, candidates: list[str]) -> dict:
    """Each candidate's SwiGLU expert compute at :func:`probe_shapes` (rows spread over the slots, some empty)."""
    inputs = probe_inputs(probe_shapes(shapes))
    runs = {}
    for name in candidates:
        compute = jax.jit(functools.partial(expert_compute, grouped_matmul=name))
        runs[name] = functools.partial(compute, *inputs)
    return runs


@functools.partial(jax.jit, static_argnums=0)
def probe_inputs(shapes: ExpertShapes):
    """rows ``[P, H]``, row_slot ``[P]`` (``m``: an empty row), gate / up ``[m, H, F]``, down ``[m, F, H]``,
    computed on the default device in ``shapes.dtype``."""
    dtype, scale = jnp.dtype(shapes.dtype), 1 / np.sqrt(shapes.hidden)
    m, h, f = shapes.local_slots, shapes.hidden, shapes.ffn
    weights = [hashed_uniform((m,) + s, seed, scale, dtype) for seed, s in enumerate(((h, f), (h, f), (f, h)), 3)]
    row_slot = (hashed_bits((shapes.rows,), 2) % jnp.uint32(m + 1)).astype(jnp.int32)
    return (hashed_uniform((shapes.rows, h), 1, 1.0, dtype), row_slot, *weights)


def hashed_bits(shape: tuple[int, ...], seed: int) -> jax.Array:
    """``[shape]`` uint32, a hash of each element's index and ``seed``: elementwise from an iota, so XLA
    computes it in one pass with no intermediates (``jax.random``'s threefry materialises 32-bit arrays of the
    whole shape: 2.5 GB on CPU for a 352 MB bf16 probe). Call inside jit (sharded outputs: per shard)."""
    index = jnp.zeros(shape, jnp.uint32)
    for axis in range(len(shape)):
        index = index * jnp.uint32(shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    bits = index * jnp.uint32(0x9E3779B1) + jnp.uint32((seed * 0x7FEB352D) & 0xFFFFFFFF)
    bits = (bits ^ (bits >> 15)) * jnp.uint32(0x85EBCA77)
    return bits ^ (bits >> 13)


def hashed_uniform(shape: tuple[int, ...], seed: int, scale: float, dtype) -> jax.Array:
    """``[shape]`` in ``dtype``, spread evenly over ``[-scale, scale)`` (from :func:`hashed_bits`)."""
    unit = (hashed_bits(shape, seed) >> 8).astype(jnp.float32) * (2.0 / (1 << 24)) - 1.0
    return (unit * scale).astype(dtype)
