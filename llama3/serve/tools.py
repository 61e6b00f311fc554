"""Tool calling and structured output for `/v1/chat/completions`: the request fields (`tools`, `tool_choice`,
`response_format`, and `tool_calls` / `tool_call_id` in messages), the prompt rendered with the tools through
the checkpoint's Jinja template, the grammar that forces a call or a JSON answer, and the answer turned into
OpenAI's `tool_calls` (whole, or as streamed deltas).

- `tools` are rendered by the chat template exactly as transformers' `apply_chat_template(messages, tools=...)`
  renders them; a model whose template does not take tools gets a 400 naming `tools`. Assistant messages' tool
  calls go back to the template with their `arguments` as a JSON object (Llama 3.1's template writes them with
  `tojson`; vLLM hands them over the same way), `tool` messages with their `tool_call_id`.
- `tool_choice`: "none" renders no tools and reads no calls; "auto" (the default with tools) reads the answer
  as calls when all of it parses as calls (`llama3.text.tool_calls`), else returns it as text; "required" and a
  named function force a call with a grammar (one of the tools, or that one), with its `parameters` schema.
- `response_format`: `{"type": "json_object"}` (any JSON object) or `{"type": "json_schema", "json_schema":
  {"name", "schema"}}`: the answer is forced by a grammar (`llama3.generate.grammar`) to be JSON valid against
  the schema; it parses, unless the token budget ends it first (`finish_reason: "length"`).

While streaming with tools, an answer that starts like a call (`{`, `<|python_tag|>` or `<tool_call>`) is held
back until it ends: then it is sent as tool-call deltas (the call's id, type and name, then its arguments, as
OpenAI sends them) if it parses, else as content. Any other answer streams as it comes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from llama3.checks import ParamError
from llama3.generate.grammar import ANY_OBJECT, Constraint, grammars_for
from llama3.serve.protocol import NamedToolChoice, RequestError, ResponseFunctionCall, ToolCall
from llama3.text.template import JinjaChatFormat
from llama3.text.tool_calls import (
    ParsedToolCall,
    ToolCallStyle,
    call_prefix,
    call_suffix,
    may_start_call,
    parse_tool_calls,
    tool_call_style,
)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _tool_calls(calls: list[ParsedToolCall]) -> list[ToolCall]:
    return [
        ToolCall(id=_call_id(), function=ResponseFunctionCall(name=c.name, arguments=json.dumps(c.arguments)))
        for c in calls
    ]


# -- one request -----------------------------------------------------------------------------------------


def _template_message(m) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                arguments = json.loads(c.function.arguments)
            except json.JSONDecodeError:
                arguments = c.function.arguments  # as sent: the template writes what it is given
            calls.append({"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
        if m.content is None:
            del out["content"]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


@dataclass
class ChatPlan:
    """What `tools`, `tool_choice` and `response_format` ask of one chat request: the prompt's format and tools,
    a grammar for each choice, and how to read each answer."""

    llm: Any
    req: Any
    chat_format: Any = None
    tools: list[dict[str, Any]] | None = None
    style: ToolCallStyle | None = None  # set: the answer is read for tool calls
    forced: bool = False  # a call is forced by the grammar (tool_choice "required" or a named function)
    grammar: Any = None
    _streams: dict[int, _HeldBack] = field(default_factory=dict)

    @classmethod
    def of(cls, llm, req) -> ChatPlan:
        """The plan, checked: RequestError names the field that cannot be served."""
        plan = cls(llm, req, llm.chat_format)
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
        if choice != "none" and not req.tools:
            raise RequestError("tool_choice: needs tools", param="tool_choice")
        names = [t.function.name for t in req.tools or []]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            msg = f"tool_choice: no tool named {choice.function.name!r} in tools ({', '.join(names)})"
            raise RequestError(msg, param="tool_choice")
        if len(set(names)) != len(names):
            raise RequestError("tools: function names must be different", param="tools")
        uses_template = choice != "none" or any(m.tool_calls or m.tool_call_id for m in req.messages)
        if uses_template:
            fmt = plan.chat_format
            template = getattr(fmt, "template", None) or llm.tokenizer.chat_template
            if choice != "none" and (not isinstance(template, str) or "tools" not in template):
                raise RequestError(
                    "tools: this model's chat template does not take tools", param="tools", code="unsupported_parameter"
                )
            if isinstance(template, str) and not isinstance(fmt, JinjaChatFormat):
                plan.chat_format = JinjaChatFormat(llm.tokenizer, template)
        if choice != "none":
            plan.tools = [t.model_dump(exclude_none=True) for t in req.tools]
            plan.style = tool_call_style(plan.chat_format.template)
        fmt = req.response_format
        try:
            grammars = None
            if fmt is not None and fmt.type != "text" or choice in ("required",) or isinstance(choice, NamedToolChoice):
                grammars = grammars_for(llm.tokenizer, llm.model.args.vocab_size)
            if choice == "required" or isinstance(choice, NamedToolChoice):
                if fmt is not None and fmt.type != "text":
                    msg = "response_format: cannot be combined with a forced tool call (tool_choice)"
                    raise RequestError(msg, param="response_format")
                plan.forced = True
                wanted = [t for t in req.tools if choice == "required" or t.function.name == choice.function.name]
                plan.grammar = grammars.sequence(
                    [
                        [
                            call_prefix(plan.style, t.function.name),
                            t.function.parameters or ANY_OBJECT,
                            call_suffix(plan.style),
                        ]
                        for t in wanted
                    ]
                )
            elif fmt is not None and fmt.type != "text":
                schema = fmt.json_schema.schma if fmt.type == "json_schema" else None
                plan.grammar = grammars.json(schema)
        except ImportError as e:
            where = "response_format" if fmt else "tool_choice"
            raise RequestError(f"{where}: {e}", param=where, code="unsupported_parameter") from None
        except ParamError as e:
            where = "tools" if plan.forced else "response_format"
            raise RequestError(f"{where}: {e.problem}", param=where) from None
        return plan

    def encode(self) -> list[int]:
        messages = [_template_message(m) for m in self.req.messages]
        if isinstance(self.chat_format, JinjaChatFormat):
            return self.chat_format.encode_dialog_prompt(messages, tools=self.tools)
        return self.chat_format.encode_dialog_prompt(messages)

    def constraint(self, stop_tokens: list[int]) -> Constraint | None:
        return None if self.grammar is None else Constraint(self.grammar, stop_tokens)

    # -- the answer ----------------------------------------------------------------------------------

    def message(self, choice) -> tuple[dict[str, Any], str | None]:
        """The assistant message of a whole answer, and its finish reason ("tool_calls" when it is calls)."""
        text, finish_reason = choice.text, choice.finish_reason
        parsed = parse_tool_calls(text, self.style) if self.style is not None and finish_reason == "stop" else None
        if parsed is None:
            return {"role": "assistant", "content": text}, finish_reason
        content, calls = parsed
        return {"role": "assistant", "content": content or None, "tool_calls": _tool_calls(calls)}, "tool_calls"

    def stream(self, index: int, text: str, finish_reason: str | None) -> tuple[str, list[dict], str | None]:
        """For a streamed choice: (content to send now, tool-call deltas to send, finish reason)."""
        if self.style is None:
            return text, [], finish_reason
        held = self._streams.setdefault(index, _HeldBack(self.style, self.forced))
        text = held.push(text)
        if finish_reason is None:
            return text, [], None
        parsed = parse_tool_calls(held.buffer, self.style) if finish_reason == "stop" and held.holding else None
        if parsed is None:
            return text + held.buffer, [], finish_reason
        content, calls = parsed
        deltas = []
        for i, call in enumerate(_tool_calls(calls)):
            head = {
                "index": i,
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": ""},
            }
            deltas += [head, {"index": i, "function": {"arguments": call.function.arguments}}]
        return text + content, deltas, "tool_calls"


class _HeldBack:
    """A streamed answer's text, held back from the moment it looks like a tool call."""

    def __init__(self, style: ToolCallStyle, forced: bool):
        self.style, self.buffer = style, ""
        self.holding: bool | None = True if forced else None  # None: cannot yet tell

    def push(self, text: str) -> str:
        if self.holding is False:
            return text
        self.buffer += text
        if self.holding is None:
            self.holding = may_start_call(self.buffer, self.style)
            if self.holding is False:
                out, self.buffer = self.buffer, ""
                return out
        return ""
