from __future__ import annotations

import functools

import torch
from torch import Tensor

from llama3.generate.params import SamplingParams


def seen_mask(rows: list[list[int]], vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, V) bool: the tokens each row has read or written so far, what `repetition_penalty` penalises."""
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool)
    for b, row in enumerate(rows):
        seen[b, row] = True
    return seen.to(device)


def output_counts(rows: list[list[int]], vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, V) fp32: how often each row has generated each token so far, what the presence and frequency
    penalties read (OpenAI's c[j]: the answer's tokens, not the prompt's)."""
    counts = torch.zeros(len(rows), vocab_size)
    for b, row in enumerate(rows):
        counts[b].index_add_(0, torch.tensor(row, dtype=torch.long), torch.ones(len(row)))
    return counts.to(device)


@functools.lru_cache(maxsize=16)
def _bias_vector(bias: tuple[tuple[int, float], ...], vocab_size: int, device: torch.device) -> Tensor:
    """logit_bias as a dense (V,) fp32 vector, made once per setting (not inside a captured CUDA graph's replay)."""
    vector = torch.zeros(vocab_size)
    ids = [t for t, _ in bias]
    if ids and max(ids) >= vocab_size:
        raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {vocab_size}): {max(ids)}")
    vector[ids] = torch.tensor([b for _, b in bias])
    return vector.to(device)


def penalised(logits: Tensor, params: SamplingParams, seen: Tensor | None, counts: Tensor | None = None) -> Tensor:
    """fp32 logits with the processors that come before the warpers, in this order:

    - `logit_bias`: each listed token's bias added (OpenAI's definition; transformers' `SequenceBiasLogitsProcessor`
      with one-token sequences);
    - `repetition_penalty` over the `seen` tokens (B, V) bool: a positive logit divided by the penalty, a negative
      one multiplied (transformers' `RepetitionPenaltyLogitsProcessor`; CTRL, Keskar et al. 2019);
    - the frequency and presence penalties over `counts` (B, V), the tokens generated so far (None: none yet):
      mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, OpenAI's published formula.

    The order is vLLM's (the bias with the logits processors, then repetition, frequency, presence).
    """
    logits = logits.float()
    if params.logit_bias:
        logits = logits + _bias_vector(params.logit_bias, logits.shape[-1], logits.device)
    if params.repetition_penalty != 1:
        if seen is None:
            raise ValueError("repetition_penalty needs the tokens seen so far (seen)")
        r = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * r, logits / r), logits)
    if counts is not None and (params.frequency_penalty != 0 or params.presence_penalty != 0):
        logits = logits - counts * params.frequency_penalty - (counts > 0).float() * params.presence_penalty
    return logits


def sampling_probs(
    logits: Tensor, params: SamplingParams, seen: Tensor | None = None, counts: Tensor | None = None
) -> Tensor:
    """logits (B, V) -> the distribution (B, V) fp32 that `sample` draws from, `params` applied in
    transformers' order (`_get_logits_processor`): the processors of `penalised` (over `seen`, (B, V) bool: the
    prompt and the tokens so far, and `counts`, the answer's tokens), then temperature, top-k, top-p, min-p.

    temperature 0 (greedy) is the one-hot of the argmax. top_k keeps the k most likely tokens; top_p keeps,
    in order of probability, every token whose preceding mass is at most p, as Meta's `sample_top_p` does
    (it zeroes `cumsum - p_i > p`): the smallest set reaching p, plus the token that lands exactly on p.
    The result is not renormalised after top-p; `draw` does not need it to be.

    Tiny temperatures give their limit, the one-hot of the argmax (tied maxima share its mass equally, the
    limit of softmax; temperature 0 instead picks the first): the logits are shifted so their maximum is 0
    before dividing, so `logit / temperature` cannot overflow to inf (inf - inf is NaN in softmax), and a
    temperature below float32's smallest normal number divides as that number (below float32's subnormals
    it would round to 0, and 0 / 0 is NaN), which already leaves every other token exp(-huge) = 0.
    """
    temperature, top_p, top_k = params.temperature, params.top_p, params.top_k
    logits = penalised(logits, params, seen, counts)
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        nucleus = nucleus_among_the_top(probs, top_p) if probs.device.type == "cpu" else None
        if nucleus is None:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(mass_before > top_p, 0.0)
            nucleus = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = nucleus
    if params.min_p > 0:  # transformers' MinPLogitsWarper; the ratio to the top token survives top-p's cut
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs


# How many of the most likely tokens top-p looks at first on the CPU (`nucleus_among_the_top`)
NUCLEUS_FIRST = 256


def nucleus_among_the_top(probs: Tensor, top_p: float) -> Tensor | None:
    """Top-p's result (as `sampling_probs` computes it by sorting the whole row), taken from the NUCLEUS_FIRST most
    likely tokens alone, or None where those do not hold the nucleus of every row.

    On the CPU, sorting the vocabulary costs more than a small model's whole decode step (2.7 ms for 49,152
    entries, 8.8 ms for 128,256, 2 vCPUs; benchmarks/results/sampling-cpu.md), while the nucleus is nearly always a
    few dozen tokens. `topk` gives the first entries of the sorted row, in the same order, and their running sum
    is the sorted row's. Once that sum clears top_p (by far more than float32 rounds a sum near 1), every later
    token's preceding mass is above top_p too, so top-p zeroes all of them. Checking it reads the sum on the
    host: free on the CPU, a sync (and no CUDA graph) on an accelerator, so `sampling_probs` asks only on the CPU.
    Tokens of equal probability straddling the cut may be kept in another order than a full sort keeps them,
    which a sort does not define either."""
    if probs.shape[-1] <= NUCLEUS_FIRST:
        return None
    top, order = probs.topk(NUCLEUS_FIRST, dim=-1)
    mass = top.cumsum(dim=-1)
    if not bool((mass[:, -1] > top_p + 1e-5).all()):
        return None
    return torch.zeros_like(probs).scatter_(-1, order, top.masked_fill(mass - top > top_p, 0.0))


def draw(probs: Tensor, generator=None) -> Tensor:
    """One token per row of `probs` (B, V), in proportion to its (not necessarily normalised) weights.

    Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i / sum(p).
    Unlike torch.multinomial it needs no renormalisation and no host sync.
    """
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)
    return (probs / race).argmax(dim=-1)


def sample(
    logits: Tensor, params: SamplingParams, generator=None, seen: Tensor | None = None, counts: Tensor | None = None
) -> Tensor:
    """logits (B, V) -> token ids (B,), on the device, with no host sync (so it can be graph-captured):
    a draw from `sampling_probs`; temperature 0 is greedy."""
    if params.temperature <= 0:  # the argmax of the penalised logits, as transformers' greedy search
        return penalised(logits, params, seen, counts).argmax(dim=-1)  # fp32: CPU argmax over bf16 is 2x slower
    return draw(sampling_probs(logits, params, seen, counts), generator)
