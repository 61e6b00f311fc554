"""Deprecated: `llama3.protocol` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.serve.protocol`.
"""

import warnings

from llama3.serve.protocol import (  # noqa: F401
    EXTENSIONS,
    IGNORED,
    MAX_N,
    MAX_STOP,
    UNSUPPORTED,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ModelCard,
    ModelList,
    OpenAIModel,
    RequestError,
    SamplingRequest,
    StreamOptions,
    TextPart,
    TokenLogprob,
    TopLogprob,
    Usage,
    error_body,
    new_id,
    now,
    parse_request,
    validation_error_body,
)

warnings.warn(
    "llama3.protocol is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2
)
