"""Text in and out of a checkpoint's tokenizer: prompts, streamed text, chat templates.

A Hugging Face checkpoint directory may hold ``tokenizer.json`` (read with the ``tokenizers``
library) and ``tokenizer_config.json`` (special tokens, ``chat_template``) or
``chat_template.jinja``. Chat messages are rendered the way transformers' ``apply_chat_template``
renders them: a sandboxed jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, a ``{% generation %}`` block that renders its body, a ``tojson``
filter that does not escape HTML, ``raise_exception`` and ``strftime_now``; the template sees
``messages`` (keys whose value is None dropped), ``tools``, ``documents``,
``add_generation_prompt`` and the special tokens (``bos_token``, ``eos_token``, ...); the text
is then tokenized without adding special tokens (``tests/test_serve.py`` compares with
transformers' own renderings, recorded by ``scripts/make_hf_fixtures.py``).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jax_eplb._errors import EplbInputError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextCodec:
    """A checkpoint's tokenizer (and chat template, when it ships one).

    Args:
      tokenizer: a ``tokenizers.Tokenizer``.
      config: the parsed ``tokenizer_config.json`` (``{}`` without one).
      chat_template: the template's source (None: no chat endpoint).
    """

    def __init__(self, tokenizer, config: dict, chat_template: str | None):
        self.tokenizer = tokenizer
        self.special_tokens = {key: text for key in SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key)))}
        self.chat_template = chat_template
        self._compiled = _compile(chat_template) if chat_template else None

    @classmethod
    def from_directory(cls, directory) -> "TextCodec | None":
        """The codec of a checkpoint directory; None when it has no ``tokenizer.json``."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            return None
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - the library raises plain Exceptions for bad files
            raise EplbInputError(f"{path}: not a readable tokenizer ({err})") from None
        config = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise EplbInputError(f"{config_path}: not JSON ({err})") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        return cls(tokenizer, config, template if isinstance(template, str) else None)

    # ------------------------------------------------------------------ ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return self.tokenizer.token_to_id(text) if text else None

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("eos_token"))

    # ------------------------------------------------------------------ chat

    def render_chat(self, messages: list, add_generation_prompt: bool = True, tools=None, documents=None,
                    **template_kwargs) -> str:
        """The chat as the template writes it (``EplbInputError`` when the template refuses it)."""
        import jinja2

        if self._compiled is None:
            raise EplbInputError("this model has no chat template (tokenizer_config.json chat_template)")
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._compiled.render(messages=chat, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **template_kwargs})
        except jinja2.TemplateError as err:
            raise EplbInputError(f"chat template: {err}") from None

    def chat_ids(self, messages: list, add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, **template_kwargs),
                           add_special_tokens=False)


class IncrementalText:
    """The text of a growing list of ids, handed out in pieces (streaming).

    Each new token decodes a short window of ids (from the last piece's start: TGI's and vLLM's
    prefix/read offsets), so a long generation costs O(length), not O(length^2); text that ends in an
    incomplete character (U+FFFD from a partial UTF-8 sequence) is held back until it completes.
    """

    def __init__(self, codec: TextCodec | None):
        self.codec, self.ids, self.text = codec, [], ""
        self._prefix = self._read = 0  # ids[prefix:read] decode to the end of the text handed out

    def add(self, token: int) -> str:
        self.ids.append(token)
        if self.codec is None:
            return ""
        before = self.codec.decode(self.ids[self._prefix:self._read])
        after = self.codec.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        piece = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece


def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """transformers' ``{% generation %}...{% endgeneration %}``: renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise EplbInputError(f"chat template: {err}") from None
