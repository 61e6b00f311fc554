"""Speculative decoding: a cheap drafter proposes k tokens, the target model checks them in one forward.

A batch-1 decode step streams every weight of the target to produce one token; a forward of k + 1 tokens
streams them once too and costs about the same while the step is bound by memory bandwidth. So a drafter
guesses the next k tokens, the target scores the current token and the k guesses at positions
p..p+k in one forward, and the guesses it would have produced itself are kept.

The rule (Leviathan et al. 2023, Chen et al. 2023) keeps the output distribution exactly the target's:
with p the target's and q the drafter's distribution at a guess x (both after temperature, top-k and
top-p: `sampling_probs`, the distribution `sample` draws from), x is accepted with probability
min(1, p(x) / q(x)); at the first rejection the token is drawn from norm(max(0, p - q)) and the rest of
the guesses are dropped; when all k are accepted the target's distribution after the last one gives a
bonus token. Greedy is the same rule with one-hot distributions: guesses are kept while they equal the
target's argmax, so the tokens are plain greedy decoding's.

Two drafters: another model with the same vocabulary (`ModelDrafter`, e.g. Llama-3.2-1B for 3.1-8B,
quantized or not) with its own static KV cache, and prompt lookup (`PromptLookupDrafter`): the tokens
that followed the latest n-gram's earliest earlier occurrence in the prompt or the text so far (as
transformers' prompt-lookup decoding finds them), a one-hot q.

Rejected guesses need no cache erase: their keys and values sit in slots beyond the row's position,
which attention masks (`slots <= position`), and the next writes overwrite them. Only positions roll back.
One prompt at a time: `Llama.generate_stream` yields one token per row per step, and rows accepting
different numbers of guesses would need a "no token this step" marker through every consumer; batches
already share each weight read among rows, the gain speculation chases at batch 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from llama3.generate.params import SamplingParams
from llama3.generate.sampling import draw, sample, sampling_probs, seen_mask


class ModelDrafter:
    """Guesses from a smaller model with the target's vocabulary, drawn from its own `sampling_probs`."""

    def __init__(self, draft: Any, params: SamplingParams, generator: torch.Generator):
        self.model, self.params, self.generator = draft.model, params, generator
        self.device = self.model.tok_embeddings.weight.device

    def prefill(self, prompt: list[int]) -> None:
        """The prompt into the draft's cache (its own prefill; only the last position's logits are made)."""
        tokens = torch.tensor([prompt], device=self.device)
        last = torch.tensor([len(prompt) - 1], device=self.device)
        self.model(tokens, torch.arange(len(prompt), device=self.device), logits_pos=last, kv_len=len(prompt))

    def propose(self, history: list[int], k: int) -> tuple[Tensor, Tensor]:
        """k guesses (k,) after `history` and the distributions q (k, V) they were drawn from.

        The first forward feeds the last two tokens: the one before the current token is new to this cache
        when every guess of the previous round was accepted (the target's bonus token followed it), and
        rewriting it otherwise changes nothing.
        """
        pos = len(history) - 1  # slot of the current token
        p = self.params
        seen = seen_mask([history], self.model.args.vocab_size, self.device) if p.repetition_penalty != 1 else None
        tokens = torch.tensor([history[-2:]], device=self.device)
        input_pos = torch.arange(pos + 1 - tokens.shape[1], pos + 1, device=self.device)
        guesses, probs = [], []
        for i in range(k):
            logits = self.model(tokens, input_pos, kv_len=pos + 1 + i)[:, -1]
            q = sampling_probs(logits, p, seen)
            token = draw(q, self.generator)
            if seen is not None:  # the next guess is penalised for this one too
                seen = seen.scatter(1, token[:, None], True)
            guesses.append(token)
            probs.append(q)
            tokens, input_pos = token[:, None], torch.tensor([pos + 1 + i], device=self.device)
        return torch.cat(guesses), torch.cat(probs)


