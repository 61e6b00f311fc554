"""llama3: a small, readable, pure-PyTorch implementation of the Llama 3 family.

import llama3
llm = llama3.Llama.from_pretrained("meta-llama/Llama-3.2-1B-Instruct")
llm.chat_completion([[{"role": "user", "content": "Hello!"}]])

The names below are imported on first use (PEP 562), so `import llama3` and the `llama3 --help`
command do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llama3.lazy import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "ChatFormat": "llama3.text.chat_format",
    "ChatMLFormat": "llama3.text.chat_format",
    "JinjaChatFormat": "llama3.text.template",
    "Llama": "llama3.generate.llama",
    "ModelArgs": "llama3.model.config",
    "RopeScaling": "llama3.model.config",
    "SamplingParams": "llama3.generate.params",
    "StreamDecoder": "llama3.text.tokenizer",
    "Tokenizer": "llama3.text.tokenizer",
    "Transformer": "llama3.model.transformer",
    "default_model": "llama3.weights.hub",
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
    from llama3.generate.llama import Llama
    from llama3.generate.params import SamplingParams
    from llama3.model.config import ModelArgs, RopeScaling
    from llama3.model.transformer import Transformer
    from llama3.text.chat_format import ChatFormat, ChatMLFormat
    from llama3.text.template import JinjaChatFormat
    from llama3.text.tokenizer import StreamDecoder, Tokenizer
    from llama3.weights.hub import default_model


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
