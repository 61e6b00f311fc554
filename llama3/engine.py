"""Deprecated: `llama3.engine` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.serve.engine`.
"""

import warnings

from llama3.serve.engine import Engine, GenerationRequest, Output, QueueFull  # noqa: F401

warnings.warn("llama3.engine is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2)
