"""Deprecated: `llama3.backends` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.model.backends`.
"""

import warnings

from llama3.model.backends import BACKENDS, TorchOps, TritonOps, get_ops, triton_missing  # noqa: F401

warnings.warn(
    "llama3.backends is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2
)
