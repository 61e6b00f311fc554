"""Deprecated: `llama3.perplexity` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.eval.perplexity`.
"""

import warnings

from llama3.eval.perplexity import perplexity  # noqa: F401

warnings.warn(
    "llama3.perplexity is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2
)
