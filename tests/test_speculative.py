"""Speculative decoding: greedy gives plain greedy's tokens, sampling gives the target's distribution.

Greedy references are plain decoding (itself checked against transformers in test_generation.py). The
sampling references are exact: the marginal distribution of a token is enumerated over every prefix of
a tiny-vocabulary model, with the temperature / top-k formulas written out here, and compared with the
tokens speculative decoding draws by a chi-square test at a fixed seed.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import run_main

import llama3.generate.speculative
from llama3 import Llama, ModelArgs, Tokenizer, Transformer
from llama3.generate.sampling import draw
from llama3.generate.speculative import prompt_lookup

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NoTokenizer:
    """What `Llama` asks of a tokenizer when generating from token ids with explicit stop tokens."""

    def __init__(self, n_words: int):
        self.n_words, self.stop_tokens = n_words, []


def tiny_llama(seed: int, vocab: int = 512, sharpness: float = 1.0, dim: int = 64, n_layers: int = 2) -> Llama:
    torch.manual_seed(seed)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=vocab, ffn_dim=96, max_seq_len=256)
    model = Transformer(args)
    with torch.no_grad():
        model.output.weight.mul_(sharpness)  # larger logits: peakier, more distinct distributions
    return Llama(model.eval(), NoTokenizer(vocab))


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def drafts(target):
    """A draft that agrees always (the target's own weights, a separate cache) and one that rarely does."""
    same = Llama(Transformer(target.model.args), NoTokenizer(512))
    same.model.load_state_dict(target.model.state_dict())
    return {"same": same, "unrelated": tiny_llama(1)}


PROMPT = [3, 17, 250, 9, 17, 250, 41, 3, 17, 77, 250, 9]  # repeated n-grams: prompt lookup finds guesses


def greedy(llm: Llama, n: int, **kwargs) -> list[int]:
    return llm.generate([PROMPT], n, temperature=0, stop_tokens=[], **kwargs)[0]


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("drafter", ["same", "unrelated", "lookup"])
def test_greedy_speculation_gives_plain_greedy_tokens(target, drafts, drafter, k):
    plain = greedy(target, 40)
    if drafter == "lookup":
        fast = greedy(target, 40, prompt_lookup=3, speculate_k=k)
    else:
        fast = greedy(target, 40, draft=drafts[drafter], speculate_k=k)
    assert fast == plain
    s = target.last_stats
    assert s["decode_steps"] == 40 and s["finish_reasons"] == ["length"]
    assert s["verify_steps"] < 40  # fewer target forwards than tokens: guesses were kept
    assert s["accepted"] <= s["drafted"] and s["acceptance_rate"] == s["accepted"] / s["drafted"]
    if drafter == "same":
        assert s["accepted"] == s["drafted"]
    else:  # rejections happened, so the roll-back was exercised
        assert s["accepted"] < s["drafted"]


@pytest.mark.parametrize("drafter", ["same", "unrelated", "lookup"])
def test_no_slot_beyond_a_rows_position_is_read(target, drafts, drafter):
    """Both caches start full of large garbage: a token attending to a slot it has not written (a position
    off by one, a hole the draft did not fill after a fully accepted round) changes the tokens. Rejected
    guesses are never erased, only overwritten."""
    from conftest import fill_cache_with_garbage

    plain = greedy(target, 40)
    with torch.inference_mode():  # the caches were made there
        for llm in (target, drafts["same"], drafts["unrelated"]):
            fill_cache_with_garbage(llm.model, batch=1, slots=256)
    spec = {"prompt_lookup": 3} if drafter == "lookup" else {"draft": drafts[drafter]}
    assert greedy(target, 40, speculate_k=4, **spec) == plain
    if drafter == "same":
        assert target.last_stats["acceptance_rate"] == 1.0


def test_the_draft_unrelated_to_the_target_rarely_agrees(target, drafts):
    greedy(target, 40, draft=drafts["unrelated"], speculate_k=4)
    assert target.last_stats["acceptance_rate"] < 0.5


def test_int4_quantized_draft_gives_plain_greedy_tokens(target):
    from llama3.quant.weight_only import quantize_model

    draft = Llama(Transformer(target.model.args), NoTokenizer(512))
    draft.model.load_state_dict(target.model.state_dict())
    draft.model.to(torch.bfloat16)
    quantize_model(draft.model, "int4", group_size=32)
    assert type(draft.model.layers[0].feed_forward.w2).__name__ == "Int4Linear"
    plain = greedy(target, 30)
    assert greedy(target, 30, draft=draft, speculate_k=4) == plain
    assert target.last_stats["acceptance_rate"] > 0.5


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_greedy_speculation_with_repetition_penalty_gives_plain_greedy_tokens(target, drafts, penalty):
    """Verify's position j is penalised for the history and guesses[:j]; plain greedy is checked against
    transformers in test_sampling."""
    plain = greedy(target, 30, repetition_penalty=penalty)
    assert plain != greedy(target, 30)  # the penalty matters here
    for spec in ({"draft": drafts["same"]}, {"draft": drafts["unrelated"]}, {"prompt_lookup": 3}):
        assert greedy(target, 30, speculate_k=4, repetition_penalty=penalty, **spec) == plain
        if "draft" in spec and spec["draft"] is drafts["same"]:  # the draft penalises its guesses as verify does
            assert target.last_stats["acceptance_rate"] == 1.0


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 6, 9])
def test_max_new_tokens_is_exact(target, drafts, max_new_tokens):
    plain = greedy(target, max_new_tokens)
    for kwargs in ({"draft": drafts["same"]}, {"draft": drafts["unrelated"]}, {"prompt_lookup": 2}):
        assert greedy(target, max_new_tokens, speculate_k=4, **kwargs) == plain


