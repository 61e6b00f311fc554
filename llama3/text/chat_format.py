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

import re
from collections.abc import Mapping, Sequence
from typing import Literal

from llama3.text.template import JinjaChatFormat
from llama3.text.tokenizer import Tokenizer, TokenizerError

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
