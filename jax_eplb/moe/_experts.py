"""Expert compute on one rank: every received row through its local slot's SwiGLU expert.

Axis legend: P received rows, H hidden, F expert FFN, m local slots.

Grouped matmuls (``grouped_matmul=``): ``ragged_dot`` (XLA's grouped GEMM; on CPU a dense
masked loop over all m groups) and two over one tile-padded layout (rows sorted by slot, every
group padded to whole tiles, so about ``P + m*tile`` rows of work instead of ``m * P``):
``padded`` (XLA batched matmul with one weight copy gathered per tile; meant for CPU-sized
experts, not DeepSeek-sized ones on a GPU) and ``pallas`` (the ``tile_grouped_matmul`` kernel
reads each tile's slot weights in place and skips unused tiles, on Pallas' Triton backend, which
JAX deprecates from 0.11 on; ``pallas_interpret`` runs it on CPU for tests), and ``tokamax``
(Google's kernel library: ``tokamax.ragged_dot``, Mosaic GPU kernels on Hopper; the optional ``gpu``
extra, Python >= 3.12, JAX >= 0.11; it has no ``group_offset``, and needs none: the group sizes are
the rank's local slots'). ``auto`` is resolved before this (``_matmul_choice``). docs/benchmarks.md
compares them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_eplb.moe._tokamax import tokamax_ragged_dot
from jax_eplb.moe._types import GROUPED_MATMULS, ExpertFunction
from jax_eplb_kernels import tile_grouped_matmul

PADDED_TILE = 64


def _swiglu_ragged(ragged_dot, x, w_gate, w_up, w_down, group_sizes, function: ExpertFunction):
    """Rows of ``x`` ``[rows, H]`` sorted by local slot; ``w_*`` ``[m, ...]``; -> ``[rows, H]`` f32, with
    ``ragged_dot`` (``jax.lax.ragged_dot`` or ``tokamax.ragged_dot``: the same signature)."""
    dot = functools.partial(ragged_dot, preferred_element_type=jnp.float32)
    x = function.with_one(x)
    gate, up = dot(x, w_gate, group_sizes), dot(x, w_up, group_sizes)
    hidden = function.with_one(function.glu(gate, up).astype(x.dtype))
    return dot(hidden, w_down, group_sizes)


def _swiglu_padded(x, w_gate, w_up, w_down, group_sizes, tile: int, implementation: str,
                   function: ExpertFunction):
    """Same contract as :func:`_swiglu_ragged`, as tile-grouped matmuls (``implementation``:
    ``xla`` for ``padded``, else the Pallas kernel).

    Group g's rows go to tiles of ``tile`` rows, each tile holding one group only, so the
    number of tiles is at most ``ceil(rows / tile) + m`` (static) whatever the sizes.
    """
    x = function.with_one(x)
    rows, hidden = x.shape
    num_local = w_gate.shape[0]
    num_tiles = -(-rows // tile) + num_local
    tiles_per_group = -(-group_sizes // tile)  # [m]
    group_tile_start = jnp.cumsum(tiles_per_group) - tiles_per_group
    group_row_start = jnp.cumsum(group_sizes) - group_sizes
    row = jnp.arange(rows)
    row_group = jnp.clip(jnp.searchsorted(jnp.cumsum(group_sizes), row, side="right"), 0, num_local - 1)
    within = row - group_row_start[row_group]
    padded_row = (group_tile_start[row_group] + within // tile) * tile + within % tile
    in_group = row < group_sizes.sum()
    padded_row = jnp.where(in_group, padded_row, num_tiles * tile)  # rows past all groups: dropped
    buffer = jnp.zeros((num_tiles * tile, hidden), x.dtype).at[padded_row].set(x, mode="drop")
    tile_group = jnp.clip(jnp.searchsorted(jnp.cumsum(tiles_per_group), jnp.arange(num_tiles), side="right"),
                          0, num_local - 1)
    used_tiles = tiles_per_group.sum()
    matmul = functools.partial(tile_grouped_matmul, tile_group=tile_group, used_tiles=used_tiles,
                               implementation=implementation)
    act = function.with_one(function.glu(matmul(buffer, w_gate), matmul(buffer, w_up)).astype(x.dtype))
    out = matmul(act, w_down)  # [num_tiles * tile, H]
    return jnp.where(in_group[:, None], out[jnp.minimum(padded_row, num_tiles * tile - 1)], 0.0)


def expert_compute(rows: jax.Array, row_slot: jax.Array, w_gate, w_up, w_down, *,
                   grouped_matmul: str = "ragged_dot", tile: int = PADDED_TILE,
                   function: ExpertFunction = ExpertFunction()) -> jax.Array:
    """Runs every received row through its local slot's gated expert.

    Args:
      rows: ``[P, H]``; row_slot: ``[P]`` local slot, m for empty rows (-> zeros).
      w_gate, w_up: ``[m, H, F]``; w_down: ``[m, F, H]`` (``[m, H + 1, F]`` / ``[m, F + 1, H]`` with
        their bias rows when ``function.bias``).
      grouped_matmul: ``ragged_dot``, ``padded``, ``pallas``, ``pallas_interpret`` or ``tokamax`` (module docstring).
      function: the activation (SwiGLU or gpt-oss's clamped form) and whether the weights carry biases.
    Returns ``[P, H]`` float32.
    """
    if grouped_matmul not in GROUPED_MATMULS[1:]:
        raise ValueError(f"grouped_matmul must be one of {GROUPED_MATMULS[1:]}, got {grouped_matmul!r}")
    num_local = w_gate.shape[0]
    order = jnp.argsort(row_slot, stable=True)
    group_sizes = jnp.zeros((num_local,), jnp.int32).at[row_slot].add(1, mode="drop")
    if grouped_matmul in ("ragged_dot", "tokamax"):
        dot = jax.lax.ragged_dot if grouped_matmul == "ragged_dot" else tokamax_ragged_dot()
        out_sorted = _swiglu_ragged(dot, rows[order], w_gate, w_up, w_down, group_sizes, function)
    else:
        implementation = "xla" if grouped_matmul == "padded" else grouped_matmul
        # XLA: no tile larger than the rows; Pallas keeps whole tiles (power-of-two blocks for Triton).
        tile_rows = min(tile, rows.shape[0]) if implementation == "xla" else tile
        out_sorted = _swiglu_padded(rows[order], w_gate, w_up, w_down, group_sizes, tile_rows, implementation,
                                    function)
    out = jnp.zeros(out_sorted.shape, jnp.float32).at[order].set(out_sorted)
    return jnp.where((row_slot < num_local)[:, None], out, 0.0)
