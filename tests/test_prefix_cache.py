"""The prefix cache (`llama3.generate.prefix_cache`): a prompt that starts with tokens computed before copies
their keys and values instead of recomputing them, and gets the same logits (transformers' on the same fp32
checkpoint, 1e-5) and the same greedy tokens as without the cache, in the library, the server's engine and
`llama3 chat`.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import run_main, save_tiny_hf

from llama3 import Llama, Transformer
from llama3.generate.prefix_cache import PrefixCache


class NoTokenizer:
    """What `Llama` asks of a tokenizer when generating from token ids with explicit stop tokens."""

    def __init__(self, n_words: int):
        self.n_words, self.stop_tokens = n_words, []


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(Transformer, HF model): a 512-token vocabulary, float32."""
    d = tmp_path_factory.mktemp("tiny-prefix")
    hf = save_tiny_hf(d, vocab_size=512, eos_token_id=None, bos_token_id=None)
    return Transformer.from_pretrained(d, device="cpu", dtype=torch.float32, progress=False), hf


def llama(model, **kwargs) -> Llama:
    """A Llama over `model`: several may share one model (and its KV cache) when they run one after another."""
    return Llama(model, NoTokenizer(512), **kwargs)


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def prefill_with_cache(llm: Llama, prompt: list[int]) -> tuple[int, torch.Tensor]:
    """What `Llama.generate` does with the cache on: copy the cached start, compute the rest. (start, logits)."""
    llm._ensure_cache(1, len(prompt) + 1)
    with torch.inference_mode():
        start = llm.prefix_cache.reuse([prompt])
        logits = llm.model(torch.tensor([prompt[start:]]), torch.arange(start, len(prompt)), kv_len=len(prompt))
    return start, logits[0]


def test_a_prefix_ending_mid_block_gives_transformers_logits(small):
    model, hf = small
    llm = llama(model, prefix_cache_tokens=256)
    shared = tokens(0, 40)  # 2 full blocks of 16, and 8 tokens into the third
    llm.generate([shared + tokens(1, 5)], 3, temperature=0)  # computes and stores the first prompt
    prompt = shared + tokens(2, 7)
    start, logits = prefill_with_cache(llm, prompt)
    assert start == 32  # the full blocks only: the rest of the shared part is recomputed
    torch.testing.assert_close(logits, hf_logits(hf, prompt)[32:], atol=1e-5, rtol=0)


def test_a_prompt_entirely_cached_still_computes_its_last_token(small):
    model, hf = small
    llm = llama(model, prefix_cache_tokens=256)
    prompt = tokens(3, 32)  # exactly two blocks
    first = llm.generate([prompt], 6, temperature=0)[0]
    start, logits = prefill_with_cache(llm, prompt)
    assert start == 31
    torch.testing.assert_close(logits[-1], hf_logits(hf, prompt)[-1], atol=1e-5, rtol=0)
    assert llm.generate([prompt], 6, temperature=0)[0] == first
    assert llm.last_stats["cached_prompt_tokens"] == 31


def test_a_multi_turn_chat_reuses_its_history_with_the_same_tokens(small):
    model, _ = small
    cached, plain = llama(model, prefix_cache_tokens=1024), llama(model)
    history: list[int] = []
    for turn in range(3):
        history = history + tokens(10 + turn, 9)  # the next user message
        answer = cached.generate([history], 8, temperature=0)[0]
        assert answer == plain.generate([history], 8, temperature=0)[0]
        if turn:  # the previous prompt and answer (all but its last token, never fed) are full blocks here
            assert cached.last_stats["cached_prompt_tokens"] >= (len(history) - 9 - 1) // 16 * 16 > 0
        history = history + answer
    # a batch of ragged prompts: every row starts from the shortest hit
    batch = [history[:50], history[:70]]
    assert cached.generate(batch, 5, temperature=0) == plain.generate(batch, 5, temperature=0)
    assert cached.last_stats["cached_prompt_tokens"] == 48


def test_eviction_drops_the_least_recently_used_block_and_stays_exact(small):
    model, hf = small
    llm = llama(model, prefix_cache_tokens=64)  # four blocks
    cache: PrefixCache = llm.prefix_cache
    a, b, c = tokens(20, 32), tokens(21, 32), tokens(22, 16)
    for p in (a, c):
        llm.generate([p + [1]], 1, temperature=0)  # stores a's 2 blocks, then c's 1
    assert len(cache.lookup(a)) == 2  # a is now more recent than c
    llm.generate([b + [1]], 1, temperature=0)  # 2 more blocks: the free one, then c's
    assert (cache.evicted_blocks, cache.tokens) == (1, 64)
    assert [len(cache.lookup(p)) for p in (a, b, c)] == [2, 2, 0]
    start, logits = prefill_with_cache(llm, b + [7, 8])  # b's keys and values sit where c's were
    assert start == 32
    torch.testing.assert_close(logits, hf_logits(hf, b + [7, 8])[32:], atol=1e-5, rtol=0)


def test_a_load_from_mid_block_copies_exactly_the_slots_asked(small):
    model, _ = small
    llm = llama(model, prefix_cache_tokens=256)
    prompt = tokens(25, 48)
    llm.generate([prompt + [1]], 1, temperature=0)  # stores 3 blocks from row 0
    caches = [layer.attention.cache for layer in model.layers]
    want = [(c.k[0, :, :48].clone(), c.v[0, :, :48].clone()) for c in caches]
    with torch.inference_mode():  # the cache's tensors are inference tensors
        for c in caches:  # the row emptied but for a marker
            c.k[0].fill_(7.0)
            c.v[0].fill_(7.0)
        llm.prefix_cache.load(caches, 0, llm.prefix_cache.lookup(prompt), 40, first=21)  # a row holding 21 already
    for c, (k, v) in zip(caches, want, strict=True):
        for got, ref in ((c.k[0], k), (c.v[0], v)):
            assert torch.equal(got[:, 21:40], ref[:, 21:40])
            assert (got[:, :21] == 7).all() and (got[:, 40:] == 7).all()


