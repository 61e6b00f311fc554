"""Chat prompts as token ids: Llama 3's header format, and ChatML (SmolLM2 and other small models).

A message is `{"role": ..., "content": ...}`. Message content is user text: special-token text inside it
("<|eot_id|>" typed by a user) is encoded as plain text, so a message cannot forge a turn boundary.
The control tokens come only from the format itself. Because of that, `encode_dialog_prompt(m)` equals
`tokenizer.encode(format_dialog_prompt(m), allowed_special="all")` only for content with no
special-token text in it; the token ids are what the model sees, the string is for display and for
comparing with a Jinja chat template.

`JinjaChatFormat` renders a checkpoint's own Jinja chat template (tokenizer_config.json's `chat_template`, a
GGUF's `tokenizer.chat_template`) as transformers' `apply_chat_template` does, in jinja2's sandbox, keeping
the same rule: special-token text inside messages stays plain text. `chat_format_for` picks between them.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from llama3.tokenizer import Tokenizer, TokenizerError

Message = Mapping[str, str]


def _validate(messages: Sequence[Message], roles: tuple[str, ...]) -> None:
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"a dialog is a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("a dialog needs at least one message")
    for i, message in enumerate(messages):
        _validate_message(message, roles, where=f"message {i}")


def _validate_message(
    message: Message,
    roles: tuple[str, ...],
    where: str = "message",
    keys: tuple[str, ...] = ("role", "content"),
) -> None:
    if not isinstance(message, Mapping):
        raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}")
    for key in keys:
        if key not in message:
            raise ValueError(f"{where}: missing {key!r} (got keys {sorted(message)})")
        if not isinstance(message[key], str):
            raise ValueError(f"{where}: {key!r} must be a str, got {type(message[key]).__name__}")
    if message["role"] not in roles:
        raise ValueError(f"{where}: unknown role {message['role']!r}; expected one of {', '.join(roles)}")


class ChatFormat:
    """Llama 3's chat format (meta-llama/llama3 `ChatFormat`), as the Instruct models were trained on:

    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>...
    <|start_header_id|>assistant<|end_header_id|>\\n\\n
    """

    roles = ("system", "user", "assistant", "ipython")

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.start_header_id = tokenizer.special_id("<|start_header_id|>")
        self.end_header_id = tokenizer.special_id("<|end_header_id|>")
        self.eot_id = tokenizer.special_id("<|eot_id|>")
        if tokenizer.bos_id < 0:
            raise TokenizerError(f"{tokenizer.name}: the Llama 3 chat format needs a bos token")

    @property
    def stop_tokens(self) -> list[int]:
        """The tokenizer's stop tokens, plus <|eot_id|>, which ends every assistant turn."""
        return sorted({*self.tokenizer.stop_tokens, self.eot_id})

    def encode_header(self, message: Message) -> list[int]:
        """<|start_header_id|>{role}<|end_header_id|>\\n\\n"""
        _validate_message(message, self.roles, keys=("role",))
        role = self.tokenizer.encode(message["role"])
        return [self.start_header_id, *role, self.end_header_id, *self.tokenizer.encode("\n\n")]

    def encode_message(self, message: Message) -> list[int]:
        """The header, the stripped content as plain text, then <|eot_id|>."""
        _validate_message(message, self.roles)
        return [*self.encode_header(message), *self.tokenizer.encode(message["content"].strip()), self.eot_id]

    def encode_dialog_prompt(self, messages: Sequence[Message]) -> list[int]:
        """<|begin_of_text|>, every message, then the assistant header the model continues from."""
        _validate(messages, self.roles)
        ids = [self.tokenizer.bos_id]
        for message in messages:
            ids += self.encode_message(message)
        return ids + self.encode_header({"role": "assistant"})

    def format_dialog_prompt(self, messages: Sequence[Message]) -> str:
        """The same prompt as text (what the official Jinja template renders)."""
        _validate(messages, self.roles)
        turns = "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
        )
        return f"<|begin_of_text|>{turns}<|start_header_id|>assistant<|end_header_id|>\n\n"


