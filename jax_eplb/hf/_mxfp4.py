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