@pytest.mark.parametrize("at", [0, 1, 5, 13])
def test_stop_token_ends_the_output_before_it(target, drafts, at):
    """The stop token lands inside a round of accepted guesses (the same-weights draft accepts all 8):
    nothing after it is emitted."""
    plain = greedy(target, 30)
    stop = plain[at]
    expected = plain[: plain.index(stop)]
    for kwargs in ({"draft": drafts["same"]}, {"draft": drafts["unrelated"]}, {"prompt_lookup": 3}):
        out = target.generate([PROMPT], 30, temperature=0, stop_tokens=[stop], speculate_k=8, **kwargs)
        assert out == [expected]
        assert target.last_stats["finish_reasons"] == ["stop"]


def test_text_level_calls_with_stop_strings_match_plain_decoding(llama3_tokenizer_path):
    """text_completion / chat_completion / stream_completion through the real tokenizer, a stop string cut
    at the same character as in plain decoding."""
    tokenizer = Tokenizer(llama3_tokenizer_path)
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_dim=96, max_seq_len=256)
    llm, draft = Llama(Transformer(args).eval(), tokenizer), Llama(Transformer(args).eval(), tokenizer)
    draft.model.load_state_dict(llm.model.state_dict())
    prompt = "Hello world, this is a test of speculative decoding. Hello world, this is"
    ref = llm.text_completion([prompt], 24, temperature=0, stop_tokens=[])[0]
    stop = ref[9:11]
    cut = ref[: ref.find(stop)]
    for spec in ({"draft": draft, "speculate_k": 4}, {"prompt_lookup": 3, "speculate_k": 4}):
        assert llm.text_completion([prompt], 24, temperature=0, stop_tokens=[], **spec) == [ref]
        assert llm.text_completion([prompt], 24, temperature=0, stop_tokens=[], stop=stop, **spec) == [cut]
        assert llm.last_stats["finish_reasons"] == ["stop"]
        pieces = llm.stream_completion(prompt, 24, temperature=0, stop_tokens=[], stop=stop, **spec)
        assert "".join(pieces) == cut
    dialog = [{"role": "user", "content": "Say hello"}]
    plain = llm.chat_completion([dialog], 12, temperature=0)
    assert llm.chat_completion([dialog], 12, temperature=0, draft=draft) == plain