def prompt_lookup(history: list[int], max_ngram: int, k: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the last n tokens of `history`, n from
    `max_ngram` down to 1; the earliest occurrence with a continuation wins (transformers'
    `PromptLookupCandidateGenerator`). [] when nothing matches."""
    seq = torch.tensor(history)
    for n in range(min(max_ngram, len(history) - 1), 0, -1):
        windows = seq[:-1].unfold(0, n, 1)  # every n-gram that has a token after it
        starts = (windows == seq[-n:]).all(dim=1).nonzero()
        if len(starts):
            start = int(starts[0]) + n
            return history[start : start + k]
    return []


class PromptLookupDrafter:
    """Guesses copied from the prompt and the text so far (`prompt_lookup`): q is one-hot."""

    def __init__(self, max_ngram: int, vocab_size: int, device: torch.device):
        self.max_ngram, self.vocab_size, self.device = max_ngram, vocab_size, device

    def prefill(self, prompt: list[int]) -> None:
        """Nothing to prepare: the prompt is searched as part of the history."""

    def propose(self, history: list[int], k: int) -> tuple[Tensor, Tensor]:
        guesses = torch.tensor(prompt_lookup(history, self.max_ngram, k), dtype=torch.long, device=self.device)
        return guesses, torch.nn.functional.one_hot(guesses, self.vocab_size).float()


def verify(guesses: Tensor, q: Tensor, p: Tensor, generator: torch.Generator) -> tuple[int, int]:
    """The rejection rule: (n, token) with the first n guesses (k,) accepted and `token` the one after them.

    q (k, V): the drafter's distributions the guesses were drawn from; p (k + 1, V): the target's at the
    current token and after each guess. Weights need not be normalised (top-p leaves them unnormalised).
    """
    k = len(guesses)
    rows = torch.arange(k, device=p.device)
    p = p / p.sum(dim=-1, keepdim=True)
    q = q / q.sum(dim=-1, keepdim=True)
    px, qx = p[rows, guesses], q[rows, guesses]
    u = torch.rand(k, generator=generator, device=p.device)
    accepted = u * qx < px  # u < p(x) / q(x); q(x) > 0 since x was drawn from q
    n = int(accepted.cumprod(dim=0).sum())  # the host sync of the round
    if n == k:
        return n, int(draw(p[k : k + 1], generator))
    residual = (p[n] - q[n]).clamp_min(0)
    if not residual.any():  # p == q where the guess was rejected: only possible by rounding
        residual = p[n]
    return n, int(draw(residual[None], generator))


def speculative_decode(
    llm: Any,
    drafter: ModelDrafter | PromptLookupDrafter,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    stop_tokens: list[int],
    speculate_k: int,
    stats: dict,
) -> Iterator[int | None]:
    """Yields the new tokens of one prompt, then None if a stop token ended it (the stop token is not
    yielded); never a token past a stop token or past `max_new_tokens`. Counts rounds and guesses in `stats`.

    The target's cache must hold len(prompt) + max_new_tokens slots; no write goes beyond them.
    """
    model, device, generator = llm.model, llm.device, llm._generator
    stops = set(stop_tokens)
    L = len(prompt)
    logits = model(
        torch.tensor([prompt], device=device),
        torch.arange(L, device=device),
        logits_pos=torch.tensor([L - 1], device=device),
        kv_len=L,
    )
    penalty = params.repetition_penalty != 1
    new = [
        int(
            sample(logits[:, -1], params, generator, seen_mask([prompt], logits.shape[-1], device) if penalty else None)
        )
    ]
    drafter.prefill(prompt)
    history = list(prompt)
    stats.update(drafted=0, accepted=0, verify_steps=0)
    emitted = 0
    while True:
        for token in new:
            if token in stops:
                yield None
                return
            yield token
            history.append(token)
            emitted += 1
            if emitted == max_new_tokens:
                return
        # the guesses and the token after them fit in the budget: writes stay below L + max_new_tokens
        k = min(speculate_k, max_new_tokens - emitted - 1)
        guesses, q = drafter.propose(history, k) if k > 0 else (torch.empty(0, dtype=torch.long), None)
        guesses = guesses.to(device)
        pos = len(history) - 1  # slot of the current token (the last one yielded)
        tokens = torch.cat([torch.tensor([history[-1]], device=device), guesses])[None]
        logits = model(tokens, torch.arange(pos, pos + tokens.shape[1], device=device), kv_len=pos + tokens.shape[1])
        seen = None
        if penalty:  # position j follows the history and guesses[:j]
            seen = seen_mask([history], logits.shape[-1], device).expand(len(guesses) + 1, -1).clone()
            seen[1:] |= torch.nn.functional.one_hot(guesses, logits.shape[-1]).cumsum(dim=0).bool()
        p = sampling_probs(logits[0], params, seen)  # (k + 1, V)
        if len(guesses):
            n, token = verify(guesses, q.to(device), p, generator)
        else:
            n, token = 0, int(draw(p, generator))
        new = guesses[:n].tolist() + [token]
        stats["drafted"] += len(guesses)
        stats["accepted"] += n
        stats["verify_steps"] += 1


def speculate(
    llm: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams,
    stops: list[int],
    seed: int | None,
    draft: Any,
    speculate_k: int,
    prompt_lookup: int | None,
) -> Iterator[list[int | None]]:
    """`Llama.generate_stream` by speculative decoding, eagerly: one prompt, one token a step."""
    if draft is not None and prompt_lookup is not None:
        raise ValueError("pass either draft or prompt_lookup, not both")
    if not isinstance(speculate_k, int) or isinstance(speculate_k, bool) or speculate_k < 1:
        raise ValueError(f"speculate_k must be an integer >= 1, got {speculate_k!r}")
    if len(prompts) != 1:
        raise ValueError(
            f"speculative decoding runs one prompt at a time, got a batch of {len(prompts)} "
            "(rows would accept different numbers of guesses per step); call generate once per prompt"
        )
    if prompt_lookup is not None:
        if not isinstance(prompt_lookup, int) or isinstance(prompt_lookup, bool) or prompt_lookup < 1:
            raise ValueError(f"prompt_lookup (the longest n-gram) must be an integer >= 1, got {prompt_lookup!r}")
        drafter = PromptLookupDrafter(prompt_lookup, llm.model.args.vocab_size, llm.device)
    else:
        if not isinstance(draft, type(llm)):
            raise TypeError(f"draft must be a Llama (e.g. Llama.from_pretrained(...)), got {type(draft).__name__}")
        if draft.model.args.vocab_size != llm.model.args.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary has {draft.model.args.vocab_size} tokens and the target's "
                f"{llm.model.args.vocab_size}: speculative decoding needs the same tokenizer in both"
            )
        if draft.device != llm.device:
            raise ValueError(f"the draft model is on {draft.device}, the target on {llm.device}: use one device")
        need = len(prompts[0]) + max_new_tokens
        if need > draft.context_length:
            raise ValueError(f"prompt + max_new_tokens = {need} exceeds the draft context ({draft.context_length})")
        draft._ensure_cache(1, need)
        drafter = ModelDrafter(draft, params, llm._generator)
    if max_new_tokens == 0:
        llm.last_stats = {"time_to_first_token_s": 0.0, "decode_steps": 0, "seconds": 0.0}
        llm.last_stats |= {"tokens_per_second": 0.0, "finish_reasons": ["length"], "drafted": 0, "accepted": 0}
        return
    llm._ensure_cache(1, len(prompts[0]) + max_new_tokens)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    llm._generator.manual_seed(seed)
    t0, first_token_at, n, finished = time.perf_counter(), None, 0, False
    stats: dict = {}
    tokens = speculative_decode(llm, drafter, prompts[0], max_new_tokens, params, stops, speculate_k, stats)
    try:
        for token in tokens:
            first_token_at = first_token_at or time.perf_counter()
            n += 1
            finished = token is None
            yield [token]
    finally:
        tokens.close()
        elapsed = time.perf_counter() - t0
        ttft = (first_token_at or time.perf_counter()) - t0
        drafted = stats.get("drafted", 0)
        llm.last_stats = {
            "time_to_first_token_s": ttft,
            "decode_steps": n,
            "seconds": elapsed,
            "tokens_per_second": (n - 1) / max(elapsed - ttft, 1e-9) if n > 1 else 0.0,
            "finish_reasons": ["stop" if finished else "length"],
            "verify_steps": stats.get("verify_steps", 0),
            "drafted": drafted,
            "accepted": stats.get("accepted", 0),
            "acceptance_rate": stats.get("accepted", 0) / drafted if drafted else 0.0,
        }
