"""Pallas tile-grouped matmul: every program multiplies one tile of rows by its group's weights in place.

Rows arrive sorted by group and padded so that each ``tile``-row tile belongs to one group
(``tile_group [NT]``). Program ``(t, j)`` reads group ``g = tile_group[t]`` and computes the
``[tile, bn]`` block ``j`` of ``x_tile @ w[g]`` over K in ``bk`` steps, reading ``w[g]`` where it
lies (no per-tile weight copy, unlike the XLA path); tiles at or past ``used_tiles`` (the static
tile count is the dropless worst case) write zeros and skip the work. The grouped-GEMM shape of
vLLM's and TensorRT-LLM's fused MoE kernels, in the Triton lowering.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax_eplb_kernels._dispatch import triton_compiler_params


@dataclasses.dataclass(frozen=True)
class MatmulBlockSizes:
    bn: int = 128  # output columns per program
    bk: int = 64  # contraction step
    num_warps: int = 4
    num_stages: int = 3

    def fit(self, k: int, n: int) -> "MatmulBlockSizes":
        """Blocks no larger than the matrix (small test shapes)."""
        return dataclasses.replace(self, bn=min(self.bn, n), bk=min(self.bk, k))


def _kernel(used_ref, group_ref, x_ref, w_ref, out_ref, *, bk: int, num_k: int):
    tile = pl.program_id(0)

    @pl.when(tile < used_ref[0])
    def _():
        group = group_ref[tile]

        def body(step, acc):
            a = x_ref[:, pl.ds(step * bk, bk)]  # [tile, bk]
            b = w_ref[group, pl.ds(step * bk, bk), :]  # [bk, bn]
            return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

        out_ref[...] = jax.lax.fori_loop(0, num_k, body, jnp.zeros(out_ref.shape, jnp.float32))

    @pl.when(tile >= used_ref[0])
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)


@functools.partial(jax.jit, static_argnames=("tile", "block_sizes", "interpret"))
def tile_grouped_matmul_pallas(x: jax.Array, w: jax.Array, tile_group: jax.Array, used_tiles: jax.Array, *,
                               tile: int, block_sizes: MatmulBlockSizes = MatmulBlockSizes(),
                               interpret: bool = False) -> jax.Array:
    """``x [NT * tile, K]``, ``w [m, K, N]``, ``tile_group [NT]``, ``used_tiles`` scalar -> ``[NT * tile, N]`` f32."""
    rows, k = x.shape
    num_groups, _, n = w.shape
    num_tiles = tile_group.shape[0]
    sizes = block_sizes.fit(k, n)
    if rows != num_tiles * tile or k % sizes.bk or n % sizes.bn:
        raise ValueError(f"need rows = tiles * tile and K, N multiples of (bk, bn): x {x.shape}, w {w.shape}, "
                         f"{num_tiles} tiles of {tile}, blocks ({sizes.bk}, {sizes.bn})")
    return pl.pallas_call(
        functools.partial(_kernel, bk=sizes.bk, num_k=k // sizes.bk),
        out_shape=jax.ShapeDtypeStruct((rows, n), jnp.float32),
        grid=(num_tiles, n // sizes.bn),
        in_specs=[pl.BlockSpec((1,), lambda t, j: (0,)),
                  pl.BlockSpec((num_tiles,), lambda t, j: (0,)),
                  pl.BlockSpec((tile, k), lambda t, j: (t, 0)),
                  pl.BlockSpec((num_groups, k, sizes.bn), lambda t, j: (0, 0, j))],
        out_specs=pl.BlockSpec((tile, sizes.bn), lambda t, j: (t, j)),
        interpret=interpret,
        compiler_params=None if interpret else triton_compiler_params(sizes.num_warps, sizes.num_stages),
        name="tile_grouped_matmul",
    )(jnp.asarray(used_tiles, jnp.int32).reshape(1), tile_group.astype(jnp.int32), x, w)
