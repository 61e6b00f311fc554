"""Perplexity of a model on a text, by the strided sliding window of Hugging Face's guide
"Perplexity of fixed-length models".

A text longer than the model's context is cut into windows of `max_length` tokens that start every `stride`
tokens. Each window scores only the tokens the previous window did not reach; the tokens before them are
context. So every token is scored once, with at least `max_length - stride` tokens of context (except near the
start), and perplexity = exp(sum of -log p(token | context) / number of scored tokens).

With `stride == max_length` the windows do not overlap and the first token of each window is not scored: it has
no context inside its window. The first token of the text is never scored.

    from llama3.eval.perplexity import perplexity

    perplexity(llm.model, llm.tokenizer.encode(text, bos=True), max_length=512, stride=256)["perplexity"]
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from llama3.checks import ParamError
from llama3.model.transformer import Transformer


@torch.inference_mode()
def perplexity(model: Transformer, tokens: list[int], max_length: int, stride: int, progress: bool = False) -> dict:
    """Returns {"perplexity", "nll_sum" (nats), "scored_tokens", "windows", "max_length", "stride"}."""
    n = len(tokens)
    if n < 2:
        raise ParamError("tokens", f"must hold at least 2 tokens (the first is only context), got {n}")
    context = model.args.max_seq_len
    if not 2 <= max_length <= context:
        raise ParamError("max_length", f"must be in [2, {context}] (the model's context), got {max_length}")
    if not 1 <= stride <= max_length:
        raise ParamError(
            "stride", f"must be in [1, {max_length}] (the window; a larger one skips tokens), got {stride}"
        )

    ids = torch.tensor(tokens, device=model.tok_embeddings.weight.device)
    n_windows = 1 + max(0, -(-(n - max_length) // stride))  # the last window ends at the last token
    nll_sum, scored, scored_until = 0.0, 0, 0
    for w in tqdm(range(n_windows), desc="perplexity", unit="window", disable=not progress):
        begin = w * stride
        end = min(begin + max_length, n)
        first = max(scored_until, begin + 1)  # the first token this window scores: new, and with context before it
        logits = model(ids[None, begin:end])[0]  # (T, vocab); position t predicts token t + 1
        log_probs = logits[first - 1 - begin : end - 1 - begin].float().log_softmax(dim=-1)
        nll_sum -= log_probs.gather(-1, ids[first:end, None]).sum().item()
        scored += end - first
        scored_until = end
    return {
        "perplexity": math.exp(nll_sum / scored),
        "nll_sum": nll_sum,
        "scored_tokens": scored,
        "windows": n_windows,
        "max_length": max_length,
        "stride": stride,
    }
