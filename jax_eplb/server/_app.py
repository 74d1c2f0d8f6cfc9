"""The HTTP API (FastAPI): OpenAI's completions and chat completions over a ``ServingEngine``,
health, version, Prometheus metrics, the balance state (``/eplb``) and its live page.

Each prompt of a request is one engine request; its tokens arrive on the engine thread and are
handed to the event loop. A client that goes away (a closed stream, or a dropped connection while
waiting for a whole answer) cancels its requests, which frees their rows at the next iteration.
Errors are OpenAI's error object with a one-line message: 400 bad request, 503 queue full (with
``Retry-After``) or shutting down, 500 when the engine failed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jax_eplb.serving import Request as EngineRequest
from jax_eplb.server._engine import EngineStopped, QueueFull, ServingEngine
from jax_eplb.server._protocol import GenerationParams, RequestError, chat_params, check_model, completion_params
from jax_eplb.server._text import IncrementalText, TextCodec

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 503: "service_unavailable", 500: "internal_error"}.get(status, "error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


class _Choice:
    """One prompt's generation: its tokens, text, stop strings and finish reason."""

    def __init__(self, index: int, codec: TextCodec | None, stop_strings: tuple[str, ...]):
        self.index, self.stop_strings = index, stop_strings
        self.text = IncrementalText(codec)
        self.sent = 0  # characters of text handed out
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []

    def add(self, token: int | None, reason: str | None) -> tuple[str, list[int]]:
        """Takes a token; returns the text and ids that can be handed out now."""
        fresh = []
        if token is not None:
            self.token_ids.append(token)
            fresh = [token]
            self.text.add(token)
        text = self.text.text
        for stop in self.stop_strings:  # only where a new match can start: past what was handed out
            at = text.find(stop, max(self.sent - len(stop) + 1, 0))
            if at >= 0:  # OpenAI: the stop string ends the text and is not part of it
                text, reason = text[:at], "stop"
        self.finish_reason = reason
        hold = 0 if reason is not None else max((len(s) - 1 for s in self.stop_strings), default=0)
        end = max(self.sent, len(text) - hold)
        piece, self.sent = text[self.sent:end], end
        return piece, fresh


class _Listener:
    """One engine request's events into its generation's queue, on the event loop's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int):
        self.loop, self.events, self.index = loop, events, index
        self.thread = threading.get_ident()

    def __call__(self, token, reason) -> None:
        if threading.get_ident() == self.thread:
            self.events.put_nowait((self.index, token, reason))
        else:
            _call_on_loop(self.loop, self, token, reason)


def _call_on_loop(loop, function, *args) -> None:
    try:
        loop.call_soon_threadsafe(function, *args)
    except RuntimeError:  # the event loop is closed (shutdown)
        pass


def deliver_on_loops(events: list) -> None:
    """``ServingEngine(deliver=...)``: an iteration's events reach each event loop in one wake-up."""
    by_loop: dict = {}
    for listener, token, reason in events:
        by_loop.setdefault(listener.loop, []).append((listener, token, reason))
    for loop, batch in by_loop.items():
        _call_on_loop(loop, _run_listeners, batch)


def _run_listeners(batch) -> None:
    for listener, token, reason in batch:
        listener(token, reason)


