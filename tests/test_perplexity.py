"""Strided sliding-window perplexity against two independent references on a tiny random checkpoint:
transformers' own loss with -100 labels, in the loop of Hugging Face's guide "Perplexity of fixed-length
models", and (windows that do not overlap) a plain sum of -log softmax over transformers' logits.

The guide weights each window's mean loss by its count of non -100 labels minus one ("subtract batch_size due
to internal label shift"). That is the number of labels the loss averages only when the window's first token
is a label, i.e. the first window and windows that do not overlap; in an overlapping window the first token is
context already, the shift drops no label, and that count is one short. The reference below counts the labels
that survive the shift, so the sum is exact; our windows, scored tokens and context are the guide's.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import save_tiny_hf

from llama3.checks import ParamError
from llama3.eval.perplexity import perplexity
from llama3.model.config import ModelArgs
from llama3.model.transformer import Transformer

INIT = 0.1  # as in test_model.py: attention far from uniform, so a token scored with the wrong context shows
VOCAB = 512
N = 100  # tokens of the synthetic text (the tiny configs' context is 256)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(fp32 transformers model, fp32 Transformer of the same weights)."""
    path = tmp_path_factory.mktemp("ppl")
    hf = save_tiny_hf(path, vocab_size=VOCAB, initializer_range=INIT)
    return hf, Transformer.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False)


def text(n: int = N, seed: int = 0) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def guide_nll(hf, tokens: list[int], max_length: int, stride: int) -> tuple[float, int, int]:
    """(nll sum, scored tokens, windows) by the guide's loop: transformers' loss over -100-masked labels."""
    input_ids = torch.tensor([tokens])
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, windows, prev_end_loc = 0.0, 0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        loss = hf(ids, labels=target_ids).loss  # mean over the labels left after the shift by one
        n_loss = (target_ids[:, 1:] != -100).sum().item()  # see the module docstring
        nll_sum += loss.item() * n_loss
        n_tokens += n_loss
        windows += 1
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens, windows


@pytest.mark.parametrize(
    "max_length, stride",
    [
        (32, 32),  # no overlap, stride divides N - max_length
        (32, 16),  # half overlap
        (24, 7),  # stride divides neither N nor max_length
        (30, 30),  # no overlap, a short last window
        (8, 1),  # one new token per window, 92 windows
        (128, 64),  # the whole text inside one window
        (N, 10),  # exactly one window
    ],
)
def test_matches_the_guide_loop_on_transformers(models, max_length, stride):
    hf, ours = models
    tokens = text()
    nll, n_tokens, windows = guide_nll(hf, tokens, max_length, stride)
    got = perplexity(ours, tokens, max_length, stride)
    assert (got["scored_tokens"], got["windows"]) == (n_tokens, windows)
    assert got["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n_tokens), rel=1e-5)
    # every token after the first is scored once; without overlap a window's first token has no context
    assert n_tokens == (N - windows if stride == max_length else N - 1)


@pytest.mark.parametrize("max_length", [16, 33, N])
@torch.inference_mode()
def test_windows_without_overlap_sum_next_token_log_probs(models, max_length):
    """stride == max_length: each window on its own, -log softmax of transformers' logits at each next token."""
    hf, ours = models
    tokens = text(seed=1)
    nll, scored = 0.0, 0
    for begin in range(0, N, max_length):
        window = torch.tensor([tokens[begin : begin + max_length]])
        log_probs = torch.log_softmax(hf(window).logits[0].double(), dim=-1)
        targets = window[0, 1:]
        nll -= log_probs[torch.arange(len(targets)), targets].sum().item()
        scored += len(targets)
    got = perplexity(ours, tokens, max_length, max_length)
    assert got["scored_tokens"] == scored
    assert got["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / scored), rel=1e-5)


def test_progress_bar_goes_to_stderr_and_changes_nothing(models, capsys):
    _, ours = models
    quiet = perplexity(ours, text(), 32, 16)
    shown = perplexity(ours, text(), 32, 16, progress=True)
    assert shown == quiet
    assert "perplexity" in capsys.readouterr().err


@pytest.mark.parametrize(
    "tokens, max_length, stride, message",
    [
        ([], 16, 8, r"tokens must hold at least 2 tokens .* got 0"),
        ([5], 16, 8, r"tokens must hold at least 2 tokens .* got 1"),
        ([5, 6, 7], 16, 0, r"stride must be in \[1, 16\] \(the window.* got 0"),
        ([5, 6, 7], 16, 17, r"stride must be in \[1, 16\] \(the window.* got 17"),
        ([5, 6, 7], 65, 8, r"max_length must be in \[2, 64\] \(the model's context\), got 65"),
        ([5, 6, 7], 1, 1, r"max_length must be in \[2, 64\] .* got 1"),
    ],
)
def test_bad_arguments_are_refused_by_name(tokens, max_length, stride, message):
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32, ffn_dim=32, max_seq_len=64)
    model = Transformer(args)
    with pytest.raises(ParamError, match=message):
        perplexity(model, tokens, max_length, stride)
