"""An OpenAI-compatible HTTP server: `protocol` (the request and response schemas), `engine` (continuous
batching over the static KV cache), `app` (the Starlette routes). Needs the `serve` extra.

    from llama3.serve import create_app, run
"""

from __future__ import annotations

from llama3.lazy import lazy_exports

_EXPORTS = {
    "DISCONNECT_POLL_S": "llama3.serve.app",
    "MAX_BODY_BYTES": "llama3.serve.app",
    "bind": "llama3.serve.app",
    "create_app": "llama3.serve.app",
    "run": "llama3.serve.app",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)  # the names load on first use
