"""An OpenAI-compatible HTTP server: `protocol` (the request and response schemas), `engine` (continuous
batching over the static KV cache), `app` (the Starlette routes). Needs the `serve` extra.

    from llama3.serve import create_app, run
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DISCONNECT_POLL_S": "llama3.serve.app",
    "MAX_BODY_BYTES": "llama3.serve.app",
    "bind": "llama3.serve.app",
    "create_app": "llama3.serve.app",
    "run": "llama3.serve.app",
}


def __getattr__(name: str) -> Any:  # PEP 562: imported on first use, so the package itself imports nothing
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
