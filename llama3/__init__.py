"""llama3: a small, readable, pure-PyTorch implementation of the Llama 3 family.

import llama3
llm = llama3.Llama.from_pretrained("meta-llama/Llama-3.2-1B-Instruct")
llm.chat_completion([[{"role": "user", "content": "Hello!"}]])
"""

from llama3.chat_format import ChatFormat, ChatMLFormat
from llama3.config import ModelArgs, RopeScaling
from llama3.generation import Llama
from llama3.model import Transformer
from llama3.tokenizer import StreamDecoder, Tokenizer

__all__ = [
    "ChatFormat",
    "ChatMLFormat",
    "Llama",
    "ModelArgs",
    "RopeScaling",
    "StreamDecoder",
    "Tokenizer",
    "Transformer",
]
__version__ = "0.1.0"
