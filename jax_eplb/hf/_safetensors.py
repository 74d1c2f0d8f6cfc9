"""Reading a Hugging Face checkpoint's tensors: one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, memory-mapped through safetensors' ``safe_open``.

FP8 (``quantization_config.weight_block_size`` [128, 128]): a ``float8_e4m3fn`` weight
``[out, in]`` comes with ``weight_scale_inv`` ``[ceil(out/128), ceil(in/128)]``; block (i, j)
of the weight times ``scale_inv[i, j]`` is the real value (edge blocks are partial, as DeepSeek's
``weight_dequant`` reads them).

For loading, tensors travel as stored (``StoredTensor``: FP8 stays one byte per weight, a
linear layer stays ``[out, in]``) and are dequantized, transposed and cast on the device, in one
jitted elementwise pass; the host only copies bytes. ``tensor`` gives the float32 value on the
host instead (single experts for online rebalancing, tests).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_eplb._errors import EplbInputError
from jax_eplb.moe import BlockFp8

# safetensors' numpy backend looks bfloat16 and float8 dtypes up on the numpy module; ml_dtypes
# (JAX's own dtype library) provides them.
for _name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
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

    def raw(self, name: str):
        """The stored tensor as it is (FP8 stays FP8). A tensor of three or more dims (gpt-oss' experts
        fused per layer, ``[E, ...]``) comes as ``ExpertRows``: indexing one expert reads only its bytes."""
        if name not in self.weight_map:
            raise EplbInputError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        from safetensors import SafetensorError

        try:
            view = self._file(name).get_slice(name)
            if len(view.get_shape()) >= 3:
                return ExpertRows(view, name, self.directory / self.weight_map[name])
            return self._file(name).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as err:
            raise EplbInputError(f"{self.directory / self.weight_map[name]}: cannot read {name!r} ({err})") from None

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """``name`` is present with ``shape`` (and its FP8 scale fits), from the file headers alone."""
        if name not in self.weight_map:
            raise EplbInputError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        stored = tuple(self._file(name).get_slice(name).get_shape())
        if stored != tuple(shape):
            raise EplbInputError(f"{self.directory}: {name} has shape {stored}, config.json implies {tuple(shape)}")
        scale_name = name + SCALE_SUFFIX
        if scale_name in self.weight_map:
            block = self.block_size or (128, 128)
            want = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
            got = tuple(self._file(scale_name).get_slice(scale_name).get_shape())
            if got != want:
                raise EplbInputError(f"{self.directory}: {scale_name} has shape {got}, expected {want}")

    def stored(self, name: str, shape: tuple[int, ...]) -> "StoredTensor":
        """``name`` as stored (with its FP8 scale, if any), checked against ``shape``."""
        value = self.raw(name)
        if tuple(value.shape) != tuple(shape):
            raise EplbInputError(f"{self.directory}: {name} has shape {tuple(value.shape)}, config.json implies "
                                 f"{tuple(shape)}")
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.weight_map:
            if value.dtype == ml_dtypes.float8_e4m3fn:
                raise EplbInputError(f"{self.directory}: FP8 tensor {name} has no {scale_name}")
            return StoredTensor(value, None)
        block = self.block_size or (128, 128)
        scale_inv = self.raw(scale_name)
        _check_scale(scale_inv, value.shape, block, name)
        return StoredTensor(value, scale_inv, block)

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """``name`` as float32 on the host (FP8 dequantized block-wise), checked against ``shape``."""
        stored = self.stored(name, shape)
        if stored.scale_inv is None:
            return np.asarray(stored.value, np.float32)
        return dequantize_blocks(stored.value, stored.scale_inv, stored.block, name)


class ExpertRows:
    """A stored ``[E, ...]`` tensor read one leading index at a time (safetensors' slices: only those
    bytes are read), so each process reads just the experts of its own slots; ``np.asarray`` reads all."""

    def __init__(self, view, name: str, path):
        self._view, self.name, self.path = view, name, path
        self.shape = tuple(view.get_shape())
        self.ndim = len(self.shape)
        known = _SAFETENSORS_DTYPES.get(view.get_dtype())
        self.dtype = np.dtype(known) if known is not None else self[0].dtype

    def __getitem__(self, index: int) -> np.ndarray:
        from safetensors import SafetensorError

        try:
            return self._view[int(index)]
        except (SafetensorError, OSError, ValueError) as err:
            raise EplbInputError(f"{self.path}: cannot read {self.name}[{index}] ({err})") from None

    def __array__(self, dtype=None, copy=None):
        whole = np.stack([self[i] for i in range(self.shape[0])])
        return whole if dtype is None else whole.astype(dtype)


_SAFETENSORS_DTYPES = {"U8": np.uint8, "I8": np.int8, "F32": np.float32, "F16": np.float16, "F64": np.float64,
                       "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "I32": np.int32,
                       "I64": np.int64}  # safetensors' dtype names (others: the dtype of a row read)


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """A tensor as the checkpoint stores it: ``value`` ``[..., rows, cols]`` (FP8 with per-block
    ``scale_inv`` ``[..., ceil(rows/b0), ceil(cols/b1)]``, or a float type) and whether the model
    wants it transposed (``.T``: a linear layer's ``[out, in]`` -> ``[in, out]``)."""

    value: np.ndarray
    scale_inv: np.ndarray | None
    block: tuple[int, int] = (128, 128)
    transpose: bool = False

    @property
    def T(self) -> "StoredTensor":  # noqa: N802 - numpy's name for the transpose
        return dataclasses.replace(self, transpose=not self.transpose)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.value.shape)
        return shape[:-2] + shape[-2:][::-1] if self.transpose else shape

    @staticmethod
    def stack(parts: list["StoredTensor"]) -> "StoredTensor":
        first = parts[0]
        scales = None if first.scale_inv is None else np.stack([p.scale_inv for p in parts])
        return StoredTensor(np.stack([p.value for p in parts]), scales, first.block, first.transpose)

    def place(self, sharding, dtype) -> jax.Array:
        """On ``sharding``'s devices as ``dtype``: bytes copied as stored, finished on the device."""
        scale = None if self.scale_inv is None else jax.device_put(self.scale_inv, sharding)
        return finish_on_device(jax.device_put(self.value, sharding), scale, block=self.block,
                                transpose=self.transpose, dtype=jnp.dtype(dtype))

    def fp8(self, where: str = "") -> BlockFp8:
        """The host ``BlockFp8`` in the model's orientation (values and scales transposed with the
        weight, block swapped); an error when the tensor is not block-quantized FP8."""
        self._check_fp8(where)
        if not self.transpose:
            return BlockFp8(self.value, self.scale_inv, self.block)
        return BlockFp8(np.swapaxes(self.value, -1, -2), np.swapaxes(self.scale_inv, -1, -2), self.block[::-1])

    def place_fp8(self, sharding, where: str = "") -> BlockFp8:
        """On ``sharding``'s devices as stored FP8 (one byte per weight) with its block scales, in the
        model's orientation (transposed on the device)."""
        self._check_fp8(where)
        block = self.block[::-1] if self.transpose else self.block
        values, scale = jax.device_put(self.value, sharding), jax.device_put(self.scale_inv, sharding)
        if self.transpose:
            values, scale = _swap_last_axes(values), _swap_last_axes(scale)
        return BlockFp8(values, scale, block)


    def _check_fp8(self, where: str) -> None:
        if self.scale_inv is None or self.value.dtype != ml_dtypes.float8_e4m3fn:
            raise EplbInputError(f"weights: {where} is stored as {self.value.dtype} without block scales; this "
                                 f"model keeps its linear weights in FP8 (--weight_dtype bf16 dequantizes while "
                                 f"loading)")


