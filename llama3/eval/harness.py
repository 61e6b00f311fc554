"""lm-evaluation-harness's `LM` interface on our model: `llama3 eval`, and `lm_eval.simple_evaluate(model=...)`.

lm-evaluation-harness (EleutherAI, PyPI `lm-eval`) scores any model through three calls
(`lm_eval/api/model.py`): `loglikelihood` (log p(continuation | context) and whether the continuation is the
greedy one), `loglikelihood_rolling` (log p of a whole text) and `generate_until` (text up to a stop string).
`Llama3LM` answers them with our `Transformer` and `Llama`:

- `loglikelihood`: each context computed once for all its continuations (a multiple-choice document's
  choices): the context's KV cache copied to each continuation's row (`llama3.eval.loglikelihood`); batches
  sorted by length, padded on the right; the output projection runs only at the positions that predict a
  continuation token. A context that does not fit `max_length` is cut on the left, as lm-eval's `hf` model
  cuts it.
- `loglikelihood_rolling`: the strided sliding window of `llama3 perplexity` (`llama3.eval.perplexity`):
  windows of `max_length` tokens every `stride`, so every token after the first window keeps at least
  `max_length - stride` tokens of context (lm-eval's `hf` model uses disjoint windows: less context).
- `generate_until`: `Llama.stream` with the request's stop strings (`until`), greedy unless it asks to sample.

Registered with lm-eval as `llama3` when this module is imported:

    import lm_eval, llama3.eval.harness
    lm_eval.simple_evaluate(model="llama3", model_args="pretrained=meta-llama/Llama-3.2-1B", tasks=["hellaswag"])

Needs the `eval` extra (`pip install llama3[eval]`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from llama3.eval.loglikelihood import token_loglikelihoods
from llama3.eval.perplexity import perplexity
from llama3.generate.llama import Llama


@register_model("llama3")
class Llama3LM(TemplateLM):
    """lm-eval's `LM` over a `Llama`. Pass `llm` (a loaded `Llama`) or `pretrained` (any source
    `Llama.from_pretrained` takes; None: the embedded model). Unquantized weights by default, float32 on the
    CPU: scores are comparable with other systems' only at full precision (int4 moves per-token
    log-probabilities by tenths of a nat)."""

    def __init__(
        self,
        pretrained: str | os.PathLike | None = None,
        *,
        llm: Llama | None = None,
        device: str | None = None,
        dtype: str | None = None,
        backend: str = "auto",
        quantize: str | None = None,
        group_size: int = 32,
        batch_size: int | str = 16,
        max_length: int | None = None,
        stride: int | None = None,
        add_bos_token: bool = False,
        max_gen_toks: int = 256,
        progress: bool = True,
        **unused: Any,  # lm-eval passes its own settings (max_batch_size, ...) to every model
    ):
        super().__init__()
        if llm is None:
            from llama3.weights.hub import parse_device

            if dtype is None and quantize in (None, "none") and parse_device(device).type == "cpu":
                dtype = "float32"
            llm = Llama.from_pretrained(
                pretrained,
                device=device,
                dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype,
                backend=backend,
                quantize=None if quantize in (None, "none") else quantize,
                group_size=int(group_size),
                progress=progress,
            )
        self.llm, self.model, self.tokenizer_ = llm, llm.model, llm.tokenizer
        if isinstance(batch_size, str) and not batch_size.isdigit():  # "auto": lm-eval's; a fixed size here
            batch_size = 16
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        context = self.model.args.max_seq_len
        self.max_length = int(max_length or min(context, 2048))
        if not 2 <= self.max_length <= context:
            raise ValueError(f"max_length must be in [2, {context}] (the model's context), got {max_length}")
        self.stride = int(stride or self.max_length // 2)
        if not 1 <= self.stride <= self.max_length:
            raise ValueError(f"stride must be in [1, {self.max_length}] (max_length), got {stride}")
        self.add_bos_token = add_bos_token in (True, "True", "true", "1")
        self.max_gen_toks = int(max_gen_toks)
        self.progress = progress

    # -- what lm-eval asks of a TemplateLM ---------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        stops = self.tokenizer_.stop_tokens
        return self.tokenizer_.eos_id if self.tokenizer_.eos_id >= 0 else stops[0]

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes (lm-eval's `hf` model: bos, else eos)."""
        return self.tokenizer_.bos_id if self.tokenizer_.bos_id >= 0 else self.eot_token_id

    @property
    def device(self) -> torch.device:
        return self.llm.device

    @property
    def tokenizer_name(self) -> str:
        return "llama3"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer_.encode(string, bos=bool(bos) and self.tokenizer_.bos_id >= 0)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer_.decode(list(tokens))

    # -- loglikelihood ------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = token_loglikelihoods(
            self.model, pairs, self.max_length, self.batch_size, progress=self.progress and not disable_tqdm
        )
        for (key, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in tqdm(
            [r.args for r in requests], desc="llama3 rolling", disable=disable_tqdm or not self.progress
        ):
            tokens = [self.prefix_token_id] + self.tok_encode(string, add_special_tokens=False)
            if len(tokens) < 2:
                out.append(0.0)
                continue
            window = min(self.max_length, len(tokens))
            r = perplexity(self.model, tokens, window, min(self.stride, window))
            out.append(-r["nll_sum"])
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), out[-1])
        return out

    # -- generation ---------------------------------------------------------------------------------

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm(
            [r.args for r in requests], desc="llama3 generate", disable=disable_tqdm or not self.progress
        ):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = kwargs.pop("do_sample", False) and float(kwargs.get("temperature", 1.0)) > 0
            temperature = float(kwargs.pop("temperature", 1.0)) if sample else 0.0
            top_p = float(kwargs.pop("top_p", 1.0)) if sample else 1.0
            tokens = self.tok_encode(context)
            max_new = max(1, min(max_new, self.max_length - 1))
            tokens = tokens[-(self.max_length - max_new) :]  # the left of a long context is cut, as in `hf`
            text = "".join(
                piece
                for _, piece in self.llm.stream(
                    tokens, max_new, stop=until or None, temperature=temperature, top_p=top_p
                )
            )
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
