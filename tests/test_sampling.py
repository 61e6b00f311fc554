"""The sampling knobs against transformers' logits processors, and each knob from the CLI to the sampler.

`SamplingParams` carries every knob; `sampling_probs` applies them in transformers' order
(`transformers/generation/utils.py`, `_get_logits_processor`): the repetition penalty, then temperature,
top-k, top-p, min-p.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_main
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from llama3 import Llama
from llama3.generate.params import SamplingParams
from llama3.generate.sampling import output_counts, sample, sampling_probs, seen_mask


def transformers_probs(logits: torch.Tensor, input_ids: torch.Tensor, processors: list) -> torch.Tensor:
    scores = LogitsProcessorList(processors)(input_ids, logits.clone())
    return scores.softmax(dim=-1)


def normalised(probs: torch.Tensor) -> torch.Tensor:
    return probs / probs.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize(
    "temperature, top_k, min_p",
    [(1.0, None, 0.1), (0.7, 12, 0.05), (1.3, None, 0.3), (0.5, 30, 0.02), (1.0, None, 1.0)],
)
def test_min_p_equals_transformers_warper(temperature, top_k, min_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 64, generator=g) * 3
    input_ids = torch.randint(0, 64, (6, 5), generator=g)
    processors = [TemperatureLogitsWarper(temperature)]
    if top_k is not None:
        processors.append(TopKLogitsWarper(top_k))
    expected = transformers_probs(logits, input_ids, [*processors, MinPLogitsWarper(min_p)])
    ours = sampling_probs(logits, SamplingParams(temperature, 1.0, top_k, min_p=min_p))
    assert torch.equal(ours == 0, expected == 0)  # the same tokens cut
    torch.testing.assert_close(normalised(ours), expected, atol=1e-6, rtol=1e-5)


def test_min_p_keeps_the_ratio_after_metas_top_p():
    """Top-p leaves the kept weights unnormalised; min-p compares each with the top one, so it cuts the same
    tokens as on the renormalised distribution (the formula written out: p_i < min_p * max_j p_j)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 40, generator=g) * 2
    top_p_only = normalised(sampling_probs(logits, SamplingParams(1.0, 0.8, None)))
    cut = top_p_only < 0.2 * top_p_only.amax(dim=-1, keepdim=True)
    expected = normalised(top_p_only.masked_fill(cut, 0.0))
    ours = normalised(sampling_probs(logits, SamplingParams(1.0, 0.8, None, min_p=0.2)))
    assert torch.equal(ours == 0, expected == 0)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_min_p_draws_only_kept_tokens():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 50, generator=g).expand(400, -1)
    params = SamplingParams(1.0, 1.0, None, min_p=0.3)
    kept = set(sampling_probs(logits[:1], params)[0].nonzero()[:, 0].tolist())
    assert 1 < len(kept) < 50
    assert set(sample(logits, params, torch.Generator().manual_seed(0)).tolist()) <= kept


@pytest.mark.parametrize(
    "knob, value",
    [("min_p", -0.1), ("min_p", 1.5), ("min_p", float("nan")), ("min_p", "0.1")]
    + [("repetition_penalty", v) for v in (0, -1.0, float("inf"), float("nan"), "1.2")],
)
def test_a_knob_out_of_range_is_named(knob, value):
    from llama3.checks import ParamError

    with pytest.raises(ParamError) as e:
        SamplingParams(**{knob: value})
    assert e.value.param == knob


# -- repetition_penalty --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "penalty, temperature, top_k, min_p",
    [(1.3, 1.0, None, 0.0), (0.7, 1.0, None, 0.0), (2.0, 0.7, 12, 0.0), (1.5, 1.2, None, 0.05), (1.2, 0.8, 20, 0.1)],
)
def test_repetition_penalty_equals_transformers_processor(penalty, temperature, top_k, min_p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 64, generator=g) * 3
    input_ids = torch.randint(0, 64, (6, 20), generator=g)  # repeats within a row: each token penalised once
    processors = [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)]
    if top_k is not None:
        processors.append(TopKLogitsWarper(top_k))
    if min_p:
        processors.append(MinPLogitsWarper(min_p))
    expected = transformers_probs(logits, input_ids, processors)
    params = SamplingParams(temperature, 1.0, top_k, min_p=min_p, repetition_penalty=penalty)
    seen = seen_mask(input_ids.tolist(), 64)
    ours = sampling_probs(logits, params, seen)
    assert torch.equal(ours == 0, expected == 0)
    torch.testing.assert_close(normalised(ours), expected, atol=1e-6, rtol=1e-5)
    # greedy: the argmax of the penalised logits, as transformers' greedy search takes it
    greedy = SamplingParams(0.0, 1.0, None, repetition_penalty=penalty)
    reference = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone()).argmax(dim=-1)
    assert torch.equal(sample(logits, greedy, seen=seen), reference)
    assert torch.equal(sampling_probs(logits, greedy, seen).argmax(dim=-1), reference)