def test_refusals_name_the_problem(target, drafts):
    with pytest.raises(ValueError, match="one prompt at a time, got a batch of 2"):
        target.generate([PROMPT, PROMPT], 4, draft=drafts["same"])
    other = tiny_llama(2, vocab=640)
    with pytest.raises(ValueError, match="640 tokens and the target's 512"):
        target.generate([PROMPT], 4, draft=other)
    with pytest.raises(ValueError, match="either draft or prompt_lookup"):
        target.generate([PROMPT], 4, draft=drafts["same"], prompt_lookup=2)
    with pytest.raises(ValueError, match="speculate_k"):
        target.generate([PROMPT], 4, draft=drafts["same"], speculate_k=0)
    with pytest.raises(ValueError, match="prompt_lookup"):
        target.generate([PROMPT], 4, prompt_lookup=0)


def test_prompt_lookup_takes_the_earliest_match_of_the_longest_ngram():
    history = [1, 2, 3, 9, 1, 2, 4, 8, 2, 3, 7, 5, 1, 2, 3]
    assert prompt_lookup(history, 3, 2) == [9, 1]  # "1 2 3" at 0 is followed by 9, 1
    assert prompt_lookup(history[:-1], 3, 3) == [3, 9, 1]  # "5 1 2" is new; "1 2" first at 0
    assert prompt_lookup([1, 2, 5, 6], 3, 4) == []
    assert prompt_lookup([4, 5, 4], 2, 4) == [5, 4]  # the continuation may run into the n-gram itself


# -- sampling: the target's distribution, exactly --------------------------------------------------

VOCAB, N_SAMPLES, SAMPLE_PROMPT = 8, 600, [1, 4, 2, 1, 4, 7, 3, 1, 4]
# chi-square 0.999 quantiles for 1..7 degrees of freedom (scipy.stats.chi2.ppf(0.999, df))
CHI2_999 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32]


