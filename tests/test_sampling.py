"""The sampling knobs against transformers' logits processors, and each knob from the CLI to the sampler.

`SamplingParams` carries every knob; `sampling_probs` applies them in transformers' order
(`transformers/generation/utils.py`, `_get_logits_processor`): temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_main
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from llama3.generate.params import SamplingParams
from llama3.generate.sampling import sample, sampling_probs


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


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.1"])
def test_min_p_out_of_range_names_the_knob(value):
    from llama3.checks import ParamError

    with pytest.raises(ParamError) as e:
        SamplingParams(min_p=value)
    assert e.value.param == "min_p"


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


@pytest.mark.parametrize("flag, value", [("--min-p", "1.5"), ("--min-p", "-1")])
def test_cli_bad_knob_names_the_flag(tiny_llama3, capsys, monkeypatch, flag, value):
    code, _, err = run_main(monkeypatch, capsys, "generate", "Hi", "--model", str(tiny_llama3[0]), flag, value)
    assert code == 2
    assert f"argument {flag}:" in err and "min_p" not in err and "Traceback" not in err
