"""The OpenAI-compatible server (`llama3.serve`) on 127.0.0.1, driven by the official `openai` client and raw HTTP.

References are independent of the server: the same request alone through `Llama.generate` on a second copy of
the model (its own KV cache), and transformers' log-softmax for logprobs. The model is a tiny random Llama
with the real 128,256-token vocabulary, in float32. Every wait is bounded; servers stop at the end.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llama3 import Llama  # noqa: E402
from llama3.serve.app import create_app  # noqa: E402

NAME = "tiny"
API_KEY = "sk-test-key"


class Server:
    """uvicorn serving `app` in a background thread, on a socket bound here to a free port of 127.0.0.1."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, api_key: str = API_KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)


def load(d) -> Llama:
    return Llama.from_pretrained(d, device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def ref(tiny_llama3) -> Llama:
    """A second copy of the model, with its own KV cache: what each request gets alone."""
    return load(tiny_llama3[0])


@pytest.fixture(scope="module")
def server(tiny_llama3):
    """4 rows, 8 queue places, 16-token prefill chunks (so longer prompts are prefilled in several)."""
    app = create_app(
        load(tiny_llama3[0]), model_name=NAME, max_batch_size=4, max_queue=8, prefill_chunk=16, api_key=API_KEY
    )
    with Server(app) as s:
        yield s


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def token_ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def prompt_of(i: int, length: int) -> list[int]:
    """A token prompt of `length` ids, different for each i (plain word tokens of the Llama 3 vocabulary)."""
    return [128000] + [1000 + (97 * i + 13 * j) % 20000 for j in range(length - 1)]


# -- the API through the official client ---------------------------------------------------------------


def test_chat_completion_is_the_greedy_answer_alone(server, ref):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    r = server.client().chat.completions.create(
        model=NAME, messages=messages, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    prompt = ref.chat_format.encode_dialog_prompt(messages)
    want = ref.generate([prompt], 12, temperature=0, stop_tokens=ref.chat_stop_tokens)[0]
    (choice,) = r.choices
    assert token_ids(choice) == want
    assert choice.message.role == "assistant" and choice.message.content == ref.tokenizer.decode(want)
    assert choice.finish_reason == ("length" if len(want) == 12 else "stop")
    assert r.object == "chat.completion" and r.model == NAME
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 12)
    assert r.usage.total_tokens == len(prompt) + 12
    assert r.model_extra["prompt_token_ids"] == prompt


def test_streamed_completion_equals_the_plain_one(server):
    client = server.client()
    kwargs = dict(model=NAME, prompt="The capital of France is", max_tokens=10, temperature=0)
    plain = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    # chat: the role first, then the content
    chat = list(
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True
        )
    )
    plain = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    assert chat[0].choices[0].delta.role == "assistant" and chat[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chat) == plain.choices[0].message.content
    assert chat[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_raw_stream_ends_with_done(server):
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_string_across_token_boundaries_is_not_returned(server, ref):
    prompt = prompt_of(1, 5)
    full = ref.generate([prompt], 16, temperature=0, stop_tokens=[])[0]
    pieces = [ref.tokenizer.decode([t]) for t in full]
    text = "".join(pieces)
    # a stop string made of the end of token 3's text and the start of token 4's: it spans a boundary
    k = len("".join(pieces[:4]))
    stop = text[k - 2 : k + 2]
    assert len(stop) == 4 and text.find(stop) == k - 2, "pick a prompt whose text has a unique 4-char span"
    client = server.client()
    kwargs = dict(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "never-seen"])
    r = client.completions.create(**kwargs)
    assert r.choices[0].text == text[: k - 2] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
    assert streamed == text[: k - 2]


