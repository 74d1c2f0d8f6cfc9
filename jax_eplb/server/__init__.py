"""``jax-eplb serve``: an OpenAI-compatible server over the benchmark's engine, with online EPLB,
Prometheus metrics and a live balance page.

engine (``_engine``: the serving loop fed from a request queue) -> what it shows (``_monitor``:
Prometheus metrics, ``/eplb``) -> text (``_text``: tokenizer, streamed text, chat templates) ->
requests (``_protocol``: OpenAI's fields checked) -> routes (``_app``: FastAPI) -> the process
(``_run``: uvicorn, signals, shutdown). Importing it needs the ``serve`` extra
(``pip install 'jax-eplb[serve]'``); ``jax-eplb serve`` says so in one line before importing it
(``cli._checks.require_serve_extra``).
"""

from jax_eplb.server._app import create_app, deliver_on_loops
from jax_eplb.server._engine import EngineStopped, QueueFull, ServingEngine
from jax_eplb.server._lockstep import Lockstep, ProcessLost
from jax_eplb.server._monitor import EngineMonitor
from jax_eplb.server._protocol import GenerationParams, RequestError, chat_params, completion_params
from jax_eplb.server._run import check_port, run_server
from jax_eplb.server._text import IncrementalText, TextCodec

__all__ = ["ServingEngine", "QueueFull", "EngineStopped", "EngineMonitor", "TextCodec", "IncrementalText",
           "GenerationParams", "RequestError", "completion_params", "chat_params", "create_app", "deliver_on_loops",
           "run_server", "check_port", "Lockstep", "ProcessLost"]
