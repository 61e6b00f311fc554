"""Generation: a prefill then one-token decode steps over the static KV cache, sampling on the device.

Ragged batches are padded on the right: row b's prompt fills cache slots 0..len_b-1 and its n-th new
token goes to slot len_b + n, exactly where it would go if the row ran alone. Every decode step has
the same shapes, so on CUDA the whole step (all layers, the output projection and sampling) is
captured once in a CUDA graph and replayed per token.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from llama3.checks import ParamError, token_ids
from llama3.generate.params import SamplingParams, check_max_new_tokens, check_seed
from llama3.generate.prefix_cache import PrefixCache
from llama3.generate.sampling import sample, seen_mask
from llama3.generate.step import DecodeStep, compiled_block
from llama3.generate.stream import TextStream
from llama3.model.transformer import Transformer
from llama3.text.chat_format import CHAT_TEMPLATE_CHOICES, chat_format_for
from llama3.text.tokenizer import Tokenizer

Message = dict[str, str]


Dialog = list[Message]


class Llama:
    """A model, its tokenizer and chat format, and the generation loop over a static KV cache."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_seq_len: int | None = None,
        max_batch_size: int | None = None,
        cuda_graphs: bool | None = None,
        chat_format=None,
        chat_template: str = "auto",
        compile: bool = False,
        prefix_cache_tokens: int = 0,
    ):
        if tokenizer.n_words > model.args.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.n_words} tokens but the model only {model.args.vocab_size}")
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if max_seq_len is not None and max_seq_len > model.args.max_seq_len:
            raise ParamError(
                "max_seq_len",
                f"must be at most the model's context of {model.args.max_seq_len} tokens, got {max_seq_len}",
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        self._chat_format = chat_format
        # "auto": the hand-written format where it equals the checkpoint's template, else the template;
        # "builtin" / "jinja" force one (see llama3.chat_format.chat_format_for). "jinja" fails here, at load.
        self.chat_template = chat_template
        if chat_format is None and chat_template != "auto":
            self._chat_format = chat_format_for(tokenizer, chat_template)
        self.device = model.tok_embeddings.weight.device
        # None: grow the cache to what each call needs; an int fixes it (and bounds memory)
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        if cuda_graphs is None:  # True off CUDA runs the graph's form of the step eagerly: for tests
            cuda_graphs = self.device.type == "cuda"
        self.cuda_graphs = cuda_graphs
        # compile: the CPU decode step's blocks through torch.compile (see `compiled_block`); on CUDA the
        # step is already one CUDA graph of the Triton backend's kernels
        if compile and self.device.type != "cpu":
            raise ValueError(f"compile=True compiles the CPU decode step; this model is on {self.device}")
        self._run_block = compiled_block() if compile else None
        self._steps: dict[tuple, DecodeStep] = {}
        self._generator = torch.Generator(device=self.device)
        self.last_stats: dict[str, float] = {}
        # keys and values of prompts (and answers) computed before, reused by a prompt that starts with them
        self.prefix_cache = PrefixCache(model, prefix_cache_tokens) if prefix_cache_tokens else None

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike | None = None,
        device=None,
        dtype=None,
        backend: str = "auto",
        quantize: str | None = "auto",
        max_seq_len: int | None = None,
        max_batch_size: int | None = None,
        progress: bool = True,
        cuda_graphs: bool | None = None,
        group_size: int = 32,
        chat_template: str = "auto",
        adapter: str | os.PathLike | None = None,
        keep_output: bool = False,
        compile: bool = False,
        kernel: str | None = None,
        prefix_cache_tokens: int = 0,
    ) -> Llama:
        """Model and tokenizer from a local directory, a .gguf file or a Hugging Face repo id; with no
        `src`, the embedded default model (`llama3.default_model()`), offline. `chat_template`: "auto"
        (the hand-written Llama 3 / ChatML format where it equals the checkpoint's template, else the
        template), "builtin" or "jinja". `adapter`: a LoRA adapter directory (`llama3 finetune`'s or PEFT's
        adapter_model.safetensors + adapter_config.json), applied to the model without merging. `compile`:
        decode on the CPU through a torch.compile'd block (`compiled_block`): about 2x the tokens/s of a
        quantized model, after a compile of seconds on the first step (and whenever the cache grows).
        `quantize`: "auto" (the default) runs a GGUF file on the CPU through the quantized kernels measured
        fastest on this machine among those within 1% of float32's perplexity, and loads anything else as
        None does (float); None keeps float weights, "int8" / "int4" quantizes as asked. `kernel` forces a
        CPU kernel ("int4", "int4-fbgemm", "int8", "fbgemm"; `llama3.quant.choice`); the model's
        `kernel_choice` says which ran and why.
        `prefix_cache_tokens`: keep the keys and values of up to that many tokens of earlier prompts and answers,
        and reuse them for a prompt that starts with them (a chat's earlier turns; `llama3.generate.prefix_cache`)."""
        if chat_template not in CHAT_TEMPLATE_CHOICES:  # before anything loads
            raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATE_CHOICES)}, got {chat_template!r}")
        if kernel not in (None, "auto"):
            from llama3.quant.choice import forced

            forced(kernel, quantize)  # refused before anything loads
        from llama3.parallel.tp import TensorParallel, local_device
        from llama3.weights.build import gguf_file
        from llama3.weights.hub import default_model, parse_device, resolve

        # under torchrun (WORLD_SIZE > 1) this process loads and runs its tensor-parallel share (llama3.tp)
        shard = TensorParallel.from_environment(parse_device(device))
        if shard is not None:
            if adapter is not None:
                raise ValueError("LoRA adapters are not supported with tensor parallelism (torchrun); merge it first")
            if compile:  # its collectives run in forward hooks, which the compiled block has not been tried with
                raise ValueError("compile=True is not supported with tensor parallelism (torchrun)")
            device = local_device(parse_device(device))
        path = resolve(default_model() if src is None else src)
        model = Transformer.from_pretrained(
            path, device, dtype, backend, quantize, progress, group_size, keep_output, shard, kernel
        )
        if adapter is not None:
            from llama3.model.lora import load_adapter

            load_adapter(model, adapter)
        gguf = gguf_file(path)
        if gguf is not None:
            from llama3.weights.gguf_tokenizer import load_gguf_tokenizer

            tokenizer = load_gguf_tokenizer(gguf)
        else:
            tokenizer = Tokenizer.from_pretrained(path)
        return cls(
            model,
            tokenizer,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            cuda_graphs=cuda_graphs,
            chat_template=chat_template,
            compile=compile,
            prefix_cache_tokens=prefix_cache_tokens,
        )

    @property
    def context_length(self) -> int:
        """The most tokens (prompt + new) one row can hold: the model's context, or `max_seq_len` if set."""
        return self.max_seq_len or self.model.args.max_seq_len

    @property
    def chat_format(self):
        if self._chat_format is None:
            self._chat_format = chat_format_for(self.tokenizer, self.chat_template)
        return self._chat_format

    # -- token level --------------------------------------------------------------------------

    def generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        seed: int | None = None,
        *,
        draft: Llama | None = None,
        speculate_k: int = 4,
        prompt_lookup: int | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
        **sampling: Any,
    ) -> list[list[int]]:
        """The new tokens of each prompt, up to (not including) its first stop token.

        stop_tokens None uses the tokenizer's; [] never stops. temperature 0 is greedy. `draft` (a smaller
        model with the same vocabulary) or `prompt_lookup` (the longest n-gram to look up in the prompt and
        the text so far) turns on speculative decoding, `speculate_k` guesses per step: the same tokens
        when greedy, the same distribution when sampling (see `llama3.speculative`); one prompt at a time.
        `json_schema` (a JSON Schema, a dict or its JSON text; the `json` extra): each answer is JSON valid against
        it (the tokens that cannot continue one are masked, `llama3.generate.grammar`), then a stop token, unless
        `max_new_tokens` cuts it first. `sampling`: the other fields of `SamplingParams` (`min_p`, ...).
        """
        params = SamplingParams(temperature, top_p, top_k, **sampling)
        out: list[list[int]] = [[] for _ in prompt_tokens]
        speculation = dict(draft=draft, speculate_k=speculate_k, prompt_lookup=prompt_lookup, json_schema=json_schema)
        for step in self._generate_stream(prompt_tokens, max_new_tokens, params, stop_tokens, seed, 8, **speculation):
            for row, token in enumerate(step):
                if token is not None:
                    out[row].append(token)
        return out

    def generate_stream(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        seed: int | None = None,
        sync_every: int = 1,
        *,
        draft: Llama | None = None,
        speculate_k: int = 4,
        prompt_lookup: int | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
        **sampling: Any,
    ) -> Iterator[list[int | None]]:
        """Yields, per decode step, each row's new token (None once the row has stopped).

        Tokens stay on the device for `sync_every` steps between host reads; the stop check needs
        the only sync. With `draft` or `prompt_lookup` (see `generate`) a step is one token of a
        speculative round, which syncs once per round. `sampling`: as in `generate`.
        """
        params = SamplingParams(temperature, top_p, top_k, **sampling)
        speculation = dict(draft=draft, speculate_k=speculate_k, prompt_lookup=prompt_lookup, json_schema=json_schema)
        yield from self._generate_stream(
            prompt_tokens, max_new_tokens, params, stop_tokens, seed, sync_every, **speculation
        )

    @torch.inference_mode()  # every public path (generate, the streams, text and chat) decodes through here
    def _generate_stream(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: SamplingParams,
        stop_tokens: Sequence[int] | None,
        seed: int | None,
        sync_every: int,
        *,
        draft: Llama | None,
        speculate_k: int,
        prompt_lookup: int | None,
        json_schema: Mapping[str, Any] | str | None = None,
    ) -> Iterator[list[int | None]]:
        check_seed(seed)
        prompts = self._check_prompts(prompt_tokens, max_new_tokens)
        stops = self._check_stop_tokens(stop_tokens)
        vocab = self.model.args.vocab_size
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:  # sorted: the last id is the largest
            raise ParamError("logit_bias", f"token ids must be in [0, {vocab}), got {params.logit_bias[-1][0]}")
        if json_schema is not None:  # an eager loop that masks each step's logits (llama3.generate.grammar)
            from llama3.generate.grammar import constrained_stream

            if draft is not None or prompt_lookup is not None:
                raise ValueError("json_schema does not combine with speculative decoding (draft, prompt_lookup)")
            yield from constrained_stream(self, prompts, max_new_tokens, params, stops, seed, json_schema)
            return
        if draft is not None or prompt_lookup is not None:
            for name in ("presence_penalty", "frequency_penalty"):  # counting the answer's tokens per guess: not yet
                if getattr(params, name) != 0:
                    raise ParamError(name, "is not supported with speculative decoding (a draft or prompt lookup)")
            from llama3.generate.speculative import speculate

            yield from speculate(self, prompts, max_new_tokens, params, stops, seed, draft, speculate_k, prompt_lookup)
            return
        if max_new_tokens == 0:
            self.last_stats = {
                "time_to_first_token_s": 0.0,
                "decode_steps": 0,
                "seconds": 0.0,
                "tokens_per_second": 0.0,
                "finish_reasons": ["length"] * len(prompts),
            }
            return
        B, lengths = len(prompts), [len(p) for p in prompts]
        L = max(lengths)
        self._ensure_cache(B, L + max_new_tokens)
        stop_ids = torch.tensor(stops, dtype=torch.long, device=self.device)
        step = self._decode_step(B, params)  # captured (if at all) before the prefill fills the cache
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())  # follows torch.manual_seed
        self._generator.manual_seed(seed)  # after the capture, whose warm-up draws random numbers

        t0 = time.perf_counter()
        tokens = torch.zeros(B, L, dtype=torch.long)
        for row, p in enumerate(prompts):
            tokens[row, : len(p)] = torch.tensor(p)
        tokens = tokens.to(self.device)
        pos = torch.tensor(lengths, device=self.device)  # slot of each row's next token
        start = self.prefix_cache.reuse(prompts) if self.prefix_cache is not None else 0  # slots 0..start-1 copied
        logits = self.model(
            tokens[:, start:], torch.arange(start, L, device=self.device), logits_pos=pos - 1 - start, kv_len=L
        )
        seen = seen_mask(prompts, self.model.args.vocab_size, self.device) if params.repetition_penalty != 1 else None
        next_tok = sample(logits[:, -1], params, self._generator, seen)
        step.start(seen)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        pending: list[tuple[Tensor, Tensor]] = []
        finished = [False] * B
        first_token_at = None
        i = fed = 0  # fed: decode steps run, each feeding back the tokens sampled before it
        sampled: list[list[int]] = []  # (step, row): the tokens read on the host
        try:
            for i in range(max_new_tokens):
                stopped = torch.isin(next_tok, stop_ids) if stops else torch.zeros_like(done)
                pending.append((next_tok, done | stopped))  # a row emits nothing once done
                done = done | stopped
                last = i == max_new_tokens - 1
                if len(pending) >= sync_every or last or i == 0:  # the first token at once: time to first token
                    step_tokens = torch.stack([t for t, _ in pending]).tolist()  # the host sync
                    step_done = torch.stack([d for _, d in pending]).tolist()
                    pending.clear()
                    sampled += step_tokens
                    for tok_row, done_row in zip(step_tokens, step_done, strict=True):
                        finished = [f or d for f, d in zip(finished, done_row, strict=True)]
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        yield [None if f else t for t, f in zip(tok_row, finished, strict=True)]
                    if all(finished) or last:
                        break
                next_tok = step(next_tok[:, None], pos[:, None], kv_len=L + i + 1)  # rows are at most at L + i
                pos = pos + 1
                fed += 1
        finally:  # also when the caller stops early (Ctrl-C in the CLI)
            elapsed = time.perf_counter() - t0
            ttft = (first_token_at or time.perf_counter()) - t0
            if self.prefix_cache is not None:
                fed_tokens = [[step_row[b] for step_row in sampled[:fed]] for b in range(B)]
                self.prefix_cache.keep(prompts, fed_tokens, stops)
            n = i + 1
            self.last_stats = {
                "time_to_first_token_s": ttft,
                "decode_steps": n,
                "seconds": elapsed,
                "tokens_per_second": (n - 1) / max(elapsed - ttft, 1e-9) if n > 1 else 0.0,
                "finish_reasons": ["stop" if f else "length" for f in finished],  # a stop token, or max_new_tokens
                "cached_prompt_tokens": start,  # per row, copied from the prefix cache
            }

    def _decode_step(self, batch_size: int, params: SamplingParams) -> DecodeStep:
        # with hooks set (`model.hooks`) the step runs eagerly: a replayed CUDA graph would skip them
        static = self.cuda_graphs and self.model.hooked is None
        key = (batch_size, params, static)
        if key not in self._steps:
            # static: captured on CUDA; on a CPU (cuda_graphs=True), or if the capture fails (it warns), the same
            # graph-form step runs eagerly
            self._steps[key] = DecodeStep(self.model, batch_size, params, self._generator, static, self._run_block)
        return self._steps[key]

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if isinstance(prompt_tokens, (str, bytes)) or not isinstance(prompt_tokens, Sequence):
            raise TypeError("prompt_tokens must be a list of token-id lists, e.g. [[128000, 9906]]")
        if not prompt_tokens:
            raise ValueError("prompt_tokens is empty: pass at least one prompt")
        check_max_new_tokens(max_new_tokens)
        vocab = self.model.args.vocab_size
        prompts = []
        for row, p in enumerate(prompt_tokens):
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
                raise TypeError(f"prompt {row} must be a list of token ids, got {type(p).__name__}")
            if len(p) == 0:
                raise ValueError(f"prompt {row} is empty; a prompt needs at least one token (e.g. BOS)")
            prompts.append(token_ids(p, vocab, f"prompt {row}"))
        need = max(len(p) for p in prompts) + max_new_tokens
        limit = self.context_length
        if need > limit:
            raise ValueError(
                f"longest prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens ({max_new_tokens}) = "
                f"{need} exceeds the {'cache' if self.max_seq_len else 'model context'} length of {limit}"
            )
        if self.max_batch_size is not None and len(prompts) > self.max_batch_size:
            raise ValueError(f"batch of {len(prompts)} prompts exceeds max_batch_size={self.max_batch_size}")
        return prompts

    def _check_stop_tokens(self, stop_tokens: Sequence[int] | None) -> list[int]:
        if stop_tokens is None:
            return list(self.tokenizer.stop_tokens)
        if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, Sequence):
            raise TypeError(f"stop_tokens must be a list of token ids (or None), got {type(stop_tokens).__name__}")
        return token_ids(stop_tokens, self.model.args.vocab_size, "stop_tokens")

    def _ensure_cache(self, batch_size: int, seq_len: int) -> None:
        m = self.model
        if self.max_seq_len is not None or self.max_batch_size is not None:
            B, S = self.max_batch_size or batch_size, self.max_seq_len or seq_len
            if m.max_batch_size < batch_size or m.max_seq_len < seq_len or (m.max_batch_size, m.max_seq_len) != (B, S):
                m.setup_cache(max(B, batch_size), max(S, seq_len))
                self._steps.clear()
            return
        if m.max_batch_size >= batch_size and m.max_seq_len >= seq_len:
            return
        # grow in steps of 256 slots so a chat does not reallocate (and recapture graphs) every turn
        S = min(-(-seq_len // 256) * 256, m.args.max_seq_len)
        m.setup_cache(max(batch_size, m.max_batch_size), max(S, m.max_seq_len))
        self._steps.clear()

    # -- text level ---------------------------------------------------------------------------

    def text_completion(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 256,
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        *,
        draft: Llama | None = None,
        speculate_k: int = 4,
        prompt_lookup: int | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
        **sampling: Any,
    ) -> list[str]:
        """Continues each prompt (encoded with BOS); returns the new text only, cut before any `stop` string.
        `draft`, `speculate_k`, `prompt_lookup`: speculative decoding, `sampling`: as in `generate`."""
        params = SamplingParams(temperature, top_p, top_k, **sampling)
        if (
            isinstance(prompts, str)
            or not isinstance(prompts, Sequence)
            or not all(isinstance(p, str) for p in prompts)
        ):
            raise TypeError("text_completion takes a list of prompt strings, e.g. ['The capital of France is']")
        tokens = [self.tokenizer.encode(p, bos=True) for p in prompts]
        speculation = dict(draft=draft, speculate_k=speculate_k, prompt_lookup=prompt_lookup, json_schema=json_schema)
        return self._complete(tokens, max_new_tokens, stop, params, stop_tokens, seed, **speculation)

    def chat_completion(
        self,
        dialogs: Sequence[Dialog],
        max_new_tokens: int = 512,
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        *,
        draft: Llama | None = None,
        speculate_k: int = 4,
        prompt_lookup: int | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
        **sampling: Any,
    ) -> list[Message]:
        """The assistant's reply to each dialog, as {"role": "assistant", "content": ...}; `draft`,
        `speculate_k`, `prompt_lookup`: speculative decoding, `sampling`: as in `generate`."""
        params = SamplingParams(temperature, top_p, top_k, **sampling)
        if (
            isinstance(dialogs, (str, Mapping))
            or not isinstance(dialogs, Sequence)
            or any(isinstance(d, Mapping) for d in dialogs)
        ):
            raise TypeError("chat_completion takes a list of dialogs, each a list of messages: [[{'role': ..., ...}]]")
        tokens = [self.chat_format.encode_dialog_prompt(d) for d in dialogs]
        speculation = dict(draft=draft, speculate_k=speculate_k, prompt_lookup=prompt_lookup, json_schema=json_schema)
        texts = self._complete(tokens, max_new_tokens, stop, params, self.chat_stop_tokens, seed, **speculation)
        return [{"role": "assistant", "content": text} for text in texts]

    def stream(
        self,
        prompt_tokens: Sequence[int],
        max_new_tokens: int = 256,
        *,
        stop: str | Sequence[str] | None = None,
        stop_tokens: Sequence[int] | None = None,
        seed: int | None = None,
        draft: Llama | None = None,
        speculate_k: int = 4,
        prompt_lookup: int | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
        **sampling: Any,
    ) -> Iterator[tuple[int | None, str]]:
        """Yields each new token of one prompt with the text it completes (often "" while a UTF-8 character
        or a possible `stop` string is incomplete), then (None, text held back) if any is left. Takes
        `generate`'s options and `stop`; afterwards `last_stats["finish_reasons"][0]` is "stop" (a stop
        token or string) or "length"."""
        params = SamplingParams(**sampling)
        speculation = dict(draft=draft, speculate_k=speculate_k, prompt_lookup=prompt_lookup, json_schema=json_schema)
        rows = self._stream_rows([prompt_tokens], max_new_tokens, stop, params, stop_tokens, seed, 1, **speculation)
        for _, token, text in rows:
            if token is not None or text:
                yield token, text

    def stream_completion(self, prompt: str, max_new_tokens: int = 256, **kwargs) -> Iterator[str]:
        """Yields the continuation of one prompt as text pieces, UTF-8 safe."""
        for _, text in self.stream(self.tokenizer.encode(prompt, bos=True), max_new_tokens, **kwargs):
            if text:
                yield text

    def stream_chat(self, dialog: Dialog, max_new_tokens: int = 512, **kwargs) -> Iterator[str]:
        """Yields the assistant's reply to one dialog as text pieces."""
        kwargs.setdefault("stop_tokens", self.chat_stop_tokens)
        for _, text in self.stream(self.chat_format.encode_dialog_prompt(dialog), max_new_tokens, **kwargs):
            if text:
                yield text

    def _complete(
        self, prompts: list[list[int]], max_new_tokens: int, stop, params, stop_tokens, seed, **speculation
    ) -> list[str]:
        texts = [""] * len(prompts)
        rows = self._stream_rows(prompts, max_new_tokens, stop, params, stop_tokens, seed, 8, **speculation)
        for row, _, text in rows:
            texts[row] += text
        return texts

    def _stream_rows(
        self,
        prompts,
        max_new_tokens: int,
        stop: str | Sequence[str] | None,
        params: SamplingParams,
        stop_tokens: Sequence[int] | None,
        seed: int | None,
        sync_every: int,
        **speculation,
    ) -> Iterator[tuple[int, int | None, str]]:
        """(row, token, text) for each new token of each row; then (row, None, held-back text) as each row ends.

        A row ends at a stop token (not shown), at a `stop` string (cut before it) or at max_new_tokens;
        the generation ends when every row has.
        """
        texts = [TextStream(self.tokenizer, stop) for _ in prompts]
        reasons: list[str | None] = [None] * len(prompts)
        steps = self._generate_stream(prompts, max_new_tokens, params, stop_tokens, seed, sync_every, **speculation)
        with contextlib.closing(steps):  # also when the caller stops early: the stats get recorded
            for step in steps:
                for row, token in enumerate(step):
                    if reasons[row] is not None:
                        continue
                    if token is None:  # a stop token
                        reasons[row] = "stop"
                        yield row, None, texts[row].flush()
                        continue
                    text = texts[row].push(token)
                    if texts[row].stopped:  # a stop string
                        reasons[row] = "stop"
                    yield row, token, text
                if all(r is not None for r in reasons):
                    break
        for row, reason in enumerate(reasons):
            if reason is None:
                reasons[row] = "length"
                yield row, None, texts[row].flush()
        self.last_stats["finish_reasons"] = reasons

    @property
    def chat_stop_tokens(self) -> list[int]:
        """What ends an assistant turn: the chat format's end-of-turn token and the tokenizer's stop tokens."""
        return sorted(set(self.chat_format.stop_tokens) | set(self.tokenizer.stop_tokens))
