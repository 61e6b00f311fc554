"""Tool calls in a model's answer: which form a chat template asks for, and the calls read back from the text.

Two forms, as the templates that take `tools` ask for them:
- "json" (Llama 3.1, 3.2, 3.3 and Llama 4's templates, Meta's prompt format for custom tools): the answer is
  `{"name": function name, "parameters": {...}}`, possibly after `<|python_tag|>`; several calls are separated
  by `;` (Meta's llama-models `ToolUtils`) or by whitespace.
- "hermes" (Hermes, Qwen 2.5 and the many templates that copied them): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, text before the first one is content.

A call that does not parse gives None, and the caller returns the text as it is: an answer is never dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

ToolCallStyle = Literal["json", "hermes"]

PYTHON_TAG = "<|python_tag|>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tool_call_style(template: str) -> ToolCallStyle:
    """The form of tool call a chat template asks the model for."""
    return "hermes" if "<tool_call>" in template else "json"


@dataclass
class ParsedToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


def call_prefix(style: ToolCallStyle, name: str) -> str:
    """The text a call to `name` starts with, up to its arguments (what a forcing grammar writes)."""
    if style == "hermes":
        return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": '
    return f'{{"name": {json.dumps(name)}, "parameters": '


def call_suffix(style: ToolCallStyle) -> str:
    return "}\n</tool_call>" if style == "hermes" else "}"


def may_start_call(text: str, style: ToolCallStyle) -> bool | None:
    """Whether an answer beginning with `text` is a tool call: True, False, or None while it cannot yet be told
    (only whitespace, or a prefix of the opening marker)."""
    head = text.lstrip()
    if not head:
        return None
    opens = ("<tool_call>",) if style == "hermes" else (PYTHON_TAG, "{")
    if any(head.startswith(o) for o in opens):
        return True
    if any(o.startswith(head) for o in opens):
        return None
    return False


def _call(obj: Any, key: str) -> ParsedToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get(key, obj.get("parameters" if key == "arguments" else "arguments", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict) or set(obj) - {"name", "parameters", "arguments", "type"}:
        return None
    return ParsedToolCall(obj["name"], args)


def parse_tool_calls(text: str, style: ToolCallStyle) -> tuple[str, list[ParsedToolCall]] | None:
    """(content before the calls, the calls) if `text` is one or more tool calls in `style`, else None."""
    if style == "hermes":
        found = list(_HERMES.finditer(text))
        if not found or text[found[-1].end() :].strip():
            return None
        gaps = [text[a.end() : b.start()] for a, b in zip(found, found[1:], strict=False)]
        if any(g.strip() for g in gaps):
            return None
        calls = []
        for m in found:
            try:
                call = _call(json.loads(m.group(1)), "arguments")
            except json.JSONDecodeError:
                return None
            if call is None:
                return None
            calls.append(call)
        return text[: found[0].start()].strip(), calls
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    decoder, pos, calls = json.JSONDecoder(), 0, []
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return None
        call = _call(obj, "parameters")
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
            pos += 1
    return ("", calls) if calls else None
