"""llama3: a small, readable, pure-PyTorch implementation of the Llama 3 family.

import llama3
llm = llama3.Llama.from_pretrained("meta-llama/Llama-3.2-1B-Instruct")
llm.chat_completion([[{"role": "user", "content": "Hello!"}]])

The names below are imported on first use (PEP 562), so `import llama3` and the `llama3 --help`
command do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ChatFormat": "llama3.chat_format",
    "ChatMLFormat": "llama3.chat_format",
    "JinjaChatFormat": "llama3.chat_format",
    "Llama": "llama3.generation",
    "ModelArgs": "llama3.config",
    "RopeScaling": "llama3.config",
    "SamplingParams": "llama3.config",
    "StreamDecoder": "llama3.tokenizer",
    "Tokenizer": "llama3.tokenizer",
    "Transformer": "llama3.model",
    "default_model": "llama3.checkpoint",
}
__all__ = [  # the keys of _EXPORTS, spelled out for linters and type checkers
    "ChatFormat",
    "ChatMLFormat",
    "JinjaChatFormat",
    "Llama",
    "ModelArgs",
    "RopeScaling",
    "SamplingParams",
    "StreamDecoder",
    "Tokenizer",
    "Transformer",
    "default_model",
]

if TYPE_CHECKING:
    from llama3.chat_format import ChatFormat, ChatMLFormat, JinjaChatFormat
    from llama3.checkpoint import default_model
    from llama3.config import ModelArgs, RopeScaling, SamplingParams
    from llama3.generation import Llama
    from llama3.model import Transformer
    from llama3.tokenizer import StreamDecoder, Tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama3' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