def test_seed_reproduces_and_matches_generate(server, ref):
    client = server.client()
    kwargs = dict(model=NAME, prompt=prompt_of(2, 6), max_tokens=10, temperature=0.9, top_p=0.8, seed=1234)
    a = client.completions.create(**kwargs, extra_body={"return_token_ids": True})
    b = client.completions.create(**kwargs, n=2, extra_body={"return_token_ids": True})
    want = ref.generate(
        [prompt_of(2, 6)], 10, temperature=0.9, top_p=0.8, seed=1234, stop_tokens=ref.tokenizer.stop_tokens
    )
    assert token_ids(a.choices[0]) == token_ids(b.choices[0]) == want[0]
    other = ref.generate(
        [prompt_of(2, 6)], 10, temperature=0.9, top_p=0.8, seed=1235, stop_tokens=ref.tokenizer.stop_tokens
    )
    assert token_ids(b.choices[1]) == other[0]  # choice j is seeded seed + j
    assert token_ids(b.choices[0]) != token_ids(b.choices[1])
    # n choices streamed: each chunk names its choice; the texts are the plain response's
    chat = dict(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, n=3, seed=5, temperature=1)
    plain = client.chat.completions.create(**chat)
    texts = ["", "", ""]
    for chunk in client.chat.completions.create(**chat, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in plain.choices] and len(set(texts)) == 3


def test_logprobs_are_the_models_log_softmax(server, tiny_llama3):
    hf = tiny_llama3[1]
    prompt = prompt_of(3, 7)
    client = server.client()
    r = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=3, extra_body={"return_token_ids": True}
    )
    ids = token_ids(r.choices[0])
    with torch.no_grad():  # transformers' logits for every position, independently of our model
        ref_lp = hf(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
    lp = r.choices[0].logprobs
    assert torch.allclose(torch.tensor(lp.token_logprobs), ref_lp[torch.arange(len(ids)), ids], atol=1e-4)
    tok = server.app.state.engine.tokenizer
    for i, top in enumerate(lp.top_logprobs):
        values, indices = ref_lp[i].topk(3)
        assert list(top) == [tok.token_bytes(t).decode("utf-8", "replace") for t in indices.tolist()]
        assert torch.allclose(torch.tensor(list(top.values())), values, atol=1e-4)
    # chat: per-token entries with bytes and top_logprobs
    c = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=2, extra_body={"return_token_ids": True},
    )  # fmt: skip
    entries = c.choices[0].logprobs.content
    assert len(entries) == len(token_ids(c.choices[0])) and all(len(e.top_logprobs) == 2 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)  # greedy: the top one
    assert [bytes(e.bytes) for e in entries] == [tok.token_bytes(t) for t in token_ids(c.choices[0])]


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}  # no key needed


def test_errors_arrive_as_the_clients_exceptions(server):
    client = server.client()
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=hi)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    for kwargs, param in [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({"max_tokens": 1000}, "max_tokens"),  # prompt + answer over the 256-token context
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=NAME, messages=hi, **kwargs)
        assert e.value.status_code == 400 and e.value.param == param, (kwargs, e.value.body)
    # unsupported fields at their neutral values, as some clients always send them, are accepted
    client.chat.completions.create(
        model=NAME,
        messages=hi,
        max_tokens=1,
        frequency_penalty=0,
        presence_penalty=0,
        logit_bias={},
        tool_choice="none",
    )
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=prompt_of(0, 300), max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="sk-wrong").models.list()


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b'{"model": "tiny", "prompt": "x"', 400, None),  # malformed JSON
        (b'["not", "an", "object"]', 400, None),
        (b'{"model": "tiny", "prompt": 5}', 400, "prompt"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": "10"}', 400, "max_tokens"),
        (b'{"model": "tiny", "prompt": "x", "stream": "yes"}', 400, "stream"),
        (b'{"model": "tiny", "prompt": [1, 999999]}', 400, "prompt"),
        (b'{"prompt": "x"}', 400, "model"),
        (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, "temperature"),
        (b'{"model": "tiny", "prompt": "x", "seed": -5}', 400, "seed"),
        (b'{"model": "tiny", "prompt": "x", "seed": 1.5}', 400, "seed"),
        (b'{"modle": "tiny", "prompt": "x"}', 400, "modle"),  # the misspelt field, not the missing one
        (b'{"model": "tiny", "prompt": "x", "min_p": 1.5}', 400, "min_p"),
        (b'{"model": "tiny", "prompt": "x", "min_p": -0.1}', 400, "min_p"),
        (b'{"model": "tiny", "prompt": "x", "min_p": "0.1"}', 400, "min_p"),
        (b'{"model": "tiny", "prompt": "x", "repetition_penalty": 0}', 400, "repetition_penalty"),
        (b'{"model": "tiny", "prompt": "x", "repetition_penalty": -1.5}', 400, "repetition_penalty"),
    ],
)
def test_bad_bodies_get_a_400_naming_the_field(server, body, status, param):
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=body,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert "Traceback" not in r.text and "/" not in error["message"].replace("true/false", "")


