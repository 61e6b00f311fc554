"""Deprecated: `llama3.generation` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.generate.llama`,
`llama3.generate.sampling`,
`llama3.generate.step`,
`llama3.generate.stream`.
"""

import warnings

from llama3.generate.llama import Dialog, Llama, Message  # noqa: F401
from llama3.generate.sampling import draw, sample, sampling_probs  # noqa: F401
from llama3.generate.step import DecodeStep, attention_window, compiled_block  # noqa: F401
from llama3.generate.stream import TextStream  # noqa: F401

warnings.warn(
    "llama3.generation is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2
)
