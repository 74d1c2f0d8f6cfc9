"""Running the HTTP server (uvicorn) in the foreground until SIGTERM or SIGINT.

On either signal: stop accepting connections, let open requests finish for up to the grace period
(uvicorn's graceful shutdown; the engine keeps serving meanwhile), then stop the engine (requests
left are aborted, online plans in flight applied, ``--online_state`` saved, the statistics dump
written whole) and return, so the command exits 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import socket

import uvicorn

from jax_eplb._errors import EplbInputError


class _Server(uvicorn.Server):
    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        # A signal is how a server is asked to stop: exit 0 after the shutdown, not re-raised.
        getattr(self, "_captured_signals", []).clear()


def check_port(host: str, port: int) -> None:
    """One line and exit 2 before any device work when ``host:port`` cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise EplbInputError(f"--host {host}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise EplbInputError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def run_server(app, engine, host: str, port: int, grace_s: float, log=print) -> None:
    """Serves ``app`` until a signal, then shuts the engine down (see the module's docstring)."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=max(grace_s, 0.001), access_log=False)
    server = _Server(config)
    log(f"serving on http://{host}:{port} (OpenAI API under /v1, metrics /metrics, balance /eplb, live page /)")
    try:
        server.run()
    finally:
        log("shutting down: finishing in-flight requests")
        engine.stop(grace_s)
        log("stopped")
