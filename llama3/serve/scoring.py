"""Log-probabilities of a prompt's own tokens: what `/v1/completions` returns with `echo` and `logprobs`, the
request evaluation harnesses send to score a multiple-choice answer or a text's perplexity (lm-evaluation-harness's
`local-completions` model reads `token_logprobs[ctxlen:-1]` of an echoed prompt plus one new token).

Each value is the model's own log-softmax in float32 (the same numbers `logprobs` gives for generated tokens),
computed from the hidden states of the prefill that fills the cache anyway: scoring a prompt costs its prefill
and the output projection at each of its positions.
"""

from __future__ import annotations

import codecs
from typing import Any, NamedTuple

import torch
from torch import Tensor

from llama3.serve.protocol import CompletionLogprobs

POSITIONS_PER_PROJECTION = 64  # (64, 128,256) float32 logits at a time: 32 MB, whatever the prompt's length


class TokenLogprob(NamedTuple):
    """One token's log-probability (None for a prompt's first token: nothing precedes it) and the `k` most
    likely tokens at its position as (id, logprob), likeliest first (None with the first token)."""

    logprob: float | None
    top: list[tuple[int, float]] | None


def prompt_logprobs(model, hidden: Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """hidden (T, dim): the final-normed hidden states at T consecutive positions (`Transformer.hidden`), and
    `targets` the T tokens that follow them -> each target's log-probability and the k likeliest there."""
    out: list[TokenLogprob] = []
    for start in range(0, len(targets), POSITIONS_PER_PROJECTION):
        h = hidden[start : start + POSITIONS_PER_PROJECTION]
        want = torch.tensor(targets[start : start + len(h)], device=h.device)
        lp = model.ops.linear(h[None], model.output)[0].float().log_softmax(dim=-1)
        chosen = lp.gather(1, want[:, None])[:, 0].tolist()
        if k:
            top = lp.topk(k, dim=-1)
            tops = [
                list(zip(i, v, strict=True)) for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
            ]
        else:
            tops = [[] for _ in chosen]
        out += [TokenLogprob(c, t) for c, t in zip(chosen, tops, strict=True)]
    return out


def echo_pieces(tokenizer, prompt: list[int], added_bos: bool) -> list[tuple[str, str]]:
    """Each prompt token as (its own text, the text it adds to the echoed prompt), decoding UTF-8 across
    tokens (a character split over two tokens is added by the second). `added_bos`: the first token is the bos
    this server put in front of a text prompt, which adds nothing, so the echo is the prompt as it was sent."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pieces = []
    for i, token in enumerate(prompt):
        raw = tokenizer.token_bytes(token)
        pieces.append((raw.decode("utf-8", "replace"), "" if added_bos and i == 0 else decoder.decode(raw)))
    if pieces:
        token, text = pieces[-1]
        pieces[-1] = (token, text + decoder.decode(b"", final=True))
    return pieces


def echo_logprobs(tokenizer, pieces: list[tuple[str, str]], logprobs: list[TokenLogprob]) -> CompletionLogprobs:
    """The echoed prompt in the legacy completions format: tokens, their logprobs (the first null), the top
    alternatives by their text, and each token's offset in the echoed text."""
    out, offset = CompletionLogprobs(), 0
    for (token, text), lp in zip(pieces, logprobs, strict=True):
        out.tokens.append(token)
        out.token_logprobs.append(lp.logprob)
        top = None if lp.top is None else {tokenizer.token_bytes(i).decode("utf-8", "replace"): v for i, v in lp.top}
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def echo(
    tokenizer, prompt: list[int], text_prompt: bool, logprobs: list[TokenLogprob] | None, k: int | None
) -> tuple[str, CompletionLogprobs | None]:
    """An echoed prompt: its text (a text prompt as it was sent: without the bos the server added) and, when
    `logprobs` were asked for (`k` not None), its tokens' in the legacy format. ("", None) without echo."""
    if logprobs is None:
        return "", None
    pieces = echo_pieces(tokenizer, prompt, added_bos=text_prompt and prompt[0] == tokenizer.bos_id)
    text = "".join(piece for _, piece in pieces)
    return text, None if k is None else echo_logprobs(tokenizer, pieces, logprobs)


def best_choices(choices: list, prompts: int, per: int, n: int) -> list[tuple[int, Any]]:
    """best_of: of the `per` choices of each prompt (choice i * per + j), the `n` with the highest
    `cumulative_logprob`, likeliest first, as (index in the response, choice); all of them when per == n."""
    if per == n:
        return [(c.index, c) for c in choices]
    out = []
    for i in range(prompts):
        best = sorted(choices[i * per : (i + 1) * per], key=lambda c: -c.cumulative_logprob)[:n]
        out += [(i * n + rank, c) for rank, c in enumerate(best)]
    return out
