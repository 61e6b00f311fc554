"""Deprecated: `llama3.gguf_quants` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.quant.ggml`.
"""

import warnings

from llama3.quant.ggml import (  # noqa: F401
    BLOCK_BYTES,
    GGML_TYPES,
    INT4_BLOCKS,
    QK_K,
    SUPPORTED_TYPES,
    GGUFError,
    dequantize,
    quantized_codes,
)

warnings.warn(
    "llama3.gguf_quants is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2
)