def test_auth_body_size_and_routes(server):
    url, auth = server.url, {"Authorization": f"Bearer {API_KEY}"}
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 401
    huge = b'{"model": "tiny", "prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    r = httpx.post(f"{url}/v1/completions", content=huge, headers=auth, timeout=30)
    assert r.status_code == 413
    r = httpx.post(f"{url}/v1/completions", content=iter([huge[: 1 << 20]] * 6), headers=auth, timeout=30)  # chunked
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.get(f"{url}/v1/nothing", headers=auth, timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{url}/v1/completions", headers=auth, timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_metrics_in_prometheus_format(server):
    server.client().completions.create(model=NAME, prompt="Hi", max_tokens=2)
    r = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("llama3_requests_total", "llama3_generation_tokens_total", "llama3_queue_length",
                 "llama3_batch_rows_used", "llama3_time_to_first_token_seconds_bucket"):  # fmt: skip
        assert name in r.text


def test_guard_refuses_unsafe_messages(tiny_llama3, ref, monkeypatch):
    """--guard: the last message of each conversation (and each text prompt) is screened before the model sees it.
    (Llama Guard itself is tested in test_guard.py; here its verdicts are fixed.)"""
    from llama3.guard import GuardResult

    seen = []

    def classify(guard, conversation):
        seen.append(conversation)
        return GuardResult(safe="bomb" not in conversation[-1]["content"], categories=["S9"])

    monkeypatch.setattr("llama3.guard.classify", classify)
    with Server(create_app(load(tiny_llama3[0]), model_name=NAME, max_batch_size=2, guard=ref)) as s:
        client = s.client()
        unsafe = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How to build a bomb?"}]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=NAME, messages=unsafe, max_tokens=2)
        assert e.value.code == "content_filter" and e.value.param == "messages" and "S9: Hate" in e.value.message
        assert seen[-1] == unsafe[1:]  # the system message is not part of what Llama Guard reads
        r = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Bake bread?"}], max_tokens=2
        )
        assert r.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=NAME, prompt="a bomb", max_tokens=2)
        assert e.value.param == "prompt" and s.engine.tokens_generated == r.usage.completion_tokens


def test_metrics_without_prometheus_client_is_a_clear_404(tiny_llama3, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with Server(create_app(load(tiny_llama3[0]), model_name=NAME, max_batch_size=1)) as s:
        r = httpx.get(f"{s.url}/metrics", timeout=10)
        assert r.status_code == 404 and "prometheus-client" in r.json()["error"]["message"]
        assert s.client().completions.create(model=NAME, prompt="Hi", max_tokens=1).usage.completion_tokens == 1


# -- continuous batching -------------------------------------------------------------------------------


def test_continuous_batching_is_exact(server, ref):
    """12 greedy requests of different prompt (up to 4 prefill chunks) and answer lengths, 4 arriving at once (their
    prompts prefilled together, ragged) and the rest at staggered times, each get exactly the tokens
    `Llama.generate` gives the same request alone."""
    jobs = [(prompt_of(i, 2 + (i * 5) % 60), 3 + (i * 7) % 20) for i in range(12)]
    want = [ref.generate([p], n, temperature=0, stop_tokens=ref.tokenizer.stop_tokens)[0] for p, n in jobs]
    client = server.client()
    steps0, tokens0 = server.engine.steps, server.engine.tokens_generated

    def run(i):
        time.sleep(0.03 * max(i - 3, 0))
        p, n = jobs[i]
        r = client.completions.create(
            model=NAME, prompt=p, max_tokens=n, temperature=0, extra_body={"return_token_ids": True}
        )
        return token_ids(r.choices[0])

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(run, range(12), timeout=120))
    assert got == want
    steps, tokens = server.engine.steps - steps0, server.engine.tokens_generated - tokens0
    assert steps < tokens - 12, "requests shared decode steps"  # (each request's first token comes from its prefill)


