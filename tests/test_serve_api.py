"""The server's evaluation surface and the rest of OpenAI's sampling fields (issues 24 and 26).

Prompt logprobs (`echo` with `logprobs`) against transformers' log-softmax on the same float32 checkpoint;
lm-evaluation-harness's own `local-completions` model through vLLM's tokenizer endpoints; OpenAI's penalties,
`logit_bias`, `best_of` and `n` against the library given the same request alone, whose sampler is itself
tested against transformers' processors and OpenAI's formula (tests/test_sampling.py).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from test_serve import Server, load  # noqa: E402

from llama3.serve.app import create_app  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="module")
def ref(tiny_llama3):
    return load(tiny_llama3[0])


@pytest.fixture(scope="module")
def server(tiny_llama3):
    """No API key (as lm-eval's defaults send none); 16-token prefill chunks: longer prompts take several."""
    with Server(create_app(load(tiny_llama3[0]), model_name=NAME, max_batch_size=4, prefill_chunk=16)) as s:
        yield s


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def completion(server, **body) -> dict:
    r = post(server, "/v1/completions", {"model": NAME, **body})
    assert r.status_code == 200, r.text
    return r.json()


def hf_log_softmax(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities (len(ids), V) at each position, float32, independent of our model."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


# -- prompt logprobs: echo ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_gives_the_prompts_logprobs_as_transformers(server, tiny_llama3, max_tokens):
    """A 40-token prompt (three prefill chunks): each token's log-probability given the ones before it and the top
    3 there, in the legacy format lm-eval reads (the first token null); with max_tokens 1 the new token follows."""
    hf, tok = tiny_llama3[1], server.engine.tokenizer
    prompt = tok.encode(
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer", bos=True
    )
    prompt = (prompt * 3)[:40]
    body = completion(server, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=3, temperature=0)
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    n = len(prompt) + max_tokens
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ids = prompt + ([] if max_tokens == 0 else [tok.special_id("<|begin_of_text|>")])  # placeholder, replaced below
    if max_tokens:
        ids[-1] = ref_token = int(hf_log_softmax(hf, prompt)[-1].argmax())  # greedy: transformers' argmax
        assert choice["text"].endswith(tok.decode([ref_token]))
    want = hf_log_softmax(hf, ids)[:-1]  # position t predicts token t + 1
    got = torch.tensor(lp["token_logprobs"][1:])
    assert torch.allclose(got, want[torch.arange(n - 1), torch.tensor(ids[1:])], atol=1e-5, rtol=0)
    for t, top in enumerate(lp["top_logprobs"][1:]):
        values, indices = want[t].topk(3)
        assert list(top) == [tok.token_bytes(i).decode("utf-8", "replace") for i in indices.tolist()]
        assert torch.allclose(torch.tensor(list(top.values())), values, atol=1e-5, rtol=0)
    assert lp["tokens"][:3] == [tok.token_bytes(t).decode("utf-8", "replace") for t in prompt[:3]]
    text = choice["text"]
    assert text.startswith(tok.decode(prompt))  # a token-id prompt is echoed as its decoded text
    assert [text[o : o + len(s)] for o, s in zip(lp["text_offset"][:n], lp["tokens"], strict=True)] == lp["tokens"]
    assert body["usage"]["completion_tokens"] == max_tokens and choice["finish_reason"] == "length"


def test_echo_of_a_text_prompt_is_the_prompt_as_sent(server):
    """A text prompt's bos (added by the server) is listed as a token but adds no text; streaming echoes first."""
    text = "The capital of France is"
    body = completion(server, prompt=text, max_tokens=2, echo=True, logprobs=0, temperature=0)
    choice = body["choices"][0]
    assert choice["text"].startswith(text) and len(choice["text"]) > len(text)
    assert choice["logprobs"]["tokens"][0] == "<|begin_of_text|>" and choice["logprobs"]["text_offset"][:2] == [0, 0]
    assert all(top == {} for top in choice["logprobs"]["top_logprobs"][1:])  # logprobs 0: the token's own only
    plain = completion(server, prompt=text, max_tokens=2, echo=True, temperature=0)["choices"][0]
    assert plain["text"] == choice["text"] and plain["logprobs"] is None
    stream = {"model": NAME, "prompt": text, "max_tokens": 2, "echo": True, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=stream, timeout=60) as r:
        chunks = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    texts = [json.loads(c)["choices"][0]["text"] for c in chunks]
    assert texts[0] == text and "".join(texts) == choice["text"]


def test_lm_eval_local_completions_scores_through_the_server(server, tiny_llama3):
    """lm-eval's own `local-completions` code: it finds vLLM's tokenizer endpoints (so needs no Hugging Face
    tokenizer on the client) and gets our tokenizer's ids; its log-likelihood payload (echo, logprobs 1,
    max_tokens 1, a batch of token-id prompts) and its parser give transformers' sums. (Driven piecewise: the
    class's own retry loop needs `tenacity`, lm-eval's `api` extra.)"""
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    hf, tok = tiny_llama3[1], server.engine.tokenizer
    base_url = f"{server.url}/v1/completions"
    assert check_remote_tokenizer_support(base_url)  # what LocalCompletionsAPI(tokenizer_backend="auto") asks
    remote = RemoteTokenizer(base_url)
    text = "Something is rotten in the state of Denmark. <|eot_id|>"
    assert remote.encode(text) == tok.encode(text, allowed_special="all")
    assert remote.eos_token_id == tok.special_id(remote.eos_token) and remote.decode(remote.encode(text)) == text
    pairs = [("Frailty, thy name is", " woman!"), ("To be, or not", " to be, that is the question"),
             ("Neither a borrower", " nor a lender be")]  # fmt: skip
    inputs = [remote.encode(c) + remote.encode(x) for c, x in pairs]
    ctxlens = [len(remote.encode(c)) for c, _ in pairs]
    payload = LocalCompletionsAPI._create_payload(SimpleNamespace(model=NAME), inputs, generate=False)
    assert payload["echo"] is True and payload["max_tokens"] == 1
    outputs = post(server, "/v1/completions", payload).json()
    got = LocalCompletionsAPI.parse_logprobs(outputs, tokens=inputs, ctxlens=ctxlens)
    for ids, ctxlen, (logprob, greedy) in zip(inputs, ctxlens, got, strict=True):
        lp = hf_log_softmax(hf, ids)[ctxlen - 1 : -1]
        cont = torch.tensor(ids[ctxlen:])
        assert abs(logprob - lp[torch.arange(len(cont)), cont].sum().item()) < 1e-4
        assert greedy == bool((lp.argmax(-1) == cont).all())


# -- the tokenizer endpoints ----------------------------------------------------------------------------------------


def test_tokenize_detokenize_and_tokenizer_info(server):
    tok = server.engine.tokenizer
    text = "Hello, world <|eot_id|>"
    r = post(server, "/tokenize", {"model": NAME, "prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == [tok.bos_id, *tok.encode(text, allowed_special="all")]
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == server.engine.max_seq_len
    assert r["token_strs"] == [tok.token_bytes(t).decode() for t in r["tokens"]]
    bare = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == r["tokens"][1:] and bare["token_strs"] is None
    assert post(server, "/detokenize", {"tokens": bare["tokens"]}).json() == {"prompt": text}
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == tok.template_tokens["eos_token"] and info["bos_token"] == "<|begin_of_text|>"
    assert info["tokenizer_class"] and info["model_max_length"] == server.engine.max_seq_len
    for path, body, param in [
        ("/detokenize", {"tokens": [1, 10**7]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "x", "add_special_token": True}, "add_special_token"),
    ]:
        r = post(server, path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert post(server, "/tokenize", {"model": "gpt-4", "prompt": "x"}).status_code == 404


# -- the rest of the sampling surface ---------------------------------------------------------------------------------


def test_penalties_and_logit_bias_give_the_librarys_tokens(server, ref):
    """Greedy and seeded requests with the penalties and a bias, beside a plain request in the same batch."""
    from concurrent.futures import ThreadPoolExecutor

    prompt = [128000] + [1000 + 13 * j for j in range(8)]
    knobs = [
        dict(presence_penalty=1.5, frequency_penalty=-0.5, logit_bias={"791": 4.0, "13": -100}),
        dict(frequency_penalty=1.0, temperature=1.0, seed=7),
        dict(presence_penalty=-2.0, logit_bias={"1234": 100}),
        dict(),
    ]

    def ask(k):
        body = {"temperature": 0, **k, "prompt": prompt, "max_tokens": 10, "return_token_ids": True}
        return completion(server, **body)["choices"][0]["token_ids"]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, knobs))
    for k, tokens in zip(knobs, got, strict=True):
        lib = {key: ({int(t): b for t, b in v.items()} if key == "logit_bias" else v) for key, v in k.items()}
        lib = {"temperature": 0, "top_p": 1.0, **lib}
        assert tokens == ref.generate([prompt], 10, stop_tokens=ref.tokenizer.stop_tokens, **lib)[0], k
    assert got[2] == [1234] * 10 and len({tuple(g) for g in got}) == 4


def test_n_choices_share_one_prefill(server, ref):
    prompt = [128000] + [2000 + 7 * j for j in range(29)]  # 30 tokens: two prefill chunks
    before = server.engine.prompt_tokens_computed
    body = completion(server, prompt=prompt, max_tokens=6, n=3, seed=11, temperature=1.0, return_token_ids=True)
    assert server.engine.prompt_tokens_computed - before == len(prompt)  # once, not three times
    for j, choice in enumerate(body["choices"]):
        want = ref.generate([prompt], 6, temperature=1.0, top_p=1.0, seed=11 + j, stop_tokens=ref.tokenizer.stop_tokens)
        assert choice["token_ids"] == want[0]


def test_best_of_returns_the_likeliest_samples(server, ref, tiny_llama3):
    """best_of 4, n 2: the two of the four seeded samples (seed + j, as n would give them) with the highest
    cumulative log-probability under transformers, likeliest first."""
    prompt = [128000] + [3000 + 11 * j for j in range(6)]
    body = completion(server, prompt=prompt, max_tokens=5, n=2, best_of=4, seed=3, temperature=1.0,
                      return_token_ids=True)  # fmt: skip
    samples = [
        ref.generate([prompt], 5, temperature=1.0, top_p=1.0, seed=3 + j, stop_tokens=ref.tokenizer.stop_tokens)[0]
        for j in range(4)
    ]
    scores = []
    for s in samples:
        lp = hf_log_softmax(tiny_llama3[1], prompt + s)[len(prompt) - 1 : -1]
        scores.append(lp[torch.arange(len(s)), torch.tensor(s)].sum().item())
    order = sorted(range(4), key=lambda j: -scores[j])
    assert [c["token_ids"] for c in body["choices"]] == [samples[j] for j in order[:2]]
    assert [c["index"] for c in body["choices"]] == [0, 1] and body["usage"]["completion_tokens"] == 20


@pytest.mark.parametrize(
    "body, param",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"5": "1"}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"best_of": 0}, "best_of"),
        ({"best_of": 2, "n": 3}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
        ({"best_of": 17}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"echo": "yes"}, "echo"),
        ({"echo": True, "logprobs": 6}, "logprobs"),
    ],
)
def test_new_fields_get_a_400_naming_them(server, body, param):
    r = post(server, "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert "Traceback" not in r.text


def test_echo_and_best_of_are_refused_on_chat(server):
    hi = [{"role": "user", "content": "Hi"}]
    for field, value in (("echo", True), ("best_of", 2)):
        r = post(server, "/v1/chat/completions", {"model": NAME, "messages": hi, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert r.json()["error"]["code"] == "unsupported_parameter"
    r = post(server, "/v1/chat/completions", {"model": NAME, "messages": hi, "max_tokens": 1, "presence_penalty": 0.5})
    assert r.status_code == 200, r.text
