"""MXFP4 (OCP microscaling FP4), as gpt-oss stores its experts: ``*_blocks`` ``[..., G, 16]`` uint8
(two e2m1 values per byte, low nibble first) and ``*_scales`` ``[..., G]`` uint8 (a power-of-two
exponent per 32 values, biased by 127). Dequantized on the host, in NumPy.
"""

from __future__ import annotations

import numpy as np

from jax_eplb._errors import EplbInputError

# e2m1: sign bit, two exponent bits, one mantissa bit.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)
BLOCK = 32  # values per scale
BLOCK_BYTES = BLOCK // 2


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray, name: str = "tensor") -> np.ndarray:
    """``blocks`` ``[..., G, 16]`` and ``scales`` ``[..., G]`` -> float32 ``[..., G * 32]``."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK_BYTES:
        raise EplbInputError(f"{name}: MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match "
                             f"([..., G, {BLOCK_BYTES}] and [..., G])")
    blocks = blocks.astype(np.uint8)
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)  # [..., G, 16, 2]
    values = np.ldexp(values.reshape(*blocks.shape[:-1], BLOCK), scales.astype(np.int32)[..., None] - 127)
    return values.reshape(*blocks.shape[:-2], -1).astype(np.float32)


def quantize_mxfp4(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float ``[..., K]`` (K a multiple of 32) -> (blocks ``[..., K/32, 16]``, scales ``[..., K/32]``):
    the scale makes each block's largest magnitude at most 6, values round to the nearest e2m1 (tests,
    random checkpoints)."""
    values = np.asarray(values, np.float32)
    grouped = values.reshape(*values.shape[:-1], -1, BLOCK)
    largest = np.abs(grouped).max(axis=-1)
    exponent = np.where(largest > 0, np.ceil(np.log2(np.maximum(largest, 1e-30) / 6.0)), 0).astype(np.int32)
    exponent = np.clip(exponent, -127, 127)
    scaled = grouped / np.ldexp(np.float32(1), exponent)[..., None]
    codes = np.abs(scaled[..., None] - FP4_VALUES).argmin(axis=-1).astype(np.uint8)  # nearest of the 16
    pairs = codes.reshape(*codes.shape[:-1], BLOCK_BYTES, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8), (exponent + 127).astype(np.uint8)
