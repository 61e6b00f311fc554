"""Deprecated: `llama3.chat_format` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.text.chat_format`,
`llama3.text.template`.
"""

import warnings

from llama3.text.chat_format import (  # noqa: F401
    CHAT_TEMPLATE_CHOICES,
    KNOWN_TEMPLATES,
    ChatFormat,
    ChatMLFormat,
    Message,
    builtin_chat_format,
    chat_format_for,
)
from llama3.text.template import ChatTemplateError, ControlTokenEncoder, JinjaChatFormat  # noqa: F401

warnings.warn(
    "llama3.chat_format is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2
)
