"""Deprecated: `llama3.speculative` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.generate.speculative`.
"""

import warnings

from llama3.generate.speculative import ModelDrafter, PromptLookupDrafter, prompt_lookup, speculative_decode, verify  # noqa: F401

warnings.warn(
    "llama3.speculative is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2
)