def processed(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int | None,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The repetition penalty (CTRL's: a seen token's positive logit divided by it, a negative one multiplied;
    logits[..., j, :] follows `tokens`[..., : n + j] with n = tokens.shape[-1] - logits.shape[-2] + 1), then
    temperature, top-k, Meta's top-p (`sample_top_p`: zero the tokens with cumsum - p_i > top_p) and min-p
    (zero p_i < min_p * max p), renormalised: what the target's sampling draws from."""
    logits = logits.double()
    if repetition_penalty != 1:
        n = tokens.shape[-1] - logits.shape[-2] + 1
        for j in range(logits.shape[-2]):
            seen = torch.zeros_like(logits[..., j, :], dtype=torch.bool).scatter(-1, tokens[..., : n + j], True)
            row = logits[..., j, :]
            penalised = torch.where(row < 0, row * repetition_penalty, row / repetition_penalty)
            logits[..., j, :] = torch.where(seen, penalised, row)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    sorted_probs[(sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p] = 0.0
    probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def reference_marginal(llm: Llama, index: int, **params) -> torch.Tensor:
    """P(new token `index` = v) for every v: every prefix of `index` new tokens enumerated, each weighted
    by its probability, from cache-free forwards of the whole sequence."""
    prefixes = torch.tensor(list(itertools.product(range(VOCAB), repeat=index)), dtype=torch.long)
    prefixes = prefixes.reshape(VOCAB**index, index)
    tokens = torch.cat([torch.tensor(SAMPLE_PROMPT).expand(len(prefixes), -1), prefixes], dim=1)
    with torch.no_grad():
        logits = llm.model(tokens)[:, len(SAMPLE_PROMPT) - 1 :]  # (prefixes, index + 1, V)
    probs = processed(logits, **params, tokens=tokens)
    weight = probs[:, :-1].gather(-1, prefixes[..., None]).squeeze(-1).prod(dim=-1)  # P(prefix)
    return (weight[:, None] * probs[:, -1]).sum(dim=0)


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, float]:
    """(statistic, its 0.999 quantile), bins with fewer than 5 expected counts pooled; infinite when a token
    the target never samples (top-k, top-p) came out."""
    expected = expected_probs * counts.sum()
    if counts[expected == 0].any():
        return float("inf"), 0.0
    small = (expected < 5) & (expected > 0)
    keep = expected >= 5
    obs, exp = counts[keep].double(), expected[keep]
    if small.any():
        obs, exp = torch.cat([obs, counts[small].sum()[None].double()]), torch.cat([exp, expected[small].sum()[None]])
    return float(((obs - exp) ** 2 / exp).sum()), CHI2_999[len(exp) - 2]


@pytest.fixture(scope="module")
def small_models():
    """A target and a draft that disagree a lot: different weights, sharp distributions, one layer (fast)."""
    kw = dict(vocab=VOCAB, dim=32, n_layers=1)
    return tiny_llama(10, sharpness=4.0, **kw), tiny_llama(11, sharpness=8.0, **kw)


def speculative_counts(target: Llama, indices: tuple[int, ...], **kwargs) -> tuple[torch.Tensor, float]:
    """How often each token came out at each of `indices`, over N_SAMPLES seeds; and the acceptance rate."""
    counts = torch.zeros(len(indices), VOCAB, dtype=torch.long)
    drafted = accepted = 0
    for seed in range(N_SAMPLES):
        # one token more than needed: the last token never is a guess (no guess is drafted past the limit)
        out = target.generate([SAMPLE_PROMPT], max(indices) + 2, stop_tokens=[], seed=seed, **kwargs)[0]
        for row, index in enumerate(indices):
            counts[row, out[index]] += 1
        drafted += target.last_stats["drafted"]
        accepted += target.last_stats["accepted"]
    return counts, accepted / drafted


SAMPLING = [
    pytest.param(dict(temperature=0.6, top_p=0.9, top_k=4), {"speculate_k": 2}, id="draft-k2-t0.6-topp-topk"),
    pytest.param(dict(temperature=1.0, top_p=1.0, top_k=None), {"speculate_k": 3, "prompt_lookup": 2}, id="lookup-k3"),
    pytest.param(
        dict(temperature=1.0, top_p=1.0, top_k=None, min_p=0.05, repetition_penalty=1.8),
        {"speculate_k": 2},
        id="draft-k2-minp-penalty",
    ),
    pytest.param(
        dict(temperature=0.8, top_p=1.0, top_k=None, min_p=0.05, repetition_penalty=1.8),
        {"speculate_k": 3, "prompt_lookup": 2},
        id="lookup-k3-minp-penalty",
    ),
]


@pytest.mark.parametrize("params, spec", SAMPLING)
def test_speculative_sampling_has_the_targets_distribution(small_models, params, spec):
    """Token 1 (the first one a verification step decides) and token 3 (after at least a second round)."""
    target, draft = small_models
    spec = spec if "prompt_lookup" in spec else {**spec, "draft": draft}
    counts, acceptance = speculative_counts(target, (1, 3), **params, **spec)
    for row, index in enumerate((1, 3)):
        expected = reference_marginal(target, index, **params)
        stat, limit = chi_square(counts[row], expected)
        assert stat < limit, (index, stat, counts[row].tolist(), (expected * N_SAMPLES).round().tolist())
    assert 0.05 < acceptance < 0.95  # both branches of the rule were taken


@pytest.mark.parametrize("penalty", [{}, {"min_p": 0.1, "repetition_penalty": 3.0}])
def test_the_draft_reports_the_distribution_it_drew_from(small_models, penalty):
    """The q the rule divides by is the draft's processed distribution (repetition penalty over the history
    and the guesses before, temperature, top-k, top-p, min-p) after the text so far and each guess:
    compared with cache-free forwards and the formulas written out here."""
    from llama3.generate.params import SamplingParams
    from llama3.generate.speculative import ModelDrafter

    # with the penalty: the less peaky model, and a short history (guesses add tokens not seen before)
    draft = small_models[0] if penalty else small_models[1]
    params = SamplingParams(temperature=0.6, top_p=0.9, top_k=4, **penalty)
    prompt = [1, 4] if penalty else SAMPLE_PROMPT
    history = prompt + [5, 2]
    with torch.inference_mode():
        draft._ensure_cache(1, 64)
        drafter = ModelDrafter(draft, params, torch.Generator().manual_seed(0))
        drafter.prefill(prompt)
        guesses, q = drafter.propose(history, 3)
        logits = draft.model(torch.tensor([history + guesses.tolist()]))[0, len(history) - 1 : -1]
    expected = processed(logits, 0.6, 0.9, 4, **penalty, tokens=torch.tensor(history + guesses.tolist()[:-1]))
    torch.testing.assert_close(q / q.sum(-1, keepdim=True), expected.float(), atol=1e-5, rtol=1e-4)
    assert (expected[torch.arange(3), guesses] > 0).all()
    counts = torch.zeros(VOCAB, dtype=torch.long)
    with torch.inference_mode():  # and the guesses are drawn from that q
        for _ in range(300):
            counts[drafter.propose(history, 1)[0]] += 1
    stat, limit = chi_square(counts, expected[0])
    assert stat < limit, (counts.tolist(), (expected[0] * 300).tolist())


def always_accept(guesses, q, p, generator):
    """A wrong rule: every guess kept, then the bonus token from the target."""
    k = len(guesses)
    return k, int(draw(p[k : k + 1], generator))


def resample_from_p(guesses, q, p, generator):
    """A subtler wrong rule: the right acceptance test, but a rejected guess replaced by a draw from p
    instead of norm(max(0, p - q))."""
    rows = torch.arange(len(guesses))
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    u = torch.rand(len(guesses), generator=generator)
    n = int((u * q[rows, guesses] < p[rows, guesses]).long().cumprod(0).sum())
    return n, int(draw(p[n : n + 1], generator))


@pytest.mark.parametrize(
    "wrong_rule, spec",
    [(always_accept, {"prompt_lookup": 2}), (always_accept, {}), (resample_from_p, {})],
    ids=["always-accept-lookup", "always-accept-draft", "resample-from-p-draft"],
)
def test_the_statistic_catches_a_wrong_acceptance_rule(small_models, monkeypatch, wrong_rule, spec):
    target, draft = small_models
    monkeypatch.setattr(llama3.generate.speculative, "verify", wrong_rule)
    spec = spec or {"draft": draft}
    params = dict(temperature=1.0, top_p=1.0, top_k=None)
    counts, _ = speculative_counts(target, (1,), speculate_k=2, **params, **spec)
    stat, limit = chi_square(counts[0], reference_marginal(target, 1, **params))
    assert stat > limit, stat


# -- the command line ---------------------------------------------------------------------------------


def test_cli_draft_and_prompt_lookup_give_the_plain_greedy_answer(tiny_llama3, capsys, monkeypatch):
    import json

    d = str(tiny_llama3[0])
    common = ("--model", d, "--dtype", "float32", "-t", "0", "-n", "16")
    prompt = "Hello world, this is a test. Hello world, this is"
    code, out, _ = run_main(monkeypatch, capsys, "generate", prompt, "--json", "-q", *common)
    assert code == 0
    plain = json.loads(out)["tokens"]
    for spec in (("--draft", d), ("--prompt-lookup", "3", "--speculate-k", "2")):
        code, out, err = run_main(monkeypatch, capsys, "generate", prompt, "--json", *common, *spec)
        assert code == 0, err
        assert json.loads(out)["tokens"] == plain
    code, out, err = run_main(monkeypatch, capsys, "generate", prompt, *common, "--draft", d)
    assert "guesses accepted (100%)" in err  # the draft has the model's weights
    chat_plain = run_main(monkeypatch, capsys, "chat", *common, "-q", stdin="Hi there\n")
    chat_draft = run_main(monkeypatch, capsys, "chat", *common, "-q", "--draft", d, stdin="Hi there\n")
    assert chat_draft == chat_plain and chat_plain[0] == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--speculate-k", "0", "--prompt-lookup", "2"), "--speculate-k: must be >= 1"),
        (("--prompt-lookup", "0"), "--prompt-lookup: must be >= 1"),
        (("--prompt-lookup", "2", "--draft", "x"), "not allowed with --draft"),
    ],
)
def test_cli_refuses_bad_speculation_flags(capsys, monkeypatch, flags, message):
    code, _, err = run_main(monkeypatch, capsys, "generate", "Hi", *flags)
    assert code == 2 and message in err
