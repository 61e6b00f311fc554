"""Tool calling and structured output: `tools` / `tool_choice` / `response_format` through the server (the official
`openai` client), `json_schema` in the library and `--json-schema` in the CLI.

References: transformers' `apply_chat_template(messages, tools=...)` for the prompt's token ids; PyPI `jsonschema`
for every structured answer; OpenAI's response shapes as the `openai` client parses them. Templates: the official
Llama 3.1 Instruct template (tests/test_chat_template.py writes it out from meta-llama/Llama-3.1-8B-Instruct's
tokenizer_config.json) and the Llama 4 template transformers ships (`transformers.models.llama4.processing_llama4`).
The server's model is the tiny random Llama with the real 128,256-token vocabulary and the Llama 3.1 template.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("starlette")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_chat_template import LLAMA31_TEMPLATE, hf_llama3_reference  # noqa: E402
from test_serve import API_KEY, NAME, Server, load  # noqa: E402

from llama3.serve.app import create_app  # noqa: E402
from llama3.text.template import JinjaChatFormat  # noqa: E402
from llama3.text.tool_calls import parse_tool_calls  # noqa: E402

LLAMA4_TEMPLATE = pytest.importorskip("transformers.models.llama4.processing_llama4").chat_template

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}}}},
}
TOOLS = [WEATHER, CLOCK]

# a schema a random model finishes well within its budget: enums, a boolean, a bounded integer, a short string
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "sure": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "tag": {"type": "string", "maxLength": 2},
    },
    "required": ["answer", "sure", "n", "tag"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tools_model(tiny_llama3, tmp_path_factory):
    """The tiny Llama 3 checkpoint with the Llama 3.1 chat template and a 1024-token context (its weights
    linked, not copied)."""
    src, _ = tiny_llama3
    d = tmp_path_factory.mktemp("tiny-llama3-tools")
    for f in src.iterdir():
        if f.name != "config.json":
            os.symlink(f, d / f.name)
    config = json.loads((src / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))  # room for the tools
    (d / "chat_template.jinja").write_text(LLAMA31_TEMPLATE)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return d


@pytest.fixture(scope="module")
def hf_tok():
    return hf_llama3_reference()  # converted once per session (test_chat_template, test_guard share it)


@pytest.fixture(scope="module")
def server(tools_model):
    app = create_app(load(tools_model), model_name=NAME, max_batch_size=4, max_queue=8, api_key=API_KEY)
    with Server(app) as s:
        yield s


def hf_ids(hf_tok, template: str, messages, tools) -> list[int]:
    out = hf_tok.apply_chat_template(
        messages, tools=tools, chat_template=template, add_generation_prompt=True, tokenize=True
    )
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


CONVERSATION = [
    {"role": "system", "content": "You call tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
    {"role": "user", "content": "And in Oslo?"},
]


def as_template_sees_it(messages):
    """OpenAI's messages as vLLM hands them to a template: tool-call arguments as JSON objects, no null content."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if "tool_calls" in m:
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


@pytest.mark.parametrize("template", [LLAMA31_TEMPLATE, LLAMA4_TEMPLATE], ids=["llama3.1", "llama4"])
def test_tools_render_as_transformers_renders_them(tools_model, hf_tok, template):
    from llama3.text.tokenizer import Tokenizer

    ours = JinjaChatFormat(Tokenizer.from_pretrained(tools_model), template)
    messages = as_template_sees_it(CONVERSATION)
    assert ours.encode_dialog_prompt(messages, tools=TOOLS) == hf_ids(hf_tok, template, messages, TOOLS)


def test_server_prompt_with_tools_and_tool_results_is_transformers(server, hf_tok):
    """The whole path: OpenAI's messages (arguments as JSON text, a tool result) -> the prompt's token ids."""
    messages = CONVERSATION
    r = server.client().chat.completions.create(
        model=NAME, messages=messages, tools=TOOLS, max_tokens=1, temperature=0, extra_body={"return_token_ids": True}
    )
    want = hf_ids(hf_tok, LLAMA31_TEMPLATE, as_template_sees_it(messages), TOOLS)
    assert r.model_extra["prompt_token_ids"] == want


def check_call(call, tools=TOOLS):
    spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])
    assert call.type == "function" and call.id.startswith("call_")


def test_required_tool_choice_forces_a_valid_call(server):
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    for seed in range(3):
        r = server.client().chat.completions.create(
            model=NAME, messages=messages, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=1, seed=seed
        )
        (choice,) = r.choices
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        check_call(call)


def test_named_tool_choice_streams_the_call_as_openai_does(server):
    client = server.client()
    kwargs = dict(
        model=NAME,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs)
    (call,) = whole.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and whole.choices[0].finish_reason == "tool_calls"
    check_call(call)
    name, arguments, ids, reasons = "", "", [], []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            assert not c.delta.content  # a forced call is never text
            for d in c.delta.tool_calls or []:
                assert d.index == 0
                ids += [d.id] if d.id else []
                name += d.function.name or ""
                arguments += d.function.arguments or ""
    assert name == "get_weather" and json.loads(arguments) == json.loads(call.function.arguments)
    assert len(ids) == 1 and reasons[-1] == "tool_calls"


