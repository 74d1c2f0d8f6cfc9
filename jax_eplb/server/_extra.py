"""Whether the ``serve`` extra (FastAPI, uvicorn, prometheus_client, jinja2) is installed."""

from __future__ import annotations

import importlib.util

from jax_eplb._errors import EplbInputError

SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client", "jinja2")


def require_serve_extra() -> None:
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise EplbInputError(f"jax-eplb serve needs {', '.join(missing)}: pip install 'jax-eplb[serve]'")