@pytest.fixture(scope="module")
def checkpoint(tiny_llama3):
    return tiny_llama3


@pytest.fixture(scope="module")
def llm(checkpoint):
    return Llama.from_pretrained(checkpoint[0], device="cpu", dtype=torch.float32)


class NoTokenizer:
    """What `Llama` asks of a tokenizer when generating from token ids with explicit stop tokens."""

    def __init__(self, n_words: int):
        self.n_words, self.stop_tokens = n_words, []


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(Llama, HF model): a 512-token vocabulary, where a random model's greedy text soon repeats itself."""
    from conftest import save_tiny_hf

    from llama3 import Transformer

    d = tmp_path_factory.mktemp("tiny-512")
    hf = save_tiny_hf(d, vocab_size=512, eos_token_id=None, bos_token_id=None)
    model = Transformer.from_pretrained(d, device="cpu", dtype=torch.float32, progress=False)
    return Llama(model, NoTokenizer(512)), hf


PROMPTS = [[1, 491, 64, 315, 82, 374, 64], [1, 40, 103]]  # different lengths: padded rows


def hf_penalised_greedy(hf, prompt: list[int], n: int, penalty: float) -> list[int]:
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        repetition_penalty=penalty,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("penalty", [1.5, 0.8])
def test_greedy_with_repetition_penalty_equals_transformers(small, penalty):
    """Batched (rows of different lengths), the eager step and the graph-form step (CUDA graphs' body, run
    eagerly on the CPU: the `seen` mask kept and updated on the device)."""
    llm, hf = small
    expected = [hf_penalised_greedy(hf, p, 16, penalty) for p in PROMPTS]
    assert expected != [hf_penalised_greedy(hf, p, 16, 1.0) for p in PROMPTS]  # the penalty matters here
    kwargs = dict(temperature=0, stop_tokens=[], repetition_penalty=penalty)
    assert llm.generate(PROMPTS, 16, **kwargs) == expected
    graph_form = Llama(llm.model, llm.tokenizer, cuda_graphs=True)
    assert graph_form.generate(PROMPTS, 16, **kwargs) == expected
    assert all(step.static for step in graph_form._steps.values())
    assert graph_form.generate(PROMPTS[::-1], 16, **kwargs) == expected[::-1]  # a reused step starts afresh


def test_sampled_decode_step_draws_from_the_reference(small):
    """Sampling with the penalty, the decode step against the reference function: each token is what
    `sample` draws from the same generator state, given cache-free logits and the history written out."""
    llm = small[0]
    params = SamplingParams(1.0, 0.95, 40, min_p=0.02, repetition_penalty=1.4)
    prompt = PROMPTS[0]
    out = llm.generate([prompt], 10, stop_tokens=[], seed=5, **vars(params))[0]
    g = torch.Generator().manual_seed(5)
    history = list(prompt)
    with torch.inference_mode():
        for token in out:
            logits = llm.model(torch.tensor([history]))[:, -1]
            seen = seen_mask([history], logits.shape[-1])
            assert int(sample(logits, params, g, seen)) == token
            history.append(token)


def test_text_chat_and_stream_apis_take_the_knobs(llm):
    """Each public API forwards the knobs into one SamplingParams: the same tokens as `generate` with them."""
    knobs = dict(temperature=0, repetition_penalty=0.05, min_p=0.5)
    prompt = llm.tokenizer.encode("The capital of France is", bos=True)
    want = llm.generate([prompt], 8, stop_tokens=[], **knobs)[0]
    assert want != llm.generate([prompt], 8, temperature=0, stop_tokens=[])[0]
    assert [t for t, _ in llm.stream(prompt, 8, stop_tokens=[], **knobs) if t is not None] == want
    assert llm.text_completion(["The capital of France is"], 8, stop_tokens=[], **knobs) == [llm.tokenizer.decode(want)]
    dialog = [{"role": "user", "content": "Hi"}]
    chat = llm.chat_format.encode_dialog_prompt(dialog)
    reply = llm.generate([chat], 8, stop_tokens=llm.chat_stop_tokens, **knobs)[0]
    assert llm.chat_completion([dialog], 8, **knobs)[0]["content"] == llm.tokenizer.decode(reply)
    with pytest.raises(TypeError):
        llm.generate([prompt], 1, min_q=0.1)  # a misspelt knob is refused, not ignored


