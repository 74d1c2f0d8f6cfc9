"""Public tile-grouped matmul with an ``implementation=`` override."""

from __future__ import annotations

import jax
import numpy as np

from jax_eplb_kernels._dispatch import dtype_tolerance, relative_close, resolve_implementation, triton_in_auto
from jax_eplb_kernels.grouped_matmul.pallas_gpu import MatmulBlockSizes, tile_grouped_matmul_pallas
from jax_eplb_kernels.grouped_matmul.reference import tile_grouped_matmul_reference


def tile_grouped_matmul(x: jax.Array, w: jax.Array, tile_group: jax.Array, used_tiles: jax.Array | int, *,
                        implementation: str = "auto",
                        block_sizes: MatmulBlockSizes = MatmulBlockSizes()) -> jax.Array:
    """Grouped matmul over row tiles: tile t of ``x`` times ``w[tile_group[t]]``.

    Args:
      x: ``[NT * tile, K]`` rows sorted by group, each ``tile``-row tile holding one group only.
      w: ``[m, K, N]`` group weights; tile_group: ``[NT]`` int.
      used_tiles: tiles from here on hold no rows (their output is zeros; Pallas skips them).
      implementation: ``auto`` (on a GPU with JAX < 0.11: the faster close one of XLA and Pallas on Triton,
        measured at this shape; else XLA), ``xla``, ``pallas`` (Triton), ``pallas_interpret``; there is no
        Mosaic GPU version (``mosaic_gpu*``, as the routing kernels' common choice, means XLA here: on GPUs
        the EP block's grouped matmul is ragged_dot or tokamax, see ``jax_eplb.moe``).
    Returns ``[NT * tile, N]`` float32.
    """
    if x.ndim != 2 or w.ndim != 3 or tile_group.ndim != 1 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x [NT*tile, K], w [m, K, N], tile_group [NT]; got {x.shape}, {w.shape}, "
                         f"{tile_group.shape}")
    if x.shape[0] % tile_group.shape[0]:
        raise ValueError(f"{x.shape[0]} rows do not split into {tile_group.shape[0]} tiles")
    tile = x.shape[0] // tile_group.shape[0]
    k, n = w.shape[1], w.shape[2]
    impl = resolve_implementation(
        implementation, trials=(lambda: _trials(x.shape[0] // tile, k, n, w.shape[0], tile, x.dtype, w.dtype,
                                                block_sizes)) if triton_in_auto() else None,
        key=("tile_grouped_matmul", x.shape[0], k, n, w.shape[0], tile, str(x.dtype), str(w.dtype), block_sizes),
        close=relative_close(dtype_tolerance(x.dtype)),
        subject=f"tile-grouped matmul ({x.shape[0]}x{k} @ {w.shape[0]}x{k}x{n}, {x.dtype})")
    if impl.startswith("mosaic_gpu"):
        impl = "xla"
    if impl == "xla":
        out = tile_grouped_matmul_reference(x, w, tile_group)
        row_tile = jax.numpy.arange(x.shape[0]) // tile
        return jax.numpy.where((row_tile < used_tiles)[:, None], out, 0.0)
    return tile_grouped_matmul_pallas(x, w, tile_group, used_tiles, tile=tile, block_sizes=block_sizes,
                                      interpret=impl == "pallas_interpret")


def _trials(num_tiles: int, k: int, n: int, groups: int, tile: int, x_dtype, w_dtype,
            block_sizes: MatmulBlockSizes) -> dict:
    """``auto``'s candidates at these shapes: rows spread over the groups, the last tile unused."""
    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.normal(size=(num_tiles * tile, k)), x_dtype)
    w = jax.numpy.asarray(rng.normal(size=(groups, k, n)) / np.sqrt(k), w_dtype)
    tile_group = jax.numpy.asarray(np.sort(rng.integers(0, groups, num_tiles)), jax.numpy.int32)
    used = max(num_tiles - 1, 1)

    @jax.jit
    def reference(x, w, tile_group):
        out = tile_grouped_matmul_reference(x, w, tile_group)
        return jax.numpy.where((jax.numpy.arange(x.shape[0]) // tile < used)[:, None], out, 0.0)

    return {"xla": lambda: reference(x, w, tile_group),
            "pallas": lambda: tile_grouped_matmul_pallas(x, w, tile_group, used, tile=tile, block_sizes=block_sizes)}

