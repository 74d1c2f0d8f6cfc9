"""OpenAI's completion and chat-completion requests: checked and turned into prompts and parameters.

Every problem is a ``RequestError`` (HTTP 400, one line). Accepted beyond OpenAI's fields, as vLLM
does: ``stop_token_ids``, ``ignore_eos``, ``return_token_ids`` (each choice carries its
``token_ids``; always on for a model without a tokenizer, whose ``text`` is empty). A prompt is
text (the checkpoint's tokenizer), token ids, or a list of either (one choice each). ``stop``
may hold strings (with a tokenizer) and token ids. Fields with no meaning here are refused
unless they hold their neutral value (``n`` 1, ``echo`` false, no ``logprobs``, zero penalties).
"""

from __future__ import annotations

import secrets
from typing import NamedTuple

from jax_eplb.server._text import TextCodec

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for completions


class RequestError(ValueError):
    """A bad request: HTTP 400 with this one-line message."""


class GenerationParams(NamedTuple):
    prompts: tuple[tuple[int, ...], ...]  # one per choice
    max_tokens: tuple[int, ...]  # per choice
    temperature: float
    top_p: float
    seed: int
    stop_ids: frozenset
    stop_strings: tuple[str, ...]
    ignore_eos: bool
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    return_token_ids: bool


def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"'{key}' must be in [{low}, {high}], got {value}")
    return value


def _flag(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{key}' must be true or false, got {value!r}")
    return value


def _token_ids(value, what: str, vocab_size: int) -> tuple[int, ...]:
    if not value:
        raise RequestError(f"{what} is empty")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise RequestError(f"{what} must be text or a list of token ids")
    bad = [i for i in value if not 0 <= i < vocab_size]
    if bad:
        raise RequestError(f"{what}: token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    return tuple(value)


def check_model(body: dict, served: str) -> None:
    model = body.get("model", served)
    if model != served:
        raise RequestError(f"model {model!r} is not served here; this server serves {served!r}")


def _neutral(body: dict) -> None:
    if body.get("n", 1) not in (1, None):
        raise RequestError(f"'n' must be 1 (one choice per prompt), got {body.get('n')!r}")
    if body.get("best_of", 1) not in (1, None):
        raise RequestError("'best_of' is not supported")
    if body.get("echo"):
        raise RequestError("'echo' is not supported")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise RequestError("'logprobs' is not supported")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise RequestError(f"'{key}' is not supported (must be 0)")
    if body.get("logit_bias"):
        raise RequestError("'logit_bias' is not supported")
    if body.get("suffix"):
        raise RequestError("'suffix' is not supported")


def _stops(body: dict, codec: TextCodec | None, vocab_size: int) -> tuple[frozenset, tuple[str, ...]]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, (str, int)) and not isinstance(stop, bool) else stop
    if not isinstance(stop, list):
        raise RequestError(f"'stop' must be a string, a token id or a list of them, got {stop!r}")
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list):
        raise RequestError("'stop_token_ids' must be a list of token ids")
    strings = tuple(s for s in stop if isinstance(s, str))
    numbers = [s for s in stop if not isinstance(s, str)] + ids
    if any(not s for s in strings):
        raise RequestError("'stop' strings must not be empty")
    if strings and codec is None:
        raise RequestError("'stop' strings need the model's tokenizer; give token ids (stop_token_ids)")
    return frozenset(_token_ids(numbers, "'stop' token ids", vocab_size) if numbers else ()), strings


def _common(body: dict, codec: TextCodec | None, vocab_size: int, prompts, max_tokens, stream_default=False):
    _neutral(body)
    stop_ids, stop_strings = _stops(body, codec, vocab_size)
    stream = _flag(body, "stream", stream_default)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object")
    seed = _number(body, "seed", None, -2 ** 63, 2 ** 64 - 1, integer=True)
    return GenerationParams(
        prompts=tuple(prompts), max_tokens=tuple(max_tokens),
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
        seed=secrets.randbits(32) if seed is None else seed % 2 ** 32,
        stop_ids=stop_ids, stop_strings=stop_strings, ignore_eos=_flag(body, "ignore_eos"), stream=stream,
        include_usage=stream and bool(options.get("include_usage")),
        return_token_ids=_flag(body, "return_token_ids") or codec is None)


def _max_tokens(body: dict, key_order, default, prompt_len: int, max_seq_len: int) -> int:
    value = None
    for key in key_order:
        if body.get(key) is not None:
            value = body[key]
            key_used = key
            break
    room = max_seq_len - prompt_len
    if value is None:
        return min(default, room) if default is not None else room
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"'{key_used}' must be a positive integer, got {value!r}")
    if value > room:
        raise RequestError(f"prompt ({prompt_len} tokens) + {key_used} ({value}) exceeds the context length "
                           f"--max_seq_len {max_seq_len}")
    return value


def _prompt_fits(ids, max_seq_len: int) -> None:
    if len(ids) >= max_seq_len:
        raise RequestError(f"the prompt has {len(ids)} tokens; --max_seq_len {max_seq_len} leaves no room to "
                           f"generate")


def completion_params(body: dict, codec: TextCodec | None, vocab_size: int, max_seq_len: int) -> GenerationParams:
    """``/v1/completions``."""
    if "prompt" not in body:
        raise RequestError("'prompt' is required")
    prompt = body["prompt"]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("'prompt' must be text, a list of token ids, or a non-empty list of either")
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            if codec is None:
                raise RequestError("this model has no tokenizer (tokenizer.json): give the prompt as token ids")
            if not p:
                raise RequestError("'prompt' is empty")
            ids = tuple(codec.encode(p))
            if not ids:
                raise RequestError("'prompt' has no tokens")
        elif isinstance(p, list):
            ids = _token_ids(p, "'prompt'", vocab_size)
        else:
            raise RequestError("'prompt' must be text, a list of token ids, or a non-empty list of either")
        _prompt_fits(ids, max_seq_len)
        prompts.append(ids)
    limits = [_max_tokens(body, ("max_tokens",), DEFAULT_COMPLETION_TOKENS, len(p), max_seq_len) for p in prompts]
    return _common(body, codec, vocab_size, prompts, limits)


def _message_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError("message 'content' must be text or a list of text parts")


def chat_params(body: dict, codec: TextCodec | None, vocab_size: int, max_seq_len: int) -> GenerationParams:
    """``/v1/chat/completions`` (the checkpoint's chat template renders the messages)."""
    if codec is None or codec.chat_template is None:
        raise RequestError("this model has no chat template (tokenizer_config.json chat_template); "
                           "use /v1/completions")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content}")
    chat = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("each message needs a 'role' (text) and 'content'")
        chat.append({**m, "content": _message_text(m.get("content", ""))})
    extra = body.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise RequestError("'chat_template_kwargs' must be an object")
    try:
        ids = tuple(codec.chat_ids(chat, add_generation_prompt=_flag(body, "add_generation_prompt", True), **extra))
    except ValueError as err:  # EplbInputError: the template refused the chat
        raise RequestError(str(err)) from None
    if not ids:
        raise RequestError("the chat renders to no tokens")
    _prompt_fits(ids, max_seq_len)
    limit = _max_tokens(body, ("max_completion_tokens", "max_tokens"), None, len(ids), max_seq_len)
    return _common(body, codec, vocab_size, [ids], [limit])