# -- from the command line -----------------------------------------------------------------------------------


def cli_tokens(monkeypatch, capsys, d, *flags: str) -> list[int]:
    common = ("--model", str(d), "--dtype", "float32", "-n", "12", "--json", "-q")
    code, out, err = run_main(monkeypatch, capsys, "generate", "The capital of France is", *common, *flags)
    assert code == 0, err
    return json.loads(out)["tokens"]


def test_cli_min_p_reaches_the_sampler(tiny_llama3, capsys, monkeypatch):
    """min_p 1 keeps only the likeliest token: sampling at temperature 1 then gives the greedy answer,
    which it does not without --min-p."""
    d = tiny_llama3[0]
    greedy = cli_tokens(monkeypatch, capsys, d, "-t", "0")
    assert cli_tokens(monkeypatch, capsys, d, "-t", "1", "--top-p", "1", "--min-p", "1", "--seed", "3") == greedy
    assert cli_tokens(monkeypatch, capsys, d, "-t", "1", "--top-p", "1", "--seed", "3") != greedy


def test_cli_repetition_penalty_gives_the_librarys_tokens(tiny_llama3, llm, capsys, monkeypatch):
    d = tiny_llama3[0]
    # below 1 the prompt's tokens are favoured: this random model's greedy text repeats none within 12 tokens
    penalised = cli_tokens(monkeypatch, capsys, d, "-t", "0", "--repetition-penalty", "0.05")
    prompt = llm.tokenizer.encode("The capital of France is", bos=True)
    assert penalised == llm.generate([prompt], 12, temperature=0, stop_tokens=[], repetition_penalty=0.05)[0]
    assert penalised != cli_tokens(monkeypatch, capsys, d, "-t", "0")


@pytest.mark.parametrize(
    "flag, value",
    [("--min-p", "1.5"), ("--min-p", "-1"), ("--repetition-penalty", "0"), ("--repetition-penalty", "nan")],
)
def test_cli_bad_knob_names_the_flag(tiny_llama3, capsys, monkeypatch, flag, value):
    code, _, err = run_main(monkeypatch, capsys, "generate", "Hi", "--model", str(tiny_llama3[0]), flag, value)
    assert code == 2
    line = [line for line in err.splitlines() if "error:" in line][0]
    assert f"argument {flag}: must be" in line and "_" not in line  # the flag, not the Python name
    assert "Traceback" not in err


# -- OpenAI's logit_bias, presence and frequency penalties (issue 24) ----------------------------------------------


def openai_penalised(logits: torch.Tensor, generated: list[list[int]], presence: float, frequency: float):
    """OpenAI's published formula, token by token: mu[j] - c[j] * frequency - float(c[j] > 0) * presence, with c[j]
    how often token j was generated before this position (the prompt does not count)."""
    out = logits.clone()
    for b, row in enumerate(generated):
        for j in set(row):
            c = row.count(j)
            out[b, j] -= c * frequency + float(c > 0) * presence
    return out


def test_logit_bias_equals_transformers_sequence_bias():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 64, generator=g) * 3
    input_ids = torch.randint(0, 64, (5, 7), generator=g)
    bias = {3: 5.0, 10: -100.0, 40: 2.5, 63: -0.5}
    processors = [SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}), TemperatureLogitsWarper(0.8)]
    expected = transformers_probs(logits, input_ids, processors)
    for given in (bias, {str(t): b for t, b in bias.items()}, list(bias.items())):  # a dict, JSON's keys, pairs
        params = SamplingParams(0.8, 1.0, None, logit_bias=given)
        torch.testing.assert_close(normalised(sampling_probs(logits, params)), expected, atol=1e-6, rtol=1e-5)
    greedy = SamplingParams(0.0, 1.0, None, logit_bias=bias)
    reference = SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})(input_ids, logits.clone())
    assert torch.equal(sample(logits, greedy), reference.argmax(dim=-1))
    assert not torch.equal(reference.argmax(dim=-1), logits.argmax(dim=-1))  # the bias changed some choice


