"""Deprecated: `llama3.gguf` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.weights.gguf`, `llama3.weights.gguf_tokenizer`.
"""

import warnings

from llama3.weights.gguf import (  # noqa: F401
    SMOLLM2_GGUF,
    find_smollm2_gguf,
    iter_gguf_state_dict,
    load_gguf_state_dict,
    read_gguf_config,
)
from llama3.weights.gguf_tokenizer import load_gguf_tokenizer  # noqa: F401

warnings.warn("llama3.gguf is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2)
