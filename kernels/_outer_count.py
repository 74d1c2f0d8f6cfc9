"""Counting ids as an outer product of two small one-hots, on the matrix units.

A bin ``b < H * L`` is split into ``hi = b // L`` and ``lo = b % L``. For a vector of ids ``[n]``
the ``[H, L]`` table of counts is ``onehot_hi[n, H]^T @ onehot_lo[n, L]``: each id costs
``H + L`` compares (32 for 256 bins) instead of ``H * L`` (256), and the sum over ids runs as
one small matmul (bf16 0/1 inputs, float32 accumulation: exact below 2**24 per bin).
Used inside Pallas kernels (Triton lowering); ``H, L >= 16`` is the smallest dot Triton takes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MIN_DOT_DIM = 16
EXACT_F32_COUNT = 2**24  # float32 holds every integer up to here


class OuterLayout(NamedTuple):
    """Bins laid out as ``[hi_bins, lo_bins]``; ``lo_bins = 2**lo_bits``."""

    hi_bins: int
    lo_bins: int
    lo_bits: int

    @property
    def num_bins(self) -> int:
        return self.hi_bins * self.lo_bins


def outer_layout(num_bins: int) -> OuterLayout:
    """The smallest power-of-two ``[H, L]`` with ``H * L >= num_bins``, ``L <= H`` and both >= 16."""
    bits = max(8, (max(num_bins, 1) - 1).bit_length())
    lo_bits = bits // 2
    return OuterLayout(hi_bins=1 << (bits - lo_bits), lo_bins=1 << lo_bits, lo_bits=lo_bits)


def count_outer(ids: jax.Array, valid: jax.Array, layout: OuterLayout) -> jax.Array:
    """``ids [n]`` int32 (``valid [n]`` bool) -> ``[H, L]`` float32 counts of the valid ids."""
    hi = jax.lax.shift_right_logical(ids, layout.lo_bits)
    lo = ids & (layout.lo_bins - 1)
    hi_bins = jax.lax.broadcasted_iota(jnp.int32, (1, layout.hi_bins), 1)
    lo_bins = jax.lax.broadcasted_iota(jnp.int32, (1, layout.lo_bins), 1)
    onehot_hi = ((hi[:, None] == hi_bins) & valid[:, None]).astype(jnp.bfloat16)  # [n, H]
    onehot_lo = (lo[:, None] == lo_bins).astype(jnp.bfloat16)  # [n, L]
    return jax.lax.dot_general(onehot_hi, onehot_lo, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)  # [H, L]