def test_static_decode_form_gives_the_same_tokens(tiny_llama3, ref):
    """The decode step as CUDA captures it (every row, the whole cache, idle rows at the scratch slot), run
    eagerly on the CPU: the same tokens as each request alone."""
    from llama3.generate.params import SamplingParams
    from llama3.serve.engine import Engine, GenerationRequest

    jobs = [(prompt_of(i, 3 + 9 * i), 4 + 3 * i, i) for i in range(5)]
    want = [ref.generate([p], n, temperature=0.8, top_p=0.9, seed=s, stop_tokens=[])[0] for p, n, s in jobs]
    engine = Engine(load(tiny_llama3[0]), max_batch_size=3, max_queue=8, max_seq_len=128, static_decode=True).start()
    got, done = [[] for _ in jobs], threading.Semaphore(0)
    try:
        for i, (p, n, s) in enumerate(jobs):

            def emit(o, i=i):
                got[i] += [o.token] if o.token is not None else []
                if o.finish_reason:
                    done.release()

            engine.submit([GenerationRequest(p, n, emit, SamplingParams(0.8, 0.9, None), seed=s)])
        assert all(done.acquire(timeout=60) for _ in jobs)
    finally:
        engine.stop()
    assert got == want


# -- load and faults -----------------------------------------------------------------------------------


def test_client_killed_mid_stream_frees_its_row(server, monkeypatch):
    body = {"model": NAME, "prompt": prompt_of(5, 4), "max_tokens": 250, "temperature": 0, "stream": True}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert wait_until(lambda: server.engine.running == 1)
    # the connection is closed with 190-odd tokens to go: the row is free before they are generated
    assert wait_until(lambda: server.engine.running == 0, timeout=10)
    # a plain request whose client gives up frees its row too (before its 250 tokens)
    monkeypatch.setattr("llama3.serve.app.DISCONNECT_POLL_S", 0.1)
    tokens0 = server.engine.tokens_generated
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, headers=auth, timeout=0.3)
    assert wait_until(lambda: server.engine.running == 0, timeout=10)
    assert server.engine.tokens_generated - tokens0 < 250
    # and the next requests run at full batch
    client = server.client()
    with ThreadPoolExecutor(4) as pool:
        rs = list(
            pool.map(lambda i: client.completions.create(model=NAME, prompt=prompt_of(i, 3), max_tokens=3), range(4))
        )
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in rs)


def test_many_clients_with_a_small_queue_complete_or_get_429(server, ref):
    """64 requests from 16 concurrent clients against 4 rows and 8 queue places: each gets its own exact answer
    or a 429 with Retry-After; nothing hangs, nothing is mixed up between clients."""
    prompts = {i: prompt_of(100 + i, 2 + i % 5) for i in range(16)}
    want = {
        i: ref.generate([p], 4, temperature=0, stop_tokens=ref.tokenizer.stop_tokens)[0] for i, p in prompts.items()
    }
    client = server.client()
    outcomes = []

    def client_loop(c: int) -> None:
        for _ in range(4):
            try:
                r = client.completions.create(
                    model=NAME, prompt=prompts[c], max_tokens=4, temperature=0, extra_body={"return_token_ids": True}
                )
                outcomes.append(("ok", token_ids(r.choices[0]) == want[c]))
            except openai.RateLimitError as e:
                outcomes.append(("429", e.response.headers.get("retry-after") == "1"))

    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(outcomes) == 64 and all(right for _, right in outcomes)
    assert any(kind == "ok" for kind, _ in outcomes)
    assert wait_until(lambda: server.engine.running == 0 and server.engine.waiting == 0)


