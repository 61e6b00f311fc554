from __future__ import annotations

import torch
from torch import Tensor

from llama3.generate.params import SamplingParams


def seen_mask(rows: list[list[int]], vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, V) bool: the tokens each row has read or written so far, what `repetition_penalty` penalises."""
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool)
    for b, row in enumerate(rows):
        seen[b, row] = True
    return seen.to(device)


def penalised(logits: Tensor, params: SamplingParams, seen: Tensor | None) -> Tensor:
    """fp32 logits with transformers' `RepetitionPenaltyLogitsProcessor` applied to the `seen` tokens (B, V):
    a positive logit divided by the penalty, a negative one multiplied (CTRL, Keskar et al. 2019)."""
    logits = logits.float()
    if params.repetition_penalty == 1:
        return logits
    if seen is None:
        raise ValueError("repetition_penalty needs the tokens seen so far (seen)")
    r = params.repetition_penalty
    return torch.where(seen, torch.where(logits < 0, logits * r, logits / r), logits)


def sampling_probs(logits: Tensor, params: SamplingParams, seen: Tensor | None = None) -> Tensor:
    """logits (B, V) -> the distribution (B, V) fp32 that `sample` draws from, `params` applied in
    transformers' order (`_get_logits_processor`): the repetition penalty (over `seen`, (B, V) bool: the
    prompt and the tokens so far), then temperature, top-k, top-p, min-p.

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
    logits = penalised(logits, params, seen)
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if params.min_p > 0:  # transformers' MinPLogitsWarper; the ratio to the top token survives top-p's cut
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs


def draw(probs: Tensor, generator=None) -> Tensor:
    """One token per row of `probs` (B, V), in proportion to its (not necessarily normalised) weights.

    Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i / sum(p).
    Unlike torch.multinomial it needs no renormalisation and no host sync.
    """
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)
    return (probs / race).argmax(dim=-1)


def sample(logits: Tensor, params: SamplingParams, generator=None, seen: Tensor | None = None) -> Tensor:
    """logits (B, V) -> token ids (B,), on the device, with no host sync (so it can be graph-captured):
    a draw from `sampling_probs`; temperature 0 is greedy."""
    if params.temperature <= 0:  # the argmax of the penalised logits, as transformers' greedy search
        return penalised(logits, params, seen).argmax(dim=-1)  # fp32: CPU argmax over bf16 is 2x slower
    return draw(sampling_probs(logits, params, seen), generator)
