"""The server's parts without a server: sampling, the batcher's cancel / stop / sampling rows, text
(incremental decoding, stop strings, chat templates against transformers' renderings) and the
OpenAI request checks."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax_eplb.model import Sampling, next_tokens
from jax_eplb.serving import InFlightBatcher, Request

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "qwen3_moe"


def sampling_of(temperature, top_p, seed, counter):
    return Sampling(*(jnp.asarray(np.asarray(a, dtype)) for a, dtype in
                      ((temperature, np.float32), (top_p, np.float32), (seed, np.uint32), (counter, np.int32))))


# ----------------------------------------------------------------------------- sampling

def test_greedy_rows_and_a_tiny_nucleus_take_the_argmax():
    logits = jax.random.normal(jax.random.key(0), (6, 50))
    argmax = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(np.asarray(next_tokens(logits, None)), argmax)
    mixed = sampling_of([0, 0, 0.7, 1.5, 0, 2.0], [1, 1, 1e-6, 1e-6, 0.3, 1e-6], [1, 2, 3, 4, 5, 6], [0] * 6)
    np.testing.assert_array_equal(np.asarray(next_tokens(logits, mixed)), argmax)


def test_sampling_follows_the_softmax_of_the_scaled_logits():
    """Empirical frequencies over many seeds against softmax(logits / T) (an independent NumPy formula)."""
    logits = np.array([2.0, 1.0, 0.5, -1.0, -3.0], np.float32)
    n, temperature = 20_000, 0.8
    rows = jnp.asarray(np.tile(logits, (n, 1)))
    draws = np.asarray(jax.jit(next_tokens)(rows, sampling_of([temperature] * n, [1.0] * n, np.arange(n), [0] * n)))
    observed = np.bincount(draws, minlength=len(logits)) / n

    def fits(t):  # every frequency within 4 binomial standard deviations of softmax(logits / t)
        expected = np.exp(logits / t) / np.exp(logits / t).sum()
        return bool(np.all(np.abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / n)))

    assert fits(temperature)
    assert not fits(0.9) and not fits(0.7)  # the check tells a neighbouring temperature apart


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-4, 4), min_size=2, max_size=12), st.floats(0.05, 1.0), st.floats(0.1, 2.0),
       st.integers(0, 2 ** 32 - 1), st.integers(0, 1000))
def test_sampled_tokens_lie_in_the_nucleus(values, top_p, temperature, seed, counter):
    logits = np.array(values, np.float32)
    token = int(next_tokens(jnp.asarray(logits[None]), sampling_of([temperature], [top_p], [seed], [counter]))[0])
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    nucleus = set(order[before < top_p - 1e-5].tolist()) | {int(order[0])}
    ties = set(np.flatnonzero(np.isclose(probs, probs[order[len(nucleus) - 1]], rtol=1e-4)).tolist())
    assert token in nucleus | ties


def test_a_draw_depends_on_seed_and_token_index_only():
    logits = jax.random.normal(jax.random.key(1), (4, 40)) * 3
    a = next_tokens(logits, sampling_of([1.0] * 4, [1.0] * 4, [7, 7, 7, 8], [3, 3, 4, 3]))
    b = next_tokens(logits[::-1][::-1], sampling_of([1.0] * 4, [1.0] * 4, [7, 7, 7, 8], [3, 3, 4, 3]))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    many = np.asarray(next_tokens(jnp.tile(logits[:1], (64, 1)), sampling_of([1.0] * 64, [1.0] * 64,
                                                                              np.arange(64), [0] * 64)))
    assert len(set(many.tolist())) > 1  # different seeds do draw differently


# ----------------------------------------------------------------------------- batcher

def test_batcher_cancel_stop_ids_and_sampling_rows():
    requests = [Request("a", (1, 2), 5), Request("b", (3,), 5, temperature=0.5, top_p=0.9, seed=11,
                                                 stop_ids=frozenset({9})), Request("c", (4, 4, 4), 5)]
    batcher = InFlightBatcher(requests, batch=2, chunk=4)
    batcher.admit()
    step = batcher.inputs()
    assert step.sampling is not None  # row 1 samples
    assert step.sampling.temperature.tolist() == [0.0, 0.5] and step.sampling.seed.tolist() == [0, 11]
    assert step.sampling.counter.tolist() == [0, 0]
    batcher.advance(step, np.array([5, 6]))
    assert [(e.task_id, e.token, e.finished) for e in batcher.emitted] == [("a", 5, False), ("b", 6, False)]
    assert batcher.inputs().sampling.counter.tolist() == [1, 1]  # the next token's index
    batcher.advance(batcher.inputs(), np.array([7, 9]))  # b generates its stop id: done, stop id kept
    assert batcher.done["b"] == [6, 9] and batcher.emitted[-1].finished
    assert [e.finish_reason for e in batcher.emitted] == [None, "stop"]
    assert batcher.cancel("a") and not batcher.cancel("a") and batcher.running == 0
    batcher.admit()
    assert batcher.owner[0].task_id == "c" and batcher.inputs().sampling is None  # greedy rows only: no sampling
    assert batcher.cancel("c") and not batcher.busy


# ----------------------------------------------------------------------------- text

class _Bytes:
    """A codec over UTF-8 bytes (ids are bytes): partial characters decode to U+FFFD."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_text_holds_back_partial_characters():
    from jax_eplb.server import IncrementalText

    text = IncrementalText(_Bytes())
    pieces = [text.add(b) for b in "né€x".encode()]
    assert "".join(pieces) == "né€x"
    assert all("\ufffd" not in p for p in pieces) and pieces[1] == "" and pieces[2] == "é"