@pytest.mark.parametrize("presence, frequency", [(0.8, 0.0), (0.0, 1.3), (1.5, -0.7), (-2.0, 2.0)])
def test_presence_and_frequency_penalties_are_openais_formula(presence, frequency):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 64, generator=g) * 2
    generated = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (0, 3, 12, 30)]
    params = SamplingParams(0.9, 1.0, None, presence_penalty=presence, frequency_penalty=frequency)
    expected = (openai_penalised(logits, generated, presence, frequency) / 0.9).softmax(dim=-1)
    ours = sampling_probs(logits, params, counts=output_counts(generated, 64))
    torch.testing.assert_close(normalised(ours), expected, atol=1e-6, rtol=1e-5)


def hf_openai_greedy(hf, prompt: list[int], n: int, presence: float, frequency: float, bias: dict) -> list[int]:
    """Greedy decoding written out: transformers' logits for the whole history at each step (no cache), the bias
    added, then OpenAI's penalties over the tokens generated so far."""
    history, new = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = hf(torch.tensor([history])).logits[:, -1].float()
            for t, b in bias.items():
                logits[0, t] += b
            token = int(openai_penalised(logits, [new], presence, frequency).argmax())
            history.append(token)
            new.append(token)
    return new


@pytest.mark.parametrize("presence, frequency", [(0.6, 0.9)])
def test_greedy_with_openai_penalties_equals_the_formula_on_transformers(small, presence, frequency):
    """Batched rows of different lengths, the eager step and the graph-form step (the counts kept on the device)."""
    llm, hf = small
    bias = {7: 0.5, 100: -100.0}
    expected = [hf_openai_greedy(hf, p, 12, presence, frequency, bias) for p in PROMPTS]
    assert expected != [hf_openai_greedy(hf, p, 12, 0, 0, bias) for p in PROMPTS]  # the penalties matter here
    kwargs = dict(temperature=0, stop_tokens=[], presence_penalty=presence, frequency_penalty=frequency)
    assert llm.generate(PROMPTS, 12, logit_bias=bias, **kwargs) == expected
    graph_form = Llama(llm.model, llm.tokenizer, cuda_graphs=True)
    assert graph_form.generate(PROMPTS, 12, logit_bias=bias, **kwargs) == expected
    assert graph_form.generate(PROMPTS[::-1], 12, logit_bias=bias, **kwargs) == expected[::-1]  # counts start afresh


def test_cli_logit_bias_and_penalties_reach_the_sampler(tiny_llama3, llm, capsys, monkeypatch):
    knobs = dict(presence_penalty=1.5, frequency_penalty=-0.5, logit_bias={791: 4, 13: -100})
    flags = (
        "--presence-penalty",
        "1.5",
        "--frequency-penalty",
        "-0.5",
        "--logit-bias",
        "791=4",
        "--logit-bias",
        "13=-100",
    )
    prompt = llm.tokenizer.encode("The capital of France is", bos=True)
    want = llm.generate([prompt], 12, temperature=0, stop_tokens=[], **knobs)[0]
    assert want != llm.generate([prompt], 12, temperature=0, stop_tokens=[])[0]  # the knobs matter here
    assert cli_tokens(monkeypatch, capsys, tiny_llama3[0], "-t", "0", *flags) == want


@pytest.mark.parametrize(
    "flag, value, problem",
    [
        ("--presence-penalty", "2.5", "must be a number in [-2, 2]"),
        ("--frequency-penalty", "-3", "must be a number in [-2, 2]"),
        ("--logit-bias", "12", "expected TOKEN_ID=BIAS"),
        ("--logit-bias", "12=101", "biases must be numbers in [-100, 100]"),
        ("--logit-bias", "5=nan", "biases must be numbers in [-100, 100]"),
    ],
)
def test_cli_bad_penalty_or_bias_names_the_flag(tiny_llama3, capsys, monkeypatch, flag, value, problem):
    code, _, err = run_main(monkeypatch, capsys, "generate", "Hi", "--model", str(tiny_llama3[0]), flag, value)
    assert code == 2, err
    line = [line for line in err.splitlines() if "error:" in line][0]
    assert f"argument {flag}: {problem}" in line and "Traceback" not in err


def test_library_refuses_a_bias_outside_the_vocabulary(small):
    from llama3.checks import ParamError

    with pytest.raises(ParamError) as e:
        small[0].generate(PROMPTS, 2, temperature=0, stop_tokens=[], logit_bias={512: 1.0})
    assert e.value.param == "logit_bias" and "[0, 512)" in str(e.value)
