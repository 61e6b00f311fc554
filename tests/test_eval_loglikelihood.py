"""`token_loglikelihoods` (llama3/eval/loglikelihood.py), which runs a context shared by several continuations once
and copies its KV cache to each continuation's row, against transformers running every request whole, and
against itself one request at a time (no sharing): the same log-likelihoods and greedy flags (1e-5)."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_hf

from llama3.eval import loglikelihood
from llama3.eval.loglikelihood import token_loglikelihoods
from llama3.model.transformer import KVCache, Transformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 24  # max_length


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-loglikelihood")
    hf = save_tiny_hf(d)
    return Transformer.from_pretrained(d, dtype=torch.float32), hf


@torch.inference_mode()
def transformers_loglikelihood(hf, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The request alone and whole on transformers: context + continuation less its last token, cut on the
    left to WINDOW tokens; the continuation's positions scored."""
    inp = (context + continuation)[-(WINDOW + 1) : -1]
    logp = hf(torch.tensor([inp])).logits[0, -len(continuation) :].log_softmax(-1)
    target = torch.tensor(continuation)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def greedy_tokens(hf, context: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([context]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(context) :].tolist()


def requests(hf) -> list[tuple[list[int], list[int]]]:
    """Multiple-choice documents, and requests that share nothing, mixed."""
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, 500, (n,), generator=g).tolist()

    ctx_a, ctx_b, ctx_c, ctx_d, ctx_long = ids(9), ids(5), ids(13), ids(7), ids(WINDOW + 7)
    return [
        # one context, choices of 1 to 3 tokens: one is the first token of another (it ends where the
        # shared part ends), one is the model's greedy continuation (its flag is True), one is asked twice
        (ctx_a, [17]),
        (ctx_a, [17, 230, 41]),
        (ctx_a, greedy_tokens(hf, ctx_a, 3)),
        (ctx_a, [55, 56]),
        (ctx_a, [55, 56]),
        # choices that share their first two tokens: the shared part goes on past the context
        (ctx_d, [301, 9, 88, 5, 120, 7]),
        (ctx_d, [301, 9, 402, 66]),
        # requests alone: no other has their context
        (ids(4), ids(3)),
        (ids(11), [8]),
        # a context that is the start of another one (choices in the context, lm-eval's winogrande style)
        (ctx_b, ids(2)),
        (ctx_b + ctx_a[:3], ids(4)),
        # two-token choices: one token after the context each (a suffix pass of one position per row)
        (ctx_c, [3, 4]),
        (ctx_c, [3, 9]),
        (ctx_c, [200, 201]),
        # a context longer than the window: cut on the left, by a different amount for each length of choice
        (ctx_long, [60, 61]),
        (ctx_long, [60, 61, 62, 63]),
        (ctx_long, [70, 71]),
    ]


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_shared_contexts_score_as_transformers_scores_each_request(models, batch_size):
    """batch_size 1 and 2: a document's continuations take several suffix passes (padded ones among them);
    16: every group in one prefix pass."""
    model, hf = models
    pairs = requests(hf)
    ours = token_loglikelihoods(model, pairs, WINDOW, batch_size)
    for (context, continuation), (score, greedy) in zip(pairs, ours, strict=True):
        ref, ref_greedy = transformers_loglikelihood(hf, context, continuation)
        assert score == pytest.approx(ref, abs=1e-5), (context, continuation)
        assert greedy == ref_greedy, (context, continuation)
    assert ours[2][1], "the greedy continuation's flag"


def test_a_later_batch_that_needs_more_cache_than_the_first(models):
    """Batches come longest context first, but a later one may hold more continuations, or longer ones: the
    cache grows (batch size 2: the first batch continues one request, the second four, up to 23 tokens)."""
    model, hf = models
    g = torch.Generator().manual_seed(2)

    def ids(n):
        return torch.randint(1, 500, (n,), generator=g).tolist()

    ctx_a, ctx_b, ctx_c, ctx_d = ids(20), ids(19), ids(3), ids(2)
    cont_c = ids(21)
    pairs = [(ctx_a, [1]), (ctx_a, [2, 3]), (ctx_b, [4]), (ctx_c, cont_c), (ctx_c, cont_c[:5] + ids(9)),
             (ctx_d, [5, 6, 7]), (ctx_d, [8, 9])]  # fmt: skip
    for (context, continuation), (score, _) in zip(pairs, token_loglikelihoods(model, pairs, WINDOW, 2), strict=True):
        assert score == pytest.approx(transformers_loglikelihood(hf, context, continuation)[0], abs=1e-5)


def test_shared_contexts_score_as_each_request_alone(models):
    """The sharing changes nothing: each request alone (its own group: one cache-free forward) scores the same."""
    model, hf = models
    pairs = requests(hf)
    together = token_loglikelihoods(model, pairs, WINDOW, 4)
    for pair, (score, greedy) in zip(pairs, together, strict=True):
        [(alone, alone_greedy)] = token_loglikelihoods(model, [pair], WINDOW, 4)
        assert score == pytest.approx(alone, abs=1e-5), pair
        assert greedy == alone_greedy


def test_no_slot_is_read_before_it_is_written(models, monkeypatch):
    """The scratch cache starts full of large random values (not zeros): a continuation that attended to a slot
    its own tokens or its context's copy had not written (padding, another row's) would score differently."""
    model, hf = models

    def garbage_cache(*args):
        cache = KVCache(*args)
        cache.k.normal_(0, 30)
        cache.v.normal_(0, 30)
        return cache

    monkeypatch.setattr(loglikelihood, "KVCache", garbage_cache)
    pairs = requests(hf)
    for (context, continuation), (score, _) in zip(pairs, token_loglikelihoods(model, pairs, WINDOW, 3), strict=True):
        assert score == pytest.approx(transformers_loglikelihood(hf, context, continuation)[0], abs=1e-5)


def test_the_models_own_cache_is_left_as_it_was(models):
    """A `Llama`'s cache (and the prefix cache that reuses its rows) must survive an evaluation."""
    model, hf = models
    model.setup_cache(2, 40)
    caches = [layer.attention.cache for layer in model.layers]
    before = caches[0].k.clone()
    token_loglikelihoods(model, requests(hf), WINDOW, 4)
    assert [layer.attention.cache for layer in model.layers] == caches
    assert (model.max_batch_size, model.max_seq_len) == (2, 40)
    assert torch.equal(caches[0].k, before)
