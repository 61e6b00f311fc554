from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from llama3.text.tokenizer import Tokenizer, TokenizerError

# Special-token text in the caller's strings is wrapped in these two private-use characters before the
# template runs, so that after rendering the template's own control tokens can be told from text that
# only looks like one. Any copy of them already in the input is dropped first.
_MARK_START, _MARK_END = "\U0010fffc", "\U0010fffd"


class ControlTokenEncoder:
    """Encodes a prompt assembled from trusted text (a template, a fixed prompt format) and untrusted strings
    (messages): special-token text in the trusted part becomes control tokens, in the untrusted part plain text.

    Untrusted strings go through `mark` before they are put into the prompt; `encode` then encodes the whole
    prompt, each stretch between two control tokens as one piece, as `tokenizer.encode(prompt,
    allowed_special="all")` would when no untrusted string holds special-token text.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)  # longest first: no prefix wins
        alternatives = "|".join(map(re.escape, specials)) or "(?!)"
        self._special_re = re.compile(alternatives)
        # A special token with a marker on either side came from the input (a template may have cut one
        # marker off by slicing); a lone marker is dropped, but still separates the text around it.
        self._pieces_re = re.compile(f"{_MARK_START}?({alternatives}){_MARK_END}?|[{_MARK_START}{_MARK_END}]")

    def mark(self, value: Any) -> Any:
        """`value` (a string, or dicts and lists of them) with each special-token text wrapped in markers."""
        if isinstance(value, str):
            value = value.replace(_MARK_START, "").replace(_MARK_END, "")
            return self._special_re.sub(lambda m: f"{_MARK_START}{m.group(0)}{_MARK_END}", value)
        if isinstance(value, Mapping):
            return {k: self.mark(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.mark(v) for v in value)
        return value

    def encode(self, text: str) -> list[int]:
        """Ids of `text` in which unmarked special-token text is a control token and marked text is plain."""
        ids: list[int] = []
        pending: list[str] = []  # plain text since the last control token, encoded as one piece
        pos = 0
        for m in self._pieces_re.finditer(text):
            pending.append(text[pos : m.start()])
            pos = m.end()
            token = m.group(1)
            if token is None:  # a lone marker
                continue
            if m.group(0) == token:  # no marker: trusted text wrote it
                ids += self.tokenizer.encode("".join(pending))
                ids.append(self.tokenizer.special_tokens[token])
                pending = []
            else:
                pending.append(token)
        pending.append(text[pos:])
        return ids + self.tokenizer.encode("".join(pending))


class ChatTemplateError(ValueError):
    """A chat template that does not compile or raises while rendering (its own `raise_exception` too)."""


class JinjaChatFormat:
    """A checkpoint's Jinja chat template, rendered the way transformers' `apply_chat_template` renders it.

    The environment is jinja2's `ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`, the
    `loopcontrols` extension and transformers' additions: `raise_exception`, `strftime_now`, a `tojson`
    that does not escape HTML, and a `namespace` that refuses underscore names. The template sees
    `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's `bos_token`, `eos_token`,
    `pad_token`, `unk_token` (where it has them) and any extra keyword arguments. A sandboxed template
    cannot read files, import modules or reach Python internals; the messages reach it as plain dicts,
    lists and strings.

    Token ids: the template's control tokens become special ids; special-token text that came from the
    messages (or tools, documents, extra arguments) is encoded as the plain text it is, so a user cannot
    forge a turn boundary. Everything between two control tokens is encoded as one piece, as
    `tokenizer.encode(rendered, allowed_special="all")` would encode it when no message holds such text.

    Stop tokens are the tokenizer's (generation_config.json's `eos_token_id`, or the GGUF's eos / eot /
    end-of-turn tokens) and its eos: a template's end-of-turn token is stopped at where the checkpoint
    lists it.
    """

    def __init__(self, tokenizer: Tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = tokenizer.chat_template if template is None else template
        if not isinstance(self.template, str):
            raise TokenizerError(f"{tokenizer.name} has no chat template (tokenizer_config.json 'chat_template')")
        self._compiled = _compile_template(self.template, tokenizer.name)
        self._encoder = ControlTokenEncoder(tokenizer)

    @property
    def stop_tokens(self) -> list[int]:
        """The tokenizer's stop tokens and its eos."""
        eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id >= 0 else []
        return sorted({*self.tokenizer.stop_tokens, *eos})

    def format_dialog_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The rendered template: the text transformers' `apply_chat_template(..., tokenize=False)` returns."""
        return self._render(messages, add_generation_prompt, tools, kwargs, mark=False)

    def encode_dialog_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """The token ids of the rendered template; special-token text from the input stays plain text."""
        return self._encoder.encode(self._render(messages, add_generation_prompt, tools, kwargs, mark=True))

    def _render(
        self, messages: Any, add_generation_prompt: bool, tools: Any, kwargs: dict[str, Any], mark: bool
    ) -> str:
        messages = _template_messages(messages)
        tools = None if tools is None else _plain(list(tools))
        extra = {k: _plain(v) for k, v in kwargs.items()}
        if mark:
            mark = self._encoder.mark
            messages, tools, extra = mark(messages), mark(tools), mark(extra)
        try:
            return self._compiled.render(
                messages=messages,
                tools=tools,
                documents=extra.pop("documents", None),
                add_generation_prompt=bool(add_generation_prompt),
                **{**self.tokenizer.template_tokens, **extra},
            )
        except Exception as e:  # the template's own raise_exception, a sandbox refusal, a type error in it
            raise ChatTemplateError(
                f"the chat template of {self.tokenizer.name} failed to render: {type(e).__name__}: {e}"
            ) from e


def _template_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain copies of the messages, checked: a list of dicts, each with a string 'role' and a 'content'
    (a string, a list of content parts, or a dict such as a tool's result; an assistant message with
    'tool_calls' may omit it). Keys whose
    value is None are dropped, as transformers drops them."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"a dialog is a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("a dialog needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        if not isinstance(message.get("role"), str):
            problem = "missing 'role'" if "role" not in message else "'role' must be a str"
            raise ValueError(f"message {i}: {problem} (got keys {sorted(message)})")
        if "content" not in message and "tool_calls" not in message:
            raise ValueError(f"message {i}: missing 'content' (got keys {sorted(message)})")
        if "content" in message and not isinstance(message["content"], (str, list, tuple, Mapping)):
            kind = type(message["content"]).__name__
            raise ValueError(f"message {i}: 'content' must be a str, a list of parts or a dict, got {kind}")
        out.append(_plain(message))
    return out


def _plain(value: Any) -> Any:
    """`value` rebuilt from JSON types only (str/int/float/bool/None, dict, list), as the template sees it:
    objects with methods of their own would be reachable from inside the sandbox. Anything else becomes a
    placeholder naming its type, as in transformers."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, str, int, float):  # subclasses (enums, numpy scalars) back to the base type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


@functools.lru_cache(maxsize=16)
def _compile_template(template: str, name: str):
    """The template compiled in transformers' sandboxed environment (see `JinjaChatFormat`)."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # a core dependency; only a broken install lacks it
        raise ImportError("chat templates need jinja2 (pip install 'jinja2>=3.1')") from e

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    class Namespace(jinja2.utils.Namespace):
        """jinja2's namespace, refusing names that start with '_' (a way towards Python internals)."""

        def __init__(*args: Any, **kwargs: Any):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for key in attrs:
                Namespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key: str, value: Any) -> None:
            Namespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key: Any) -> None:
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not store {key!r} on a namespace")

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
        # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want the JSON text as it is
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template of {name} does not compile: line {e.lineno}: {e.message}") from e