def test_the_wait_queue_is_bounded(tiny_llama3):
    """Requests beyond the free rows wait, at most max_queue of them; all of an n > 1 request or none."""
    from llama3.serve.engine import Engine, GenerationRequest, QueueFull

    engine = Engine(load(tiny_llama3[0]), max_batch_size=4, max_queue=8, max_seq_len=64)  # not started: nothing runs

    def request():
        return GenerationRequest([128000, 1000], 4, lambda o: None)

    engine.submit([request() for _ in range(10)])
    with pytest.raises(QueueFull):
        engine.submit([request() for _ in range(3)])  # 4 rows + 8 places: 13 do not fit, and none is queued
    engine.submit([request(), request()])
    with pytest.raises(QueueFull):
        engine.submit([request()])
    assert engine.waiting == 12


# -- the command ---------------------------------------------------------------------------------------


def test_llama3_serve_command(tiny_llama3):
    """`llama3 serve` in its own process: loopback, the API key from the environment, one answer."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "LLAMA3_API_KEY": API_KEY}
    cmd = [sys.executable, "-m", "llama3", "serve", "--model", str(tiny_llama3[0]), "--dtype", "float32", "--port",
           str(port), "--max-batch-size", "2", "--served-model-name", NAME]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(up, timeout=90)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=30)
        r = client.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0, timeout=30).models.list()
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=5)
    assert "3 completion tokens" in out  # the per-request log line
    assert "Traceback" not in out


def test_serve_without_the_extra_names_it(monkeypatch, capsys):
    from llama3.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve"]) == 1
    assert "pip install 'llama3[serve]'" in capsys.readouterr().err


# -- issue #21: no request silently misread, no start that cannot serve ------------------------------------------


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


@pytest.mark.parametrize(
    "path, body",
    [
        ("completions", {"model": NAME, "prompt": "Hi", "max_token": 3}),
        ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_token": 3}),
    ],
)
def test_an_unknown_field_is_a_400_naming_it(server, path, body):
    """OpenAI answers 400 for an argument it does not know; a typo must not run to the full context."""
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "max_token" and error["code"] == "unknown_parameter", error
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("max_token: unrecognized request argument") and "top_k" in error["message"]


def test_the_official_clients_calls_and_the_extensions_pass(server):
    """What the official client sends for valid calls (its own fields, OpenAI's bookkeeping ones, the documented
    extensions through extra_body) is accepted; an unknown extra_body field is refused by name."""
    client = server.client()
    hi = [{"role": "user", "content": "Hi"}]
    extensions = {"top_k": 5, "return_token_ids": True}
    plain = client.chat.completions.create(model=NAME, messages=hi, max_tokens=2, temperature=0, extra_body=extensions)
    r = client.chat.completions.create(
        model=NAME,
        messages=hi,
        max_tokens=2,
        temperature=0,
        user="u1",
        store=False,
        metadata={"k": "v"},
        parallel_tool_calls=False,
        service_tier="auto",
        prompt_cache_key="k",
        safety_identifier="s",
        extra_body=extensions,
    )
    assert r.usage.completion_tokens == len(token_ids(r.choices[0])) <= 2
    assert token_ids(r.choices[0]) == token_ids(plain.choices[0])  # the bookkeeping fields change nothing
    # the answer sent back as the client returned it (with refusal, tool_calls...: message fields are not checked)
    again = [*hi, r.choices[0].message, {"role": "user", "content": "And?"}]
    assert client.chat.completions.create(model=NAME, messages=again, max_tokens=1).usage.completion_tokens == 1
    streamed = list(client.completions.create(model=NAME, prompt="Hi", max_tokens=2, stream=True, temperature=0))
    assert streamed[-1].choices[0].finish_reason is not None
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="Hi", extra_body={"top-k": 5})
    assert e.value.param == "top-k" and e.value.code == "unknown_parameter"


def test_sampling_extensions_reach_the_sampler(server):
    """min_p 1 keeps only the likeliest token: sampling at temperature 1 gives the greedy answer."""
    client = server.client()
    common = dict(model=NAME, prompt="The capital of France is", max_tokens=10, extra_body={"return_token_ids": True})
    greedy = token_ids(client.completions.create(temperature=0, **common).choices[0])
    sampled = dict(temperature=1.0, top_p=1.0, seed=3)
    assert token_ids(client.completions.create(**sampled, **common).choices[0]) != greedy
    common["extra_body"] |= {"min_p": 1.0}
    assert token_ids(client.completions.create(**sampled, **common).choices[0]) == greedy


def test_repetition_penalty_gives_the_librarys_tokens(server, ref):
    """Greedy with the penalty, alone and beside plain requests in the batch (the seen tokens are per request)."""
    # the first: with the penalty below 1 this random model's greedy answer repeats its own tokens (favoured
    # once generated), which it does not if only the prompt's tokens count as seen
    prompts = [[128000] + [1000 + 13 * j for j in range(8)], prompt_of(1, 9), prompt_of(2, 9)]
    want = [ref.generate([p], 10, temperature=0, stop_tokens=[], repetition_penalty=0.7)[0] for p in prompts]
    assert len(set(want[0])) < 10 and want[0] != ref.generate([prompts[0]], 10, temperature=0, stop_tokens=[])[0]
    client = server.client()

    def ask(prompt, penalty):
        body = {"return_token_ids": True, "repetition_penalty": penalty}
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, extra_body=body)
        return token_ids(r.choices[0])

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, prompts + prompts, [0.7] * 3 + [1.0] * 3))
    assert got[:3] == want
    assert got[3:] == [ref.generate([p], 10, temperature=0, stop_tokens=[])[0] for p in prompts]


@pytest.mark.parametrize("seed, ok", [(-5, False), (2**64, False), (0, True), (2**64 - 1, True)])
def test_seed_has_one_rule_for_the_server_and_the_cli(server, monkeypatch, capsys, seed, ok):
    from conftest import run_main

    r = post(server, "completions", {"model": NAME, "prompt": [1, 2], "max_tokens": 1, "seed": seed})
    assert r.status_code == (200 if ok else 400), r.text
    if not ok:
        assert r.json()["error"]["param"] == "seed" and "must be an integer in [0, 2**64)" in r.text
    # the CLI: refused before anything loads (exit 2), or accepted (and the missing model is the next problem)
    code, _, err = run_main(monkeypatch, capsys, "generate", "hi", "--model", "/nonexistent/m", "--seed", str(seed))
    assert (code == 2 and "argument --seed: must be an integer in [0, 2**64)" in err) is not ok, err


def test_the_context_check_lands_exactly_on_the_boundary(server):
    """prompt + max_tokens == the context fits; one more token is a 400 naming the limit; a chat request with no
    max_tokens gets the rest of the context."""
    context = server.engine.max_seq_len
    prompt = prompt_of(3, context - 4)
    r = post(server, "completions", {"model": NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == context - 4
    r = post(server, "completions", {"model": NAME, "prompt": prompt, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "max_tokens" and f"context is {context} tokens" in r.text
    long_chat = [{"role": "user", "content": " ".join(["word"] * (context - 30))}]
    r = post(server, "chat/completions", {"model": NAME, "messages": long_chat, "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= context


def test_a_tiny_temperature_is_the_greedy_limit(server):
    """temperature -> 0 is greedy: 1e-45 (the smallest float32) and 1e-38 give the temperature-0 tokens, not an
    empty answer from logits divided into infinities."""
    body = {"model": NAME, "prompt": prompt_of(4, 8), "max_tokens": 8, "return_token_ids": True}
    greedy = post(server, "completions", {**body, "temperature": 0}).json()["choices"][0]
    assert len(greedy["token_ids"]) > 0
    for t in (1e-45, 1e-38):
        choice = post(server, "completions", {**body, "temperature": t, "seed": 1}).json()["choices"][0]
        assert (choice["token_ids"], choice["finish_reason"]) == (greedy["token_ids"], greedy["finish_reason"]), t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_on_a_busy_port_is_one_clear_line(tiny_llama3, monkeypatch, capsys):
    from conftest import run_main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, out, err = run_main(monkeypatch, capsys, "serve", "--model", str(tiny_llama3[0]), "--port", str(port))
    assert code == 1, err
    assert err.strip().splitlines()[-1].startswith(f"llama3: error: cannot listen on 127.0.0.1:{port}: ")
    assert "serving" not in err and "Traceback" not in err


def test_serve_loads_and_computes_off_the_main_thread(tiny_llama3, monkeypatch, capsys):
    """The main thread only serves HTTP: `llama3 serve` loads the model in a thread of its own, and the engine makes
    its KV cache in its own thread, so that the main thread never holds an OpenMP team (one there made GNU OpenMP's
    threads sleep between the operations of every CPU decode step: 43 against 110 tok/s,
    benchmarks/results/serve-cli-cpu.md)."""
    from conftest import run_main

    import llama3.cli.serve
    import llama3.serve.app

    threads = {}
    load_model = llama3.cli.serve.load

    def loading(args):
        threads["load"] = threading.current_thread()
        return load_model(args)

    def serving(app, **kwargs):  # what uvicorn's lifespan does with the engine
        engine = app.state.engine
        setup_cache = engine.model.setup_cache

        def recording(*args, **kw):
            threads["cache"] = threading.current_thread()
            return setup_cache(*args, **kw)

        engine.model.setup_cache = recording
        engine.start()
        engine.stop()

    monkeypatch.setattr(llama3.cli.serve, "load", loading)
    monkeypatch.setattr(llama3.serve.app, "run", serving)
    args = ("--model", str(tiny_llama3[0]), "--dtype", "float32", "--port", str(free_port()), "-q")
    code, _, err = run_main(monkeypatch, capsys, "serve", *args)
    assert code == 0, err
    main = threading.main_thread()
    assert threads["load"] is not main and threads["load"].name == "llama3-load"
    assert threads["cache"] is not main and threads["cache"].name == "llama3-engine"


def test_engine_start_raises_what_setting_up_its_cache_raised(tiny_llama3):
    from llama3.serve.engine import Engine

    engine = Engine(load(tiny_llama3[0]), max_batch_size=2, max_queue=2, max_seq_len=64)

    def failing(*args, **kwargs):
        raise MemoryError("no room for the cache")

    engine.model.setup_cache = failing
    with pytest.raises(MemoryError, match="no room for the cache"):
        engine.start()
    assert not engine._thread.is_alive()


def test_serve_refuses_a_guard_that_is_not_llama_guard(tiny_llama3, tmp_path, monkeypatch, capsys):
    """A chat model given as --guard cannot give a verdict: one line at start, not a 400 on every request."""
    import shutil

    from conftest import run_main, save_tiny_hf

    import llama3.serve.app

    save_tiny_hf(tmp_path, vocab_size=128256, max_position_embeddings=1024)  # room for Llama Guard's prompt
    (tmp_path / "original").mkdir()
    shutil.copy(tiny_llama3[0] / "original" / "tokenizer.model", tmp_path / "original")

    def serving(*args, **kwargs):
        raise AssertionError("started serving")

    monkeypatch.setattr(llama3.serve.app, "run", serving)
    args = ("--model", str(tiny_llama3[0]), "--guard", str(tmp_path), "--dtype", "float32", "--port", str(free_port()))
    code, _, err = run_main(monkeypatch, capsys, "serve", *args, "-q")
    assert code == 1, err
    assert err.strip().startswith(f"llama3: error: --guard {tmp_path}: not a Llama Guard model (")
    assert len(err.strip().splitlines()) == 1 and "serving" not in err