def test_changed_weights_empty_the_cache(small):
    model, hf = small
    llm = llama(model, prefix_cache_tokens=256)
    prompt = tokens(30, 40)
    llm.generate([prompt], 2, temperature=0)
    ours, theirs = model.layers[0].attention.wqkv.weight, hf.model.layers[0].self_attn
    saved = [w.clone() for w in (ours, theirs.q_proj.weight, theirs.k_proj.weight, theirs.v_proj.weight)]
    try:
        with torch.no_grad():  # in place, as an optimizer step would
            for w in (ours, theirs.q_proj.weight, theirs.k_proj.weight, theirs.v_proj.weight):
                w.mul_(1.5)
        start, logits = prefill_with_cache(llm, prompt)
        assert start == 0
        torch.testing.assert_close(logits[-1], hf_logits(hf, prompt)[-1], atol=1e-5, rtol=0)
    finally:
        with torch.no_grad():
            for w, old in zip(
                (ours, theirs.q_proj.weight, theirs.k_proj.weight, theirs.v_proj.weight), saved, strict=True
            ):
                w.copy_(old)


# -- the server's engine ----------------------------------------------------------------------------------


def run_engine(engine, prompts: list[list[int]], n: int, logprobs: int | None = None) -> list[dict]:
    """Submits the prompts together (greedy) and waits: per request, its tokens, logprobs and final output."""
    from llama3.serve.engine import GenerationRequest

    results = [{"tokens": [], "logprobs": [], "final": None} for _ in prompts]
    done = threading.Semaphore(0)

    def emit(o, r):
        if o.finish_reason is not None:
            r["final"] = o
            done.release()
        else:
            r["tokens"].append(o.token)
            r["logprobs"].append(o.logprob)

    requests = [
        GenerationRequest(p, n, (lambda o, r=r: emit(o, r)), logprobs=logprobs)
        for p, r in zip(prompts, results, strict=True)
    ]
    engine.submit(requests)
    for _ in prompts:
        assert done.acquire(timeout=60)
    return results


def test_the_engine_shares_a_prefix_between_concurrent_requests(tiny_llama3):
    from llama3.serve.engine import Engine

    d, hf = tiny_llama3
    llm = Llama.from_pretrained(d, device="cpu", dtype=torch.float32, progress=False)
    engine = Engine(llm, max_batch_size=4, max_seq_len=160, prefill_chunk=64, prefix_cache_tokens=512).start()
    try:
        shared = [128000] + tokens(40, 45)  # 2 full blocks and 14 tokens of a third (ids below 512: plain bytes)
        prompts = [shared + tokens(41, 12), shared + tokens(42, 9)]
        out = run_engine(engine, prompts, 6, logprobs=0)
        for p, r in zip(prompts, out, strict=True):
            assert r["final"].finish_reason == "length"
            lp = hf_logits(hf, p + r["tokens"]).log_softmax(-1)[len(p) - 1 : -1]
            assert r["tokens"] == lp.argmax(-1).tolist()  # greedy: transformers' tokens
            want = lp.gather(1, torch.tensor(r["tokens"])[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(r["logprobs"]), want, atol=1e-5, rtol=0)
        # the younger request waited for the older one's blocks rather than computing them too
        assert [r["final"].cached_tokens for r in out] == [0, 32]
        assert engine.prompt_tokens_computed == sum(map(len, prompts)) - 32
        # the next turn: the first prompt, its answer and more; the answer's keys and values are reused too
        # 58 + 6 + 4 tokens: the prompt and all but the last new token are cached, 63 tokens, 3 full blocks
        follow = prompts[0] + out[0]["tokens"] + tokens(43, 4)
        (r,) = run_engine(engine, [follow], 3)
        assert r["final"].cached_tokens == 48
        assert r["tokens"] == hf_logits(hf, follow + r["tokens"])[len(follow) - 1 : -1].argmax(-1).tolist()
    finally:
        engine.stop()


# -- the command line -------------------------------------------------------------------------------------


def test_llama3_chat_reuses_the_conversation(tiny_llama3, monkeypatch, capsys):
    stdin = "Tell me a story about a cat.\nAnd one about a dog, please.\n"
    args = ("chat", "-m", str(tiny_llama3[0]), "--dtype", "float32", "-n", "8", "--temperature", "0")
    code, out, err = run_main(monkeypatch, capsys, *args, stdin=stdin)
    assert code == 0, err
    reports = [line for line in err.splitlines() if "from the prefix cache" in line]
    assert len(reports) == 1 and int(reports[0].split()[1]) >= 16, err  # the second turn only
    code, out_off, err = run_main(monkeypatch, capsys, *args, "--prefix-cache-tokens", "0", stdin=stdin)
    assert code == 0 and out_off == out and "from the prefix cache" not in err


@pytest.mark.parametrize("value", ["-1", "8"])
def test_a_bad_prefix_cache_bound_names_the_flag(value, monkeypatch, capsys):
    for command in ("chat", "serve"):
        code, _, err = run_main(monkeypatch, capsys, command, "--prefix-cache-tokens", value)
        assert code == 2 and "--prefix-cache-tokens" in err and "at least 16" in err, err