def test_incremental_text_equals_decoding_everything_with_a_real_tokenizer():
    from jax_eplb.server import IncrementalText, TextCodec

    codec = TextCodec.from_directory(FIXTURE)
    ids = np.random.default_rng(0).integers(0, 34, 200).tolist()  # words, [UNK] and special tokens
    text = IncrementalText(codec)
    assert "".join(text.add(i) for i in ids) == codec.decode(ids) == text.text


def test_stop_strings_end_the_text_and_are_never_streamed():
    from jax_eplb.server._app import _Choice

    choice = _Choice(0, _Bytes(), ("STOP",))
    streamed = ""
    for b in "abc STOPxyz".encode():
        piece, _ = choice.add(b, None)
        streamed += piece
        if choice.finish_reason:
            break
    assert streamed == "abc " and choice.finish_reason == "stop"
    plain = _Choice(0, _Bytes(), ())
    assert "".join(plain.add(b, None)[0] for b in b"xy") + plain.add(ord("z"), "length")[0] == "xyz"


def test_chat_template_renders_as_transformers():
    """Every chat transformers rendered when it wrote the fixture: the same text and ids; the chat it
    refused is refused with its message."""
    from jax_eplb import EplbInputError
    from jax_eplb.server import TextCodec

    codec = TextCodec.from_directory(FIXTURE)
    reference = json.loads((FIXTURE / "chat_reference.json").read_text())
    for chat in reference["chats"]:
        assert codec.render_chat(chat["messages"], chat["add_generation_prompt"]) == chat["text"]
        assert codec.chat_ids(chat["messages"], chat["add_generation_prompt"]) == chat["ids"]
    for chat in reference["refused"]:
        with pytest.raises(EplbInputError, match=chat["error"]):
            codec.render_chat(chat["messages"])
    assert codec.encode(reference["prompt"]["text"]) == reference["prompt"]["ids"]
    assert codec.eos_id == codec.token_id("<|im_end|>") and codec.eos_id is not None
    assert TextCodec.from_directory(FIXTURE.parent / "mixtral") is None  # no tokenizer.json


# ----------------------------------------------------------------------------- OpenAI request checks

@pytest.mark.parametrize("body, message", [
    ({}, "'prompt' is required"),
    ({"prompt": []}, "non-empty"),
    ({"prompt": [1, 2], "n": 2}, "'n' must be 1"),
    ({"prompt": [1, 2], "max_tokens": -1}, "'max_tokens' must be a positive integer"),
    ({"prompt": [1, 2], "max_tokens": 0}, "'max_tokens' must be a positive integer"),
    ({"prompt": [1, 2], "max_tokens": 40}, "exceeds the context length"),
    ({"prompt": list(range(30)) + [1] * 2}, "leaves no room"),
    ({"prompt": [1, 64]}, "token id 64 outside the vocabulary"),
    ({"prompt": "hello"}, "no tokenizer"),
    ({"prompt": [1], "temperature": 3}, "'temperature' must be in"),
    ({"prompt": [1], "top_p": 0}, "'top_p' must be in"),
    ({"prompt": [1], "echo": True}, "'echo' is not supported"),
    ({"prompt": [1], "logprobs": 2}, "'logprobs' is not supported"),
    ({"prompt": [1], "stop": "x"}, "need the model's tokenizer"),
    ({"prompt": [1], "stream": "yes"}, "'stream' must be true or false"),
    ({"prompt": [1], "seed": 1.5}, "'seed' must be an integer"),
])
def test_completion_requests_are_checked(body, message):
    from jax_eplb.server import RequestError, completion_params

    with pytest.raises(RequestError, match=message):
        completion_params(body, None, vocab_size=64, max_seq_len=32)


def test_completion_and_chat_parameters():
    from jax_eplb.server import RequestError, TextCodec, chat_params, completion_params

    params = completion_params({"prompt": [[1, 2], [3]], "max_tokens": 4, "temperature": 0, "stop": [5],
                                "stop_token_ids": [6], "seed": -1}, None, 64, 32)
    assert params.prompts == ((1, 2), (3,)) and params.max_tokens == (4, 4) and params.temperature == 0.0
    assert params.stop_ids == {5, 6} and params.seed == 2 ** 32 - 1 and params.return_token_ids  # no tokenizer
    codec = TextCodec.from_directory(FIXTURE)
    text = completion_params({"prompt": "the quick fox", "stop": ["dog"]}, codec, 128, 64)
    assert text.prompts == (tuple(codec.encode("the quick fox")),) and text.max_tokens == (16,)
    assert text.stop_strings == ("dog",) and not text.return_token_ids
    chat = chat_params({"messages": [{"role": "user", "content": [{"type": "text", "text": "hot experts"}]}]},
                       codec, 128, 64)
    assert chat.prompts[0] == tuple(codec.chat_ids([{"role": "user", "content": "hot experts"}]))
    assert chat.max_tokens == (64 - len(chat.prompts[0]),)  # no limit given: the rest of the context
    with pytest.raises(RequestError, match="must be user or assistant"):
        chat_params({"messages": [{"role": "tool", "content": "x"}, {"role": "tool", "content": "y"}]}, codec, 128, 64)
    with pytest.raises(RequestError, match="no chat template"):
        chat_params({"messages": [{"role": "user", "content": "x"}]}, None, 128, 64)