class _Generation:
    """The engine requests of one HTTP request; events ``(choice, text piece, token ids)`` in order."""

    def __init__(self, engine: ServingEngine, codec: TextCodec | None, params: GenerationParams):
        self.engine, self.params = engine, params
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices = [_Choice(i, codec, params.stop_strings) for i in range(len(params.prompts))]
        self.events: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.submitted: list[str] = []

    def submit(self) -> None:
        p = self.params
        eos = self.engine.eos_ids if not p.ignore_eos else frozenset()
        try:
            for index, (prompt, limit) in enumerate(zip(p.prompts, p.max_tokens)):
                task_id = f"{self.id}-{index}"
                self.engine.submit(EngineRequest(task_id, prompt, limit, p.temperature, p.top_p, p.seed,
                                                 p.stop_ids | eos), _Listener(self.loop, self.events, index))
                self.submitted.append(task_id)
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for task_id in self.submitted:
            self.engine.cancel(task_id)

    async def events_in_order(self):
        """Yields ``(choice, piece, new ids)`` until every choice has finished; cancels what is left
        when the consumer stops early (a client went away)."""
        left = len(self.choices)
        try:
            while left:
                index, token, reason = await self.events.get()
                choice = self.choices[index]
                if choice.finish_reason is not None:
                    continue  # ended by a stop string; the engine's last words
                piece, ids = choice.add(token, reason)
                if choice.finish_reason is not None:
                    left -= 1
                    if reason is None:  # a stop string: the engine request is still running
                        self.engine.cancel(f"{self.id}-{index}")
                yield choice, piece, ids
        finally:
            if left:
                self.cancel()

    def usage(self) -> dict:
        prompt = sum(map(len, self.params.prompts))
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(engine: ServingEngine, model_name: str, codec: TextCodec | None, version: str) -> FastAPI:
    """The server's routes over a started ``engine``."""
    app = FastAPI(title="jax-eplb", version=version)
    config = engine.config
    created = int(time.time())
    page = resources.files("jax_eplb.server").joinpath("static/eplb.html").read_text()

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"the body is not JSON ({err})") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        check_model(body, model_name)
        return body

    async def serve(request: Request, parse, chat: bool):
        try:
            params = parse(await body_of(request), codec, config.vocab_size, config.max_seq_len)
            generation = _Generation(engine, codec, params)
            generation.submit()
        except RequestError as err:
            return error_response(400, str(err))
        except QueueFull as err:
            return error_response(503, f"server busy: {err}; retry later", {"Retry-After": str(RETRY_AFTER_S)})
        except EngineStopped as err:
            return error_response(503 if engine.error is None else 500, str(err))
        except ValueError as err:  # the engine's own checks (prompt + tokens longer than the cache)
            return error_response(400, str(err))
        if params.stream:
            return StreamingResponse(_stream(generation, model_name, chat), media_type="text/event-stream")
        return await _whole(request, generation, model_name, chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, completion_params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat_params, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "jax_eplb", "max_model_len": config.max_seq_len}]}

    @app.get("/health")
    async def health():
        if engine.alive:
            return Response(status_code=200)
        return error_response(503, "the engine is not running" if engine.error is None
                              else f"the engine failed: {engine.error}")

    @app.get("/version")
    async def version_route():
        return {"version": version}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.monitor.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/eplb")
    async def eplb():
        return {**engine.monitor.snapshot(), "load_balancer": engine.describe_plan()}

    @app.get("/")
    @app.get("/eplb/view")
    async def view():
        return HTMLResponse(page)

    return app


def _choice_json(choice: _Choice, text: str, ids: list[int], chat: bool, stream: bool, first: bool,
                 with_ids: bool) -> dict:
    out: dict = {"index": choice.index}
    if chat:
        if stream:
            out["delta"] = ({"role": "assistant", "content": text} if first else {"content": text}) \
                if text or first else {}
        else:
            out["message"] = {"role": "assistant", "content": text}
    else:
        out["text"] = text
    out["logprobs"] = None
    out["finish_reason"] = choice.finish_reason
    if with_ids:
        out["token_ids"] = ids
    return out


def _envelope(generation: _Generation, model: str, chat: bool, stream: bool, choices: list) -> dict:
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {"id": ("chatcmpl-" if chat else "cmpl-") + generation.id, "object": kind, "created": generation.created,
            "model": model, "choices": choices}


async def _stream(generation: _Generation, model: str, chat: bool):
    """Server-sent events: one chunk per token (per choice), then ``[DONE]``."""
    started = set()
    with_ids = generation.params.return_token_ids
    try:
        async for choice, piece, ids in generation.events_in_order():
            first = choice.index not in started
            started.add(choice.index)
            chunk = _envelope(generation, model, chat, True,
                              [_choice_json(choice, piece, ids, chat, True, first, with_ids)])
            yield f"data: {json.dumps(chunk)}\n\n"
        if generation.params.include_usage:
            last = {**_envelope(generation, model, chat, True, []), "usage": generation.usage()}
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        generation.cancel()  # a no-op when everything finished


async def _whole(request: Request, generation: _Generation, model: str, chat: bool):
    """The whole answer; the requests are cancelled if the client disconnects meanwhile."""
    pieces = {c.index: [] for c in generation.choices}

    async def consume():
        async for choice, piece, _ in generation.events_in_order():
            pieces[choice.index].append(piece)

    task = asyncio.create_task(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                return Response(status_code=499)  # nobody reads it; the finally below frees the rows
        task.result()
    finally:
        if not task.done():  # the client went away, or the server's shutdown cancelled this handler
            task.cancel()
            generation.cancel()
    errors = [c for c in generation.choices if c.finish_reason == "error"]
    if errors:
        return error_response(500, f"the engine failed: {generation.engine.error}")
    choices = [_choice_json(c, "".join(pieces[c.index]), c.token_ids, chat, False, False,
                            generation.params.return_token_ids) for c in generation.choices]
    return JSONResponse({**_envelope(generation, model, chat, False, choices),
                         "usage": generation.usage()})
