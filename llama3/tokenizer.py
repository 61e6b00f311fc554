"""Deprecated: `llama3.tokenizer` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.text.tokenizer`, `llama3.text.bpe`.
"""

import warnings

from llama3.text.bpe import GPT2_PAT_STR, TokenizerError, bytes_to_unicode, without_missing_bytes  # noqa: F401
from llama3.text.tokenizer import (  # noqa: F401
    LLAMA3_PAT_STR,
    MAX_ENCODE_CHARS,
    MAX_RUN_CHARS,
    NUM_SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    llama3_special_token_names,
    load_tiktoken_ranks,
)

warnings.warn(
    "llama3.tokenizer is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2
)
