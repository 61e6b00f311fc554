"""Continuous batching: one thread owns the model and runs many requests in one batch, each in its own
row of the static KV cache, joining and leaving between decode steps.

Each loop of the scheduler thread:
1. admits waiting requests into free cache rows (the lowest free row first, so the rows in use stay packed
   at the front of the batch);
2. prefills: up to `prefill_chunk` prompt tokens of the rows that are still reading their prompt, in
   chunks, so a long prompt never stalls the running streams for more than one chunk; a row whose prompt
   is all in the cache samples its first token;
3. runs one decode step over the rows that are generating, samples each row with its own settings and
   its own `torch.Generator`, and hands each new token to its request. A row that reaches a stop token, a
   stop string or its token budget leaves at once, freeing its row for the next request.

Why the rows stay independent: the model writes token (b, t) at cache slot input_pos[b, t] and lets it
attend to slots 0..input_pos[b, t] of row b only (`Transformer.forward`), so a row computes what it would
alone, whatever the other rows hold. A prefill touches only its own rows: the layers' caches are swapped,
for that forward, for views of those rows (adjacent rows, prefilled together). In a decode step, rows that
are not generating (free, or half-way through their prompt) run a dummy token at the last slot of their own
row, a slot no request ever reads: a request of P prompt and N new tokens writes slots 0..P+N-2 and P+N <=
the context. Sampling draws from each request's own generator, seeded from the request, with the same calls
as `Llama.generate` makes for that request alone, so a seeded request gets the same tokens whatever else
runs beside it.

With the prefix cache (`llama3.generate.prefix_cache`, on by default), a row first copies the cached blocks its
prompt starts with into its slots and prefills only the rest; each prefill chunk stores its full blocks at once,
and a row whose next block an older row is computing waits for it rather than computing it too, so
requests that arrive together with the same system prompt compute it once. A finished row stores its prompt and
answer for the next turn of its conversation.

The decode step has a fixed shape on CUDA (every row of the batch, the whole cache attended, masked) and
is captured once in a CUDA graph; elsewhere it runs eagerly over the rows up to the last one generating,
attending only to the slots in use. Sampling runs eagerly after the step, per row.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llama3.generate.grammar import Constraint
from llama3.generate.graphs import CapturedStep
from llama3.generate.llama import Llama
from llama3.generate.params import SamplingParams
from llama3.generate.prefix_cache import PrefixCache, block_hashes
from llama3.generate.sampling import sample, seen_mask
from llama3.generate.stream import TextStream
from llama3.serve.scoring import TokenLogprob, prompt_logprobs

log = logging.getLogger("llama3.engine")


class QueueFull(RuntimeError):
    """The wait queue is at its bound: the caller should retry later (HTTP 429)."""


@dataclass
class Output:
    """What a request receives from the scheduler thread, one per new token and one at its end.

    `token` is the new token id (None in the final output), `text` the text it completes (stop strings never
    shown; the final output carries text held back until the end), `logprob` the token's log-probability under
    the model (log-softmax of the raw logits) and `top` the most likely tokens with theirs, when asked for.
    """

    token: int | None = None
    text: str = ""
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" or "length"; "error" if the engine failed
    error: str | None = None
    completion_tokens: int = 0  # in the final output: tokens generated, the stop token included
    cached_tokens: int = 0  # in the final output: prompt tokens copied from the prefix cache, not computed
    time_to_first_token_s: float = 0.0
    # once, before the first token (or in the final output when none is asked for): the prompt's tokens with
    # their log-probabilities, when asked for (`GenerationRequest.prompt_logprobs`; the first token has none)
    prompt_logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0  # in the final output, with `score`: the sum of the tokens' logprobs


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to generate (one choice of an API request): it takes one row of the batch."""

    prompt: list[int]
    max_new_tokens: int
    emit: Callable[[Output], None]  # called from the scheduler thread; must not block
    params: SamplingParams = field(default_factory=lambda: SamplingParams(0.0, 1.0, None))
    seed: int | None = None
    stop_tokens: Sequence[int] = ()
    stop: Sequence[str] = ()
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    prompt_logprobs: int | None = None  # as `logprobs`, for each prompt token (echo); max_new_tokens may then be 0
    score: bool = False  # sum the generated tokens' logprobs (the stop token's included): best_of's ranking
    # another request of the same prompt submitted with this one (choices of one API request): its prefill is
    # copied into this row instead of being computed again, if both are in the batch when it ends
    copy_of: GenerationRequest | None = None
    constraint: Constraint | None = None  # a grammar the answer must follow (structured output, forced tool calls)
    cancelled: bool = False  # set by `Engine.cancel` (a client that went away)
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Row:
    req: GenerationRequest
    index: int
    text: TextStream
    generator: torch.Generator
    stop_ids: frozenset[int]
    prefilled: int = 0  # prompt tokens in the cache
    generated: int = 0
    last_token: int = 0
    first_token_at: float | None = None
    seen: Tensor | None = None  # (1, V) the prompt and the tokens so far, for repetition_penalty
    counts: Tensor | None = None  # (1, V) how often each token was generated, for the presence/frequency penalties
    prompt_lp: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    tokens: list[int] = field(default_factory=list)  # the tokens generated (for the prefix cache)
    hashes: list[int] = field(default_factory=list)  # the prompt's `block_hashes` (with the prefix cache)
    cached: int = 0  # prompt tokens copied from the prefix cache

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.req.prompt)

    @property
    def next_slot(self) -> int:  # where the last sampled token goes in the next decode step
        return len(self.req.prompt) + self.generated - 1


