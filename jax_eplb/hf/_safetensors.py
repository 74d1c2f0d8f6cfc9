"""Reading a Hugging Face checkpoint's tensors: one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, memory-mapped through safetensors' ``safe_open``, with
DeepSeek's block-wise FP8 weights dequantized on the way.

FP8 (``quantization_config.weight_block_size`` [128, 128]): a ``float8_e4m3fn`` weight
``[out, in]`` comes with ``weight_scale_inv`` ``[ceil(out/128), ceil(in/128)]``; block (i, j)
of the weight times ``scale_inv[i, j]`` is the real value (edge blocks are partial).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from jax_eplb._errors import EplbInputError

# safetensors' numpy backend looks float8 dtypes up on the numpy module; ml_dtypes (JAX's own
# dtype library) provides them.
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if not hasattr(np, _name):
        setattr(np, _name, getattr(ml_dtypes, _name))

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory, by name (files opened once, memory-mapped).

    Args:
      block_size: FP8 block ``[rows, cols]`` (``quantization_config.weight_block_size``), or None
        when the checkpoint is not block-quantized.
    """

    def __init__(self, directory, block_size: tuple[int, int] | None = None):
        self.directory = Path(directory)
        self.block_size = block_size
        self.weight_map = _weight_map(self.directory)
        self._files: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def _file(self, name: str):
        from safetensors import SafetensorError, safe_open

        shard = self.weight_map[name]
        if shard not in self._files:
            path = self.directory / shard
            try:
                self._files[shard] = safe_open(str(path), framework="numpy")
            except (SafetensorError, OSError) as err:
                raise EplbInputError(f"{path}: not a readable safetensors file ({err})") from None
        return self._files[shard]

    def raw(self, name: str) -> np.ndarray:
        """The stored tensor as it is (FP8 stays FP8)."""
        if name not in self.weight_map:
            raise EplbInputError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        from safetensors import SafetensorError

        try:
            return self._file(name).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as err:
            raise EplbInputError(f"{self.directory / self.weight_map[name]}: cannot read {name!r} ({err})") from None

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """``name`` as float32 (FP8 dequantized block-wise), checked against ``shape``."""
        value = self.raw(name)
        scale_name = name + SCALE_SUFFIX
        if value.dtype == ml_dtypes.float8_e4m3fn or scale_name in self.weight_map:
            value = dequantize_blocks(value, self.raw(scale_name), self.block_size or (128, 128), name)
        if tuple(value.shape) != tuple(shape):
            raise EplbInputError(f"{self.directory}: {name} has shape {tuple(value.shape)}, config.json implies "
                                 f"{tuple(shape)}")
        return np.asarray(value, np.float32)


def _weight_map(directory: Path) -> dict[str, str]:
    """tensor name -> shard file name; every shard must exist."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise EplbInputError(f"{index}: not a safetensors index ({type(err).__name__}: {err})") from None
        missing = sorted({shard for shard in weight_map.values() if not (directory / shard).is_file()})
        if missing:
            raise EplbInputError(f"{index} lists shard(s) that do not exist: {missing}")
        return dict(weight_map)
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise EplbInputError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(single), framework="numpy") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise EplbInputError(f"{single}: not a readable safetensors file ({err})") from None


def dequantize_blocks(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], name: str = "") -> np.ndarray:
    """``weight`` ``[out, in]`` (FP8) times its per-block ``scale_inv`` ``[ceil(out/b0), ceil(in/b1)]`` -> float32."""
    rows, cols = weight.shape
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if scale_inv.shape != want:
        raise EplbInputError(f"{name}: weight_scale_inv has shape {scale_inv.shape}, expected {want} for a "
                             f"{weight.shape} weight in {block} blocks")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], axis=0), block[1], axis=1)[:rows, :cols]
    return weight.astype(np.float32) * scale


def quantize_blocks(weight: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """float ``[out, in]`` -> (FP8 e4m3 weight, ``scale_inv`` per block): each block scaled so its
    largest magnitude is FP8's largest finite value (448)."""
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = np.zeros((grid[0] * block[0], grid[1] * block[1]), np.float32)
    padded[:rows, :cols] = weight
    blocks = np.abs(padded.reshape(grid[0], block[0], grid[1], block[1]))
    scale_inv = np.maximum(blocks.max(axis=(1, 3)), 1e-12) / float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
    scale = np.repeat(np.repeat(scale_inv, block[0], axis=0), block[1], axis=1)[:rows, :cols]
    return (weight / scale).astype(ml_dtypes.float8_e4m3fn), scale_inv.astype(np.float32)
