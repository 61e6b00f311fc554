"""The OpenAI HTTP API's request and response bodies, as pydantic models (the schemas only: no serving logic).

Requests are checked here, field by field, so that a bad value becomes an OpenAI-style 400 body naming the
field (`error_body`, `validation_error_body`) before anything reaches the model. Fields OpenAI defines that
this server does not implement (audio, prediction, ...) are refused by name when set, rather
than silently ignored (`UNSUPPORTED`, unless the request's own schema has the field: `echo` and `best_of` are
served on /v1/completions, not on chat). A field OpenAI does not define is refused too, as OpenAI's server refuses it
("Unrecognized request argument supplied"): a typo such as `max_token` must not run to the full context.
Only the top level of a request is checked so; message objects may carry other fields (an assistant message
sent back as the client received it has `refusal`, `tool_calls`, ...).

Extensions (sent by the official client through `extra_body`): `EXTENSIONS`, that is the sampling knobs
beyond OpenAI's (`top_k`, `min_p`, ...: the `SamplingParams` fields marked `extension`) and
`return_token_ids` (each choice then carries the generated `token_ids`, and the response the
`prompt_token_ids`), as vLLM offers them.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from llama3.checks import ParamError
from llama3.generate.grammar import check_json_schema
from llama3.generate.params import SamplingParams, check_seed

MAX_N = 16  # choices per request; each takes a row of the batch


MAX_STOP = 4  # OpenAI's limit on stop strings


# request fields beyond OpenAI's API (vLLM's names): the sampling knobs marked so, and return_token_ids
EXTENSIONS = (*(f.name for f in fields(SamplingParams) if f.metadata["extension"]), "return_token_ids")


class OpenAIModel(BaseModel):
    # strict: JSON types as sent ("0.5" is not a number, 1 is not true), as OpenAI's own server checks them
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


# -- tools and structured output (served by llama3.serve.tools) --


def _json_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON Schema field (a function's `parameters`, a `response_format`'s `schema`), checked by jsonschema."""
    if schema is not None:
        try:
            check_json_schema(schema)
        except ParamError as e:
            raise ValueError(e.problem.removeprefix("json_schema ")) from None
    return schema


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _check_parameters = field_validator("parameters")(classmethod(lambda cls, schema: _json_schema(schema)))