@jax.jit
def _swap_last_axes(x):
    return jnp.swapaxes(x, -1, -2)


@functools.partial(jax.jit, static_argnames=("block", "transpose", "dtype"))
def finish_on_device(value, scale_inv, *, block, transpose, dtype):
    """Stored ``[..., rows, cols]`` -> dequantized (``scale_inv`` per block, or None), optionally
    transposed ``[..., cols, rows]``, cast to ``dtype``: one elementwise pass on the device."""
    x = value.astype(jnp.float32)
    if scale_inv is not None:
        rows, cols = x.shape[-2:]
        scale = jnp.repeat(jnp.repeat(scale_inv.astype(jnp.float32), block[0], axis=-2), block[1], axis=-1)
        x = x * scale[..., :rows, :cols]
    if transpose:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(dtype)


def _check_scale(scale_inv: np.ndarray, shape, block, name: str) -> None:
    want = (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    if tuple(scale_inv.shape[-2:]) != want:
        raise EplbInputError(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for a "
                             f"{tuple(shape)} weight in {tuple(block)} blocks")


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
    _check_scale(scale_inv, weight.shape, block, name)
    out = weight.astype(np.float32)
    for i in range(scale_inv.shape[0]):  # one row block at a time: no full-size scale array
        rows = out[i * block[0]:(i + 1) * block[0]]
        rows *= np.repeat(scale_inv[i].astype(np.float32), block[1])[:out.shape[1]]
    return out


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
