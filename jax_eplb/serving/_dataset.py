"""trtllm-bench datasets: JSON lines ``{"task_id", "input_ids" | "prompt", "output_tokens"}``.

``prompt`` (text) is tokenized with the model's tokenizer (a Hugging Face checkpoint's
``tokenizer.json``, through the ``tokenizers`` library); without one its UTF-8 bytes are the
token ids (mod the vocabulary), so text prompts run but are not meaningful language.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jax_eplb._atomic import atomic_write_text
from jax_eplb._errors import EplbInputError
from jax_eplb._files import read_text_file


class Request(NamedTuple):
    """One generation: its prompt ids, how many tokens at most, and how to pick them (datasets are
    greedy; a server's requests may sample and stop early)."""

    task_id: int | str
    input_ids: tuple[int, ...]
    output_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # the sampling draw of token i depends on (seed, i) only
    stop_ids: frozenset = frozenset()  # the request ends after generating one of these (it is kept)


def load_dataset(path, vocab_size: int, max_seq_len: int, tokenizer=None) -> list[Request]:
    """Reads and validates every line before any work starts.

    ``tokenizer``: a ``tokenizers.Tokenizer`` for ``prompt`` text (None: UTF-8 bytes)."""
    path = Path(path)
    text = read_text_file(path, "dataset", "JSON lines")
    requests, seen = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EplbInputError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise EplbInputError(f"{where}: expected an object with task_id, input_ids/prompt, output_tokens")
        if "input_ids" in row:
            ids = row["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise EplbInputError(f"{where}: input_ids must be a list of integers")
        elif isinstance(row.get("prompt"), str):
            ids = (tokenizer.encode(row["prompt"]).ids if tokenizer is not None
                   else [b % vocab_size for b in row["prompt"].encode()])
        else:
            raise EplbInputError(f"{where}: needs 'input_ids' (list of ints) or 'prompt' (text)")
        if not ids:
            raise EplbInputError(f"{where}: empty prompt")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise EplbInputError(f"{where}: token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        out = row.get("output_tokens")
        if not isinstance(out, int) or isinstance(out, bool) or out < 1:
            raise EplbInputError(f"{where}: output_tokens must be a positive integer, got {out!r}")
        if len(ids) + out > max_seq_len:
            raise EplbInputError(f"{where}: prompt ({len(ids)}) + output_tokens ({out}) exceeds the model's "
                                 f"max_seq_len ({max_seq_len})")
        task_id = row.get("task_id", len(requests))
        if not isinstance(task_id, (int, str)) or isinstance(task_id, bool):
            raise EplbInputError(f"{where}: task_id must be an integer or a string, got {task_id!r}")
        if task_id in seen:
            raise EplbInputError(f"{where}: duplicate task_id {task_id!r} (results are keyed by it)")
        seen.add(task_id)
        requests.append(Request(task_id, tuple(ids), out))
    if not requests:
        raise EplbInputError(f"dataset {path} holds no requests")
    return requests


def _lengths(rng, count, mean, stdev, low=1):
    return np.maximum(low, np.round(rng.normal(mean, stdev, count))).astype(int) if stdev else np.full(count, mean)


def token_norm_dist(*, num_requests: int, input_mean: int, output_mean: int, input_stdev: float = 0.0,
                    output_stdev: float = 0.0, vocab_size: int = 512, seed: int = 0) -> list[Request]:
    """Synthetic token ids with normally distributed lengths (trtllm-bench's ``token-norm-dist``)."""
    if num_requests < 1 or input_mean < 1 or output_mean < 1:
        raise EplbInputError("num_requests, input_mean and output_mean must be >= 1")
    if not (input_stdev >= 0 and output_stdev >= 0):  # NaN too
        raise EplbInputError(f"input_stdev and output_stdev must be >= 0, got {input_stdev}, {output_stdev}")
    if vocab_size < 1:
        raise EplbInputError(f"vocab_size must be >= 1, got {vocab_size}")
    rng = np.random.default_rng(seed)
    inputs = _lengths(rng, num_requests, input_mean, input_stdev)
    outputs = _lengths(rng, num_requests, output_mean, output_stdev)
    return [Request(i, tuple(rng.integers(0, vocab_size, n).tolist()), int(o))
            for i, (n, o) in enumerate(zip(inputs, outputs))]


def prepare_dataset(path, **distribution) -> Path:
    """Writes ``token_norm_dist(**distribution)`` as trtllm-bench JSON lines."""
    lines = [json.dumps({"task_id": r.task_id, "input_ids": list(r.input_ids), "output_tokens": r.output_tokens})
             for r in token_norm_dist(**distribution)]
    path = Path(path)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_text_dataset(path, text_file, tokenizer, output_tokens: int) -> tuple[Path, int]:
    """A trtllm-bench dataset of real text: each non-empty line of ``text_file`` tokenized with
    ``tokenizer`` (a tokenizer.json, or a directory holding one). Returns (path, requests)."""
    from tokenizers import Tokenizer

    tokenizer_path = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
    if not tokenizer_path.is_file():
        raise EplbInputError(f"tokenizer {tokenizer_path} does not exist")
    if output_tokens < 1:
        raise EplbInputError(f"--output-tokens must be >= 1, got {output_tokens}")
    source = Path(text_file)
    lines = [line.strip() for line in read_text_file(source, "text file", "prompts").splitlines() if line.strip()]
    try:
        encoder = Tokenizer.from_file(str(tokenizer_path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exceptions for bad files
        raise EplbInputError(f"{tokenizer_path}: not a readable tokenizer ({err})") from None
    if not lines:
        raise EplbInputError(f"{source} holds no text")
    rows = [json.dumps({"task_id": i, "input_ids": encoder.encode(line).ids, "output_tokens": output_tokens})
            for i, line in enumerate(lines)]
    path = Path(path)
    atomic_write_text(path, "\n".join(rows) + "\n")
    return path, len(rows)