class Engine:
    """The scheduler: `submit` requests from any thread, receive `Output`s through each request's `emit`.

    The engine owns the model's KV cache (`max_batch_size` rows of `max_seq_len` slots) while it runs: do not
    call `llm.generate` on the same model at the same time.
    """

    def __init__(
        self,
        llm: Llama,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        static_decode: bool | None = None,
        prefix_cache_tokens: int | None = None,
    ):
        if max_batch_size < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1, max_queue >= 0")
        self.llm, self.model, self.tokenizer = llm, llm.model, llm.tokenizer
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.max_seq_len = min(max_seq_len or llm.context_length, self.model.args.max_seq_len)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        self.device = llm.device
        # static: every row, the whole cache, fixed buffers: the form a CUDA graph captures (eager off CUDA: tests)
        self.static_decode = self.device.type == "cuda" if static_decode is None else static_decode
        self._rows: list[_Row | None] = [None] * max_batch_size
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._static_step: CapturedStep | None = None  # the decode step with static_decode
        self.steps = 0  # decode steps run
        self.tokens_generated = 0
        # prompt tokens run through the model (not those copied from the prefix cache or from another choice's row)
        self.prompt_tokens_computed = 0
        # the prefix cache (llama3.generate.prefix_cache): by default as many tokens as the batch's rows hold; 0: off
        if prefix_cache_tokens is None:
            prefix_cache_tokens = max_batch_size * self.max_seq_len
        self.prefix_cache = PrefixCache(self.model, prefix_cache_tokens) if prefix_cache_tokens != 0 else None

    # -- the caller's side (any thread) --------------------------------------------------------------

    def start(self) -> Engine:
        """Starts the scheduler thread once it has set up the KV cache (an error doing so is raised here).

        The cache is made in that thread, as everything the model computes is: a thread that starts an OpenMP
        team (zero-filling a large cache does) keeps it for its life, and GNU OpenMP stops spinning its threads
        once it manages more threads than there are CPUs, so a team on the caller's thread made each operation of
        every CPU decode step wait for the engine's threads to wake up (`llama3 serve` decoded at 43 tok/s, 110 without
        it, against `llama3 generate`'s 114: benchmarks/results/serve-cli-cpu.md)."""
        ready, failed = threading.Event(), []
        self._thread = threading.Thread(target=self._run, args=(ready, failed), name="llama3-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            self._thread.join()
            raise failed[0]
        return self

    def _setup(self) -> None:
        self.model.setup_cache(self.max_batch_size, self.max_seq_len)
        self._full_caches = [layer.attention.cache for layer in self.model.layers]
        if self.static_decode:
            self._setup_static()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, requests: Sequence[GenerationRequest]) -> None:
        """Queues the requests (all or none); QueueFull if the wait queue would pass its bound."""
        for r in requests:
            least = 0 if r.prompt_logprobs is not None else 1  # scoring a prompt alone needs no new token
            if len(r.prompt) < 1 or r.max_new_tokens < least or len(r.prompt) + r.max_new_tokens > self.max_seq_len:
                raise ValueError(
                    f"a request of {len(r.prompt)} prompt and {r.max_new_tokens} new tokens does not fit "
                    f"the {self.max_seq_len}-token context"
                )
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            # requests beyond the free rows wait; at most max_queue of them
            if len(self._waiting) + len(requests) - self._rows.count(None) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the bound is {self.max_queue})")
            self._waiting.extend(requests)
            self._cond.notify_all()

    def cancel(self, request: GenerationRequest) -> None:
        """Frees the request's row (or drops it from the queue) before the next step; it emits nothing more."""
        with self._cond:
            request.cancelled = True
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    # -- the scheduler thread ----------------------------------------------------------------------------

    def _run(self, ready: threading.Event, failed: list[BaseException]) -> None:
        try:
            self._setup()
        except BaseException as e:  # raised again by `start`, in the caller's thread
            failed.append(e)
            return
        finally:
            ready.set()
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and self.running == 0:
                        self._cond.wait(timeout=1.0)
                    if self._stopping:
                        break
                    self._admit()
                try:
                    self._drop_cancelled()
                    self._prefill()
                    self._drop_cancelled()
                    self._decode()
                except Exception as e:  # a failed step fails the requests in the batch, not the server
                    log.exception("generation step failed")
                    for row in self._rows:
                        if row is not None:
                            self._finish(row, "error", error=f"generation failed: {type(e).__name__}")
        with self._cond:
            for row in self._rows:
                if row is not None:
                    self._finish(row, "error", error="the server is shutting down")
            while self._waiting:
                self._send(self._waiting.popleft(), Output(finish_reason="error", error="the server is shutting down"))

    def _admit(self) -> None:
        while self._waiting and None in self._rows:
            req = self._waiting.popleft()
            if req.cancelled:
                continue
            index = self._rows.index(None)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(secrets.randbits(63) if req.seed is None else req.seed)
            self._rows[index] = _Row(
                req, index, TextStream(self.tokenizer, list(req.stop)), generator, frozenset(req.stop_tokens)
            )
            if self.prefix_cache is not None:
                self._rows[index].hashes = block_hashes(req.prompt, self.prefix_cache.block_size)

    def _drop_cancelled(self) -> None:
        for i, row in enumerate(self._rows):
            if row is not None and row.req.cancelled:
                self._rows[i] = None

    def _prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens, oldest requests first; a finished prompt samples its first token.

        Rows in adjacent cache rows (requests that arrived together) share one forward, right-padded as
        `Llama.generate` pads a ragged batch; padding goes to the scratch slot, as idle rows do in a decode step.
        """
        budget, chunks = self.prefill_chunk, []
        coming: set[int] = set()  # blocks that older rows are computing (with the prefix cache)
        for row in sorted(
            (r for r in self._rows if r is not None and not r.decoding), key=lambda r: r.req.submitted_at
        ):
            if budget <= 0:
                break
            if self._source(row) is not None:
                continue  # its prompt's prefill is under way in another row, and will be copied here
            if self.prefix_cache is not None and row.req.prompt_logprobs is None:  # echo scores every prompt token
                self._reuse(row)
                k = row.prefilled // self.prefix_cache.block_size
                if k < len(row.hashes) and row.hashes[k] in coming:
                    continue  # an older row computes this block now: copy it from the cache next time
                coming.update(row.hashes[k:])
            end = min(len(row.req.prompt), row.prefilled + budget)
            chunks.append((row, row.prefilled, end))
            budget -= end - row.prefilled
            self.prompt_tokens_computed += end - row.prefilled
        chunks.sort(key=lambda c: c[0].index)
        while chunks:
            n = 1
            while n < len(chunks) and chunks[n][0].index == chunks[0][0].index + n:
                n += 1
            group, chunks = chunks[:n], chunks[n:]
            T = max(end - start for _, start, end in group)
            tokens = torch.zeros(n, T, dtype=torch.long)
            input_pos = torch.full((n, T), self.max_seq_len - 1, dtype=torch.long)
            for b, (row, start, end) in enumerate(group):
                tokens[b, : end - start] = torch.tensor(row.req.prompt[start:end])
                input_pos[b, : end - start] = torch.arange(start, end)
            last = torch.tensor([end - start - 1 for _, start, end in group], device=self.device)
            kv_len = max(e for *_, e in group)
            with self._cache_rows(group[0][0].index, n):
                if any(row.req.prompt_logprobs is not None for row, _, _ in group):  # every position's hidden state
                    h = self.model.hidden(tokens.to(self.device), input_pos.to(self.device), kv_len=kv_len)
                    logits = self.model.ops.linear(
                        h[torch.arange(n, device=self.device), last][:, None], self.model.output
                    )
                else:
                    logits = self.model(
                        tokens.to(self.device), input_pos.to(self.device), logits_pos=last, kv_len=kv_len
                    )
            for b, (row, start, end) in enumerate(group):
                if row.req.prompt_logprobs is not None:  # positions start..end-1 predict the prompt's tokens after
                    targets = row.req.prompt[start + 1 : end + 1]
                    row.prompt_lp += prompt_logprobs(self.model, h[b, : len(targets)], targets, row.req.prompt_logprobs)
                row.prefilled = end
                if self.prefix_cache is not None:  # its blocks serve the rows that wait for them at once
                    self.prefix_cache.store(self._full_caches, row.index, row.req.prompt[:end])
            done = [(b, row) for b, (row, _, _) in enumerate(group) if row.decoding]
            done += [(b, copy) for b, row in done for copy in self._copy_prefill(row)]
            for _, row in done:
                if row.req.prompt_logprobs is not None:
                    self._send(row.req, Output(prompt_logprobs=[TokenLogprob(None, None), *row.prompt_lp]))
            for _, row in [d for d in done if d[1].req.max_new_tokens == 0]:
                self._finish(row, "length")
            done = [d for d in done if d[1].req.max_new_tokens > 0]
            if done:
                self._sample([row for _, row in done], logits[:, -1], [b for b, _ in done])

    def _source(self, row: _Row) -> _Row | None:
        """The row whose prompt's prefill `row` waits for (`copy_of`, in the batch and still prefilling)."""
        source = row.req.copy_of
        if source is None or row.prefilled:
            return None
        return next((r for r in self._rows if r is not None and r.req is source and not r.decoding), None)

    def _copy_prefill(self, row: _Row) -> list[_Row]:
        """`row`'s prompt, just prefilled, copied into the cache rows of the requests waiting for it."""
        copies = [r for r in self._rows if r is not None and r.req.copy_of is row.req and not r.prefilled]
        P = len(row.req.prompt)
        for r in copies:
            for cache in self._full_caches:
                cache.k[r.index, :, :P] = cache.k[row.index, :, :P]
                cache.v[r.index, :, :P] = cache.v[row.index, :, :P]
            r.prefilled, r.prompt_lp = P, row.prompt_lp
        return copies

    def _reuse(self, row: _Row) -> None:
        """Copies the cached blocks that continue the row's prompt past what it holds into its row of the cache,
        all but the prompt's last token (whose logits give the first new token)."""
        cache, prompt = self.prefix_cache, row.req.prompt
        slots = cache.lookup(prompt)
        n = min(len(slots) * cache.block_size, len(prompt) - 1)
        if n > row.prefilled:
            cache.load(self._full_caches, row.index, slots, n, first=row.prefilled)
            row.cached += n - row.prefilled
            row.prefilled = n

    @contextlib.contextmanager
    def _cache_rows(self, first: int, n: int):
        """The model's caches swapped, for one forward, for views of rows first..first+n-1 (a batch of n writes
        there)."""
        layers = self.model.layers
        for layer, cache in zip(layers, self._full_caches, strict=True):
            layer.attention.cache = cache.rows(first, n)
        try:
            yield
        finally:
            for layer, cache in zip(layers, self._full_caches, strict=True):
                layer.attention.cache = cache

    def _decode(self) -> None:
        rows = [r for r in self._rows if r is not None and r.decoding]
        if not rows:
            return
        S = self.max_seq_len
        B = self.max_batch_size if self.static_decode else max(r.index for r in rows) + 1
        tokens = [0] * B
        slots = [S - 1] * B  # rows not generating: a dummy token at a slot no request reads
        for r in rows:
            tokens[r.index], slots[r.index] = r.last_token, r.next_slot
        tokens_t = torch.tensor(tokens, device=self.device)[:, None]
        slots_t = torch.tensor(slots, device=self.device)[:, None]
        if self.static_decode:
            logits = self._static_step(tokens_t, slots_t)
        else:
            logits = self.model(tokens_t, slots_t, kv_len=max(r.next_slot for r in rows) + 1)
        self.steps += 1
        self._sample(rows, logits[:, -1], [r.index for r in rows])

    def _setup_static(self) -> None:
        B = self.max_batch_size
        tokens = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        slots = torch.full((B, 1), self.max_seq_len - 1, dtype=torch.long, device=self.device)
        # the logits are sampled (and read on the host) before the next step overwrites them: no clone
        self._static_step = CapturedStep(self.model, (tokens, slots), clone=False)

    def _sample(self, rows: list[_Row], logits: Tensor, where: list[int]) -> None:
        """logits (B, vocab), rows[i]'s at where[i]: each row's next token."""
        at = {r.index: w for r, w in zip(rows, where, strict=True)}
        raw = logits  # logprobs are the model's own, before a grammar's mask (as vLLM reports them)
        if any(r.req.constraint is not None for r in rows):
            logits = logits.float().clone(memory_format=torch.contiguous_format)
            for r in rows:
                if r.req.constraint is not None:
                    r.req.constraint.mask_(logits[at[r.index]])
        picked: dict[int, Tensor] = {}
        plain = [r for r in rows if r.req.params.stateless and not r.req.params.logit_bias]  # raw logits' argmax
        greedy = [r for r in plain if r.req.params.temperature <= 0]
        if greedy:
            idx = torch.tensor([at[r.index] for r in greedy], device=logits.device)
            for r, t in zip(greedy, logits[idx].float().argmax(dim=-1), strict=True):
                picked[r.index] = t
        for r in rows:
            if r.index not in picked:
                p, i = r.req.params, at[r.index]
                if p.repetition_penalty != 1 and r.seen is None:
                    r.seen = seen_mask([r.req.prompt], logits.shape[-1], logits.device)
                if (p.presence_penalty != 0 or p.frequency_penalty != 0) and r.counts is None:
                    r.counts = torch.zeros(1, logits.shape[-1], device=logits.device)  # nothing generated yet
                picked[r.index] = sample(logits[i : i + 1], p, r.generator, r.seen, r.counts)[0]
                if r.seen is not None:
                    r.seen[0, picked[r.index]] = True
                if r.counts is not None:
                    r.counts[0, picked[r.index]] += 1
        want = [r for r in rows if r.req.logprobs is not None or r.req.score]
        logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        if want:
            idx = torch.tensor([at[r.index] for r in want], device=logits.device)
            chosen = torch.stack([picked[r.index] for r in want])
            lp = raw[idx].float().log_softmax(dim=-1)
            k = max(r.req.logprobs or 0 for r in want)
            top = lp.topk(k, dim=-1) if k else None
            chosen_lp = lp.gather(1, chosen[:, None])[:, 0].tolist()
            top_v, top_i = (top.values.tolist(), top.indices.tolist()) if top is not None else ([[]] * len(want),) * 2
            for j, r in enumerate(want):
                n = r.req.logprobs or 0
                r.cumulative_logprob += chosen_lp[j]
                logprobs[r.index] = (chosen_lp[j], list(zip(top_i[j][:n], top_v[j][:n], strict=True)))
        ids = torch.stack([picked[r.index] for r in rows]).tolist()  # the one host sync of the step
        now = time.perf_counter()
        for r, token in zip(rows, ids, strict=True):
            r.generated += 1
            r.tokens.append(token)
            self.tokens_generated += 1
            if r.first_token_at is None:
                r.first_token_at = now
            if r.req.constraint is not None:
                r.req.constraint.accept(token)
            if token in r.stop_ids:
                self._finish(r, "stop")
                continue
            lp, top = logprobs.get(r.index, (None, None))
            text = r.text.push(token)
            r.last_token = token
            self._send(r.req, Output(token=token, text=text, logprob=lp, top=top))
            if r.text.stopped:
                self._finish(r, "stop")
            elif r.generated >= r.req.max_new_tokens:
                self._finish(r, "length")

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        if error is None and self.prefix_cache is not None:  # the prompt and every token fed (not the last one)
            self.prefix_cache.store(self._full_caches, row.index, row.req.prompt + row.tokens[:-1])
        self._rows[row.index] = None
        text = row.text.flush() if error is None else ""
        ttft = (row.first_token_at or time.perf_counter()) - row.req.submitted_at
        out = Output(text=text, finish_reason=reason, error=error, completion_tokens=row.generated)
        out.cumulative_logprob = row.cumulative_logprob
        out.cached_tokens = row.cached
        out.time_to_first_token_s = ttft
        self._send(row.req, out)

    def _send(self, req: GenerationRequest, out: Output) -> None:
        if req.cancelled:
            return
        try:
            req.emit(out)
        except Exception:  # a receiver that is gone (its event loop closed) must not stop the engine
            log.debug("could not deliver an output", exc_info=True)
