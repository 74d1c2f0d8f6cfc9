"""Block-quantized FP8 weights held as stored: e4m3 values with one float32 scale per block.

DeepSeek-V3/R1 (and other ``quant_method: fp8`` checkpoints) store a linear weight ``[out, in]`` as
``float8_e4m3fn`` with ``weight_scale_inv`` ``[ceil(out/128), ceil(in/128)]``; block (i, j) of the
weight times ``scale_inv[i, j]`` is the real value, edge blocks partial (DeepSeek's
``weight_dequant``). The model keeps weights ``[in, out]``, so a ``BlockFp8`` holds the transposed
values ``[..., in, out]`` with the transposed scales ``[..., ceil(in/b_in), ceil(out/b_out)]`` and
``block = (b_in, b_out)``: the checkpoint's numbers, only the axes swapped.

``dequantize`` is the one arithmetic every path shares (loading into a bf16 model, the step's
per-layer dequantization right before a matmul, tests): ``float32(values) * scale`` cast to the
compute dtype, elementwise, so a model that dequantizes in the step and one that dequantized at
load compute on equal weights.

Axis legend: R rows (fan-in), C columns (fan-out), b block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FP8_DTYPE = jnp.dtype(jnp.float8_e4m3fn)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """``[..., R, C]`` -> ``[..., ceil(R/b0), ceil(C/b1)]``."""
    *lead, rows, cols = shape
    return tuple(lead) + (-(-rows // block[0]), -(-cols // block[1]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockFp8:
    """``values`` ``[..., R, C]`` e4m3 and ``scale_inv`` ``[..., ceil(R/b0), ceil(C/b1)]`` float32;
    ``block`` (b0, b1) is static (part of the pytree's structure)."""

    values: jax.Array
    scale_inv: jax.Array
    block: tuple[int, int] = dataclasses.field(default=(128, 128), metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in (self.values, self.scale_inv))


def dequantize(weight, dtype) -> jax.Array:
    """A ``BlockFp8`` as ``dtype`` (block-wise ``float32(values) * scale_inv``); any other array as it is."""
    if not isinstance(weight, BlockFp8):
        return weight
    b0, b1 = weight.block
    rows, cols = weight.values.shape[-2:]
    scale = jnp.repeat(jnp.repeat(weight.scale_inv.astype(jnp.float32), b0, axis=-2), b1, axis=-1)
    return (weight.values.astype(jnp.float32) * scale[..., :rows, :cols]).astype(dtype)


def dequantize_numpy(weight: BlockFp8) -> np.ndarray:
    """The float32 value of host ``weight`` (the independent reference of ``dequantize``: a loop over blocks)."""
    values = np.asarray(weight.values).astype(np.float32)
    scale = np.asarray(weight.scale_inv, np.float32)
    b0, b1 = weight.block
    out = values.copy()
    for i in range(scale.shape[-2]):
        for j in range(scale.shape[-1]):
            out[..., i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] *= scale[..., i, j, None, None]
    return out


class Fp8Weight(nnx.Module):
    """A replicated linear weight kept in FP8: ``values`` ``[..., R, C]`` e4m3, ``scale_inv``
    ``[..., ceil(R/b0), ceil(C/b1)]`` float32 (both ``nnx.Param``); the model reads it through
    :func:`weight_value`."""

    def __init__(self, shape: tuple[int, ...], block: tuple[int, int], *, init, rngs: nnx.Rngs):
        self.block = tuple(block)
        self.values = nnx.Param(init(rngs.params(), shape, jnp.float32).astype(FP8_DTYPE))
        self.scale_inv = nnx.Param(jnp.ones(scale_shape(shape, self.block), jnp.float32))

    def quantized(self) -> BlockFp8:
        return BlockFp8(self.values.get_value(), self.scale_inv.get_value(), self.block)


def linear_weight(shape: tuple[int, ...], dtype, block: tuple[int, int] | None, *, init, rngs: nnx.Rngs):
    """A linear weight ``[..., in, out]``: an ``nnx.Param`` of ``dtype``, or an ``Fp8Weight`` in
    ``block``s when ``block`` is given (FP8 kept as the checkpoint stores it)."""
    if block is None:
        return nnx.Param(init(rngs.params(), shape, dtype))
    return Fp8Weight(shape, block, init=init, rngs=rngs)


def weight_value(weight, dtype) -> jax.Array:
    """The weight as ``dtype`` for a matmul: an ``Fp8Weight`` dequantized here (inside the step,
    one layer at a time under the layer scan), an ``nnx.Param``'s value as it is."""
    if isinstance(weight, Fp8Weight):
        return dequantize(weight.quantized(), dtype)
    return weight.get_value()