def test_auto_reads_an_answer_that_is_a_call_and_returns_any_other_as_text(server):
    client = server.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    # a random model rarely writes a call by itself; response_format makes its answer one, which auto reads back
    call_shape = {
        "type": "object",
        "properties": {"name": {"const": "get_time"}, "parameters": CLOCK["function"]["parameters"]},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    rf = {"type": "json_schema", "json_schema": {"name": "call", "schema": call_shape}}
    r = client.chat.completions.create(
        model=NAME, messages=messages, tools=TOOLS, response_format=rf, max_tokens=40, temperature=0
    )
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    check_call(call)
    text = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=8, temperature=0)
    assert text.choices[0].message.tool_calls is None and text.choices[0].message.content
    streamed = client.chat.completions.create(
        model=NAME, messages=messages, tools=TOOLS, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text.choices[0].message.content


def test_a_call_that_does_not_parse_is_returned_as_text(server):
    """A forced call cut by the token budget is no call: its text comes back, finish_reason "length"."""
    kwargs = dict(
        model=NAME, messages=[{"role": "user", "content": "?"}], tools=TOOLS, tool_choice="required", max_tokens=5
    )
    r = server.client().chat.completions.create(**kwargs, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content.startswith('{"name":')
    chunks = list(server.client().chat.completions.create(**kwargs, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


@pytest.mark.parametrize(
    "text, calls",
    [
        ('{"name": "f", "parameters": {"a": 1}}', [("f", {"a": 1})]),
        (
            '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "arguments": {"b": "x"}}',
            [("f", {}), ("g", {"b": "x"})],
        ),
        ('{"name": "f", "parameters": {"a": 1}', None),  # cut short
        ('{"nam": "f", "parameters": {}}', None),
        ("The weather is fine.", None),
        ('{"name": "f", "parameters": {}} and then text', None),
    ],
)
def test_json_tool_calls_parse_or_stay_text(text, calls):
    parsed = parse_tool_calls(text, "json")
    assert (None if parsed is None else [(c.name, c.arguments) for c in parsed[1]]) == calls


def test_hermes_tool_calls_parse_with_content_before_them():
    text = 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"q": 1}}\n</tool_call>'
    content, (call,) = parse_tool_calls(text, "hermes")
    assert content == "Let me look." and (call.name, call.arguments) == ("f", {"q": 1})
    assert parse_tool_calls("<tool_call>\n{broken\n</tool_call>", "hermes") is None


def test_response_format_json_schema_always_validates(server):
    rf = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    r = server.client().chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Decide."}],
        response_format=rf,
        max_tokens=40,
        temperature=1,
        n=4,
        seed=7,
    )
    for choice in r.choices:  # from a random model, each parses and validates (the budget is ample)
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_response_format_json_object_is_an_object_or_cut_by_the_budget(server):
    r = server.client().chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "JSON"}],
        response_format={"type": "json_object"},
        max_tokens=12,
        temperature=1,
        n=4,
        seed=1,
    )
    for choice in r.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_tool_and_format_fields_get_a_400_naming_them(server, body, param):
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_tools_on_a_template_without_them_and_formats_on_completions_are_refused(tiny_llama3):
    with Server(create_app(load(tiny_llama3[0]), model_name=NAME)) as s:

        def post(path, body):
            return httpx.post(f"{s.url}{path}", json={"model": NAME, "max_tokens": 2, **body}, timeout=30)

        chat = {"messages": [{"role": "user", "content": "hi"}]}
        r = post("/v1/chat/completions", {**chat, "tools": TOOLS})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        r = post("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_library_generate_json_schema_validates(tools_model):
    llm = load(tools_model)
    prompt = llm.chat_format.encode_dialog_prompt([{"role": "user", "content": "Decide."}])
    outs = llm.generate(
        [prompt, prompt[:-1]], 40, temperature=1, seed=3, json_schema=SCHEMA, stop_tokens=llm.chat_stop_tokens
    )
    assert llm.last_stats["finish_reasons"] == ["stop", "stop"]
    for out in outs:
        jsonschema.validate(json.loads(llm.tokenizer.decode(out)), SCHEMA)
    text = "".join(t for _, t in llm.stream(prompt, 40, temperature=0, json_schema=json.dumps(SCHEMA)))
    jsonschema.validate(json.loads(text), SCHEMA)
    with pytest.raises(ValueError, match="json_schema is not valid JSON"):
        llm.generate([prompt], 4, json_schema="{")


def test_cli_json_schema_file(tools_model, tmp_path, monkeypatch, capsys):
    from conftest import run_main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    code, out, err = run_main(
        monkeypatch,
        capsys,
        "generate",
        "--model",
        str(tools_model),
        "--chat",
        "Decide.",
        "--json-schema",
        str(schema),
        "-n",
        "100",
        "--json",
        "--dtype",
        "float32",
        "--seed",
        "0",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["finish_reason"] == "stop"  # a random model spells its JSON in small tokens: 100 is ample
    jsonschema.validate(json.loads(result["text"]), SCHEMA)
    schema.write_text('{"type": "objec"}')
    code, out, err = run_main(
        monkeypatch, capsys, "generate", "--model", str(tools_model), "x", "--json-schema", str(schema)
    )
    assert code == 1 and f"--json-schema {schema}" in err and "Traceback" not in err