class ToolDefinition(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(OpenAIModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schma: dict[str, Any] | None = Field(default=None, alias="schema")  # `schema` shadows a BaseModel attribute
    strict: bool | None = None

    _check_schema = field_validator("schma")(classmethod(lambda cls, schema: _json_schema(schema)))


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(default=None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _check(cls, value: JsonSchemaFormat | None, info) -> JsonSchemaFormat | None:
        kind = info.data.get("type")
        if kind == "json_schema" and value is None:
            raise ValueError('is required when type is "json_schema"')
        if kind != "json_schema" and value is not None:
            raise ValueError('is only allowed when type is "json_schema"')
        return value


class FunctionCall(OpenAIModel):
    name: str
    arguments: str


class MessageToolCall(OpenAIModel):
    """A tool call in an assistant message sent back (as the client received it)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls, sent back
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(OpenAIModel):
    include_usage: bool = False


# Fields of OpenAI's API that change what the model must do; refused when set, so a client never gets an
# answer that silently ignored them (penalties of 0 and the like, the defaults, are accepted).
UNSUPPORTED = {
    "functions": None,
    "function_call": None,
    "audio": None,
    "prediction": None,
    "suffix": None,
    "best_of": 1,
    "echo": False,
    "modalities": ["text"],
    "reasoning_effort": None,
    "verbosity": None,
    "web_search_options": None,
    "moderation": None,
}


# Fields of OpenAI's API that do not change the answer (bookkeeping on OpenAI's side): accepted and dropped.
IGNORED = (
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
    "safety_identifier",
    "parallel_tool_calls",  # several calls in one answer are always read
    *UNSUPPORTED,  # checked by `parse_request` before the model sees the body
)


class SamplingRequest(OpenAIModel):
    """What chat and text completions share. Any other top-level field is refused by name (extra="forbid")."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1)  # extension (vLLM's)
    # further extensions: each a `SamplingParams` field, checked there (a 400 naming the field)
    min_p: float | None = None
    repetition_penalty: float | None = None
    # OpenAI's, checked by `SamplingParams` too (presence / frequency in [-2, 2], biases in [-100, 100])
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None  # {"token id": bias}; JSON keys are strings
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None  # checked by the library's own rule (`check_seed`), as the CLI's --seed is
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool = False  # extension (vLLM's)

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if k not in IGNORED or k in cls.model_fields}

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, seed: int | None) -> int | None:
        try:
            check_seed(seed)
        except ParamError as e:
            raise ValueError(e.problem.replace(" or None", "")) from None  # JSON's null: the field left out
        return seed

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return options

    @property
    def stop_strings(self) -> list[str]:
        return self.stop or []  # the validator made a list of a string

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def samples(self) -> int:
        """Sequences generated per prompt (`best_of` of them for completions; `n` are returned)."""
        return self.n


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs set to true")
        return top

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def n_logprobs(self) -> int | None:
        """None: no logprobs; else how many alternatives per token (0: the chosen token's alone)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    # a string, a list of strings, a list of token ids, or a list of token-id lists: one choice set per prompt
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions; 0 only with echo
    logprobs: int | None = Field(default=None, ge=0, le=5)
    # the prompt returned before the answer, with its tokens' logprobs when `logprobs` is set (the first: null)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)  # sample best_of, return the n likeliest

    @model_validator(mode="after")
    def _check_echo_and_best_of(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: must be >= 1 (0 only with echo: the prompt scored, nothing generated)")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of: must be >= n ({self.n}), got {self.best_of}")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of: cannot be used with stream (the best are known only at the end)")
        return self

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("must not be an empty list")
        if isinstance(prompt, list) and any(isinstance(p, list) and not p for p in prompt):
            raise ValueError("a token-id prompt must not be empty")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [list(p)]  # one prompt of token ids
        return list(p)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def n_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def samples(self) -> int:
        return self.best_of or self.n


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token (an echoed prompt's first: null)."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llama3"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _param_name(loc: tuple) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'; pydantic's union branch names are dropped."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "list[TextPart]", "function-after"):
            continue
        elif part == "NamedToolChoice" or str(part).startswith("literal["):  # tool_choice's union branches
            continue
        elif not name:
            name = str(part)
        else:
            name += f".{part}"
    return name or None


def validation_error_body(error: ValidationError) -> dict[str, Any]:
    """The first problem of a pydantic ValidationError as a 400 body naming the field (never the input's value
    beyond what the client sent, never a path or traceback)."""
    errors = error.errors(include_url=False, include_context=False, include_input=False)
    # an unknown field first: a misspelt `max_token` explains a missing or defaulted field better than any other
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    param = _param_name(tuple(first["loc"]))
    msg, code = first["msg"].removeprefix("Value error, "), "invalid_value"
    if param is None and re.match(r"\w+: ", msg):  # a check across fields names the one at fault first
        param, msg = msg.split(": ", 1)
    if first["type"] == "missing":
        msg = "is a required field"
    elif first["type"] == "extra_forbidden":
        msg = f"unrecognized request argument (this server's extensions to OpenAI's API: {', '.join(EXTENSIONS)})"
        code = "unknown_parameter"
    return error_body(f"{param}: {msg}" if param else msg, param=param, code=code)


class RequestError(ValueError):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status
        self.type = {401: "authentication_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.type, self.param, self.code)


def parse_request(cls: type[SamplingRequest], raw: bytes) -> SamplingRequest:
    """A request body (JSON bytes) checked against `cls`; RequestError names the first bad field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(
            f"the body is not valid JSON ({getattr(e, 'msg', 'not UTF-8')})", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise RequestError(f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    for key, default in UNSUPPORTED.items():
        if key in cls.model_fields:  # served by this kind of request (echo, best_of: completions)
            continue
        value = data.get(key)
        if value in (None, default, {}, []) or (key == "tool_choice" and value in ("none", "auto")):
            continue  # not set, or set to what this server does anyway (some clients always send these)
        raise RequestError(f"{key}: not supported by this server", param=key, code="unsupported_parameter")
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        body = validation_error_body(e)["error"]
        raise RequestError(body["message"], param=body["param"], code=body["code"]) from None