class ChatMLFormat:
    """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`.

    Content is not stripped. With `default_system` set, a dialog that does not open with a system
    message gets one (SmolLM2's template does this). No <|begin_of_text|>-like token is added unless
    the tokenizer's chat template uses `bos_token`.
    """

    roles = ("system", "user", "assistant", "tool")

    def __init__(self, tokenizer: Tokenizer, default_system: str | None = None):
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.im_start_id = tokenizer.special_id("<|im_start|>")
        self.im_end_id = tokenizer.special_id("<|im_end|>")
        template = tokenizer.chat_template or ""
        self.add_bos = "bos_token" in template and tokenizer.bos_id >= 0

    @property
    def stop_tokens(self) -> list[int]:
        """<|im_end|>, plus the tokenizer's eos."""
        eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id >= 0 else []
        return sorted({self.im_end_id, *eos})

    def encode_header(self, message: Message) -> list[int]:
        """<|im_start|>{role}\\n"""
        _validate_message(message, self.roles, keys=("role",))
        return [self.im_start_id, *self.tokenizer.encode(f"{message['role']}\n")]

    def encode_message(self, message: Message) -> list[int]:
        """The whole turn. Role, newline and content are one text segment, as a template renders it:
        encoding them apart could split whitespace at the content's start differently."""
        _validate_message(message, self.roles)
        text = self.tokenizer.encode(f"{message['role']}\n{message['content']}")
        return [self.im_start_id, *text, self.im_end_id, *self.tokenizer.encode("\n")]

    def encode_dialog_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Every message (after the default system message, if any), then `<|im_start|>assistant\\n`."""
        ids = [self.tokenizer.bos_id] if self.add_bos else []
        for message in self._with_default_system(messages):
            ids += self.encode_message(message)
        return ids + self.encode_header({"role": "assistant"})

    def format_dialog_prompt(self, messages: Sequence[Message]) -> str:
        """The same prompt as text."""
        bos = self.tokenizer.decode([self.tokenizer.bos_id]) if self.add_bos else ""
        turns = "".join(
            f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in self._with_default_system(messages)
        )
        return f"{bos}{turns}<|im_start|>assistant\n"

    def _with_default_system(self, messages: Sequence[Message]) -> list[Message]:
        _validate(messages, self.roles)
        if self.default_system is not None and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.default_system}, *messages]
        return list(messages)


# In a ChatML template, the system message it inserts when the dialog has none; SmolLM2's reads
# `{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n' }}`.
# The newline may be a real one or Jinja's `\\n` escape.
_TEMPLATE_DEFAULT_SYSTEM = re.compile(r"""['"]<\|im_start\|>system(?:\n|\\n)([^'"<]+)<\|im_end\|>""")


def builtin_chat_format(tokenizer: Tokenizer) -> ChatFormat | ChatMLFormat:
    """The chat format a tokenizer's vocabulary (and chat template, if it has one) calls for.

    ChatML when the vocabulary has <|im_start|> and the template, if any, uses it; the default system
    message is read from the template. Llama 3's format when the vocabulary has <|start_header_id|>.
    """
    template = tokenizer.chat_template
    if "<|im_start|>" in tokenizer.special_tokens and (template is None or "<|im_start|>" in template):
        found = _TEMPLATE_DEFAULT_SYSTEM.search(template or "")
        return ChatMLFormat(tokenizer, default_system=found.group(1) if found else None)
    if "<|start_header_id|>" in tokenizer.special_tokens:
        return ChatFormat(tokenizer)
    raise TokenizerError(
        f"no supported chat format for {tokenizer.name}: its vocabulary has neither <|start_header_id|> "
        "(Llama 3) nor <|im_start|> (ChatML)"
    )


# ---------------------------------------------------------------------------------------------------
# A checkpoint's own Jinja chat template
# ---------------------------------------------------------------------------------------------------

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


# Templates the hand-written formats reproduce exactly (tests/test_chat_template.py renders both over
# many dialogs and compares text and ids with transformers): with chat_template="auto" these use the
# hand-written format, every other template is rendered.
KNOWN_TEMPLATES: dict[str, Literal["llama3", "chatml"]] = {
    # meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json
    (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ): "llama3",
    # HuggingFaceTB/SmolLM2-*-Instruct (and the embedded GGUF's tokenizer.chat_template)
    (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
        "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ): "chatml",
}

CHAT_TEMPLATE_CHOICES = ("auto", "builtin", "jinja")


def chat_format_for(
    tokenizer: Tokenizer, chat_template: Literal["auto", "builtin", "jinja"] = "auto"
) -> ChatFormat | ChatMLFormat | JinjaChatFormat:
    """The chat format for a tokenizer.

    "builtin": the hand-written format its vocabulary calls for (`builtin_chat_format`). "jinja": the
    checkpoint's own template (an error if it has none). "auto": the hand-written format when the
    checkpoint has no template or one of `KNOWN_TEMPLATES` (which it reproduces exactly), else the template.
    """
    if chat_template not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATE_CHOICES)}, got {chat_template!r}")
    template = tokenizer.chat_template
    if chat_template == "builtin" or (chat_template == "auto" and (template is None or template in KNOWN_TEMPLATES)):
        return builtin_chat_format(tokenizer)
    return JinjaChatFormat(tokenizer)
