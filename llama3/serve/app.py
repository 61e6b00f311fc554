"""An OpenAI-compatible HTTP server: `create_app(llm)` returns a Starlette ASGI app; `llama3 serve` runs it
with uvicorn.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics

Requests are checked against the schemas of `llama3.protocol` (bad ones get OpenAI's error body, naming the
field), turned into one `GenerationRequest` per choice and handed to the continuous-batching scheduler of
`llama3.engine`, whose thread owns the model. Outputs come back to the event loop through an asyncio queue per
request; streams are server-sent events ending with `data: [DONE]`. A client that goes away (a closed stream,
or a dropped connection while a plain request waits) has its rows freed before the next decode step.

Needs the `serve` extra (`pip install llama3[serve]`: starlette, uvicorn, pydantic, prometheus-client).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llama3.generate.llama import Llama
from llama3.generate.params import KNOBS, SamplingParams
from llama3.serve.engine import Engine, GenerationRequest, Output, QueueFull
from llama3.serve.metrics import Metrics
from llama3.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ModelCard,
    ModelList,
    RequestError,
    SamplingRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
    error_body,
    new_id,
    now,
    parse_request,
)
from llama3.serve.scoring import best_choices, echo
from llama3.serve.tokenize import tokenizer_routes
from llama3.serve.tools import ChatPlan

log = logging.getLogger("llama3.serve")


MAX_BODY_BYTES = 4 * 1024 * 1024


_API_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


DISCONNECT_POLL_S = 0.5  # how often a plain (not streamed) request checks that its client is still there


def _error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(RequestError(message, param, code, status).body(), status_code=status, headers=headers)


class _Gate:
    """ASGI middleware in front of every route: the API key (constant-time compare; /health is open), the
    declared body size, and the request counter of /metrics."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics | None):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = None
        if self.api_key is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            scheme, _, key = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
                refusal = _error(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
                refusal.headers["WWW-Authenticate"] = "Bearer"
        length = headers.get(b"content-length")
        if refusal is None and length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            refusal = _error(413, f"the request body is over {self.max_body_bytes} bytes", code="body_too_large")
        status = {}

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if refusal is not None:
            await refusal(scope, receive, counting_send)
        else:
            await self.app(scope, receive, counting_send)
        if self.metrics is not None and scope["path"].startswith("/v1/"):  # any other path: one label, not one each
            path = scope["path"] if scope["path"] in _API_PATHS else "other"
            self.metrics.requests.labels(path, str(status.get("code", 0))).inc()


@dataclass
class _Choice:
    """What one choice has produced so far."""

    index: int
    prompt_tokens: int
    text: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    ttft: float = 0.0
    prompt_logprobs: list | None = None  # with echo: the prompt's tokens' (engine.TokenLogprob)
    cumulative_logprob: float = 0.0  # with best_of: the sum of the generated tokens' logprobs


class _Server:
    """The endpoints of one app over one model and its engine."""

    def __init__(
        self, llm: Llama, engine: Engine, model_name: str, max_body_bytes: int, metrics: Metrics | None, guard
    ):
        self.llm, self.engine, self.model_name = llm, engine, model_name
        self.max_body_bytes, self.metrics = max_body_bytes, metrics
        self.guard, self._guard_lock = guard, threading.Lock()  # the guard model runs one conversation at a time
        self.created = now()

    # -- routes ----------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.engine.max_seq_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def metrics_route(self, request: Request) -> Response:
        if self.metrics is None:
            return _error(404, "metrics need the prometheus-client package (pip install 'llama3[serve]')")
        return self.metrics.render()

    async def chat_completions(self, request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await self._body(request))
        self._check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        plan = await asyncio.to_thread(ChatPlan.of, self.llm, req)  # tools, tool_choice, response_format
        try:
            prompt = await asyncio.to_thread(plan.encode)
        except ValueError as e:
            raise RequestError(f"messages: {e}", param="messages") from None
        await self._screen([m for m in messages if m["role"] in ("user", "assistant")], "messages")
        return await self._generate(request, req, [prompt], self.llm.chat_stop_tokens, chat=True, plan=plan)

    async def completions(self, request: Request) -> Response:
        req = parse_request(CompletionRequest, await self._body(request))
        self._check_model(req.model)
        vocab = self.llm.model.args.vocab_size
        prompts = []
        for p in req.prompts():
            if isinstance(p, str):
                await self._screen([{"role": "user", "content": p}], "prompt")
                prompts.append(await asyncio.to_thread(self.llm.tokenizer.encode, p, bos=True))
            elif all(0 <= t < vocab for t in p):
                prompts.append(p)
            else:
                raise RequestError(f"prompt: token ids must be in [0, {vocab})", param="prompt")
        return await self._generate(request, req, prompts, list(self.llm.tokenizer.stop_tokens), chat=False)

    # -- the shared path -------------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        """The body, refused as soon as it passes the bound (a chunked body declares no length)."""
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise RequestError(
                        f"the request body is over {self.max_body_bytes} bytes", code="body_too_large", status=413
                    )
                chunks.append(chunk)
        except ClientDisconnect:
            raise RequestError("the client went away", status=400) from None
        return b"".join(chunks)

    async def _screen(self, conversation: list[dict[str, str]], where: str) -> None:
        """With a Llama Guard model (--guard), an unsafe last message is refused before the model sees it."""
        if self.guard is None:
            return
        from llama3.guard import classify, describe_categories

        def check():
            with self._guard_lock:
                return classify(self.guard, conversation)

        try:
            result = await asyncio.to_thread(check)
        except ValueError as e:
            raise RequestError(f"{where}: Llama Guard cannot read it: {e}", param=where) from None
        if not result.safe:
            raise RequestError(
                f"{where}: refused as unsafe by Llama Guard ({describe_categories(self.guard, result.categories)})",
                param=where,
                code="content_filter",
            )

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise RequestError(
                f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
                status=404,
            )

    def _requests(
        self, req: SamplingRequest, prompts: list[list[int]], stop_tokens: list[int], queue: asyncio.Queue, plan=None
    ) -> list[GenerationRequest]:
        """One GenerationRequest per choice: prompt i's j-th choice is choice i * n + j, seeded seed + j."""
        context = self.engine.max_seq_len
        where = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        try:
            sent = {k: getattr(req, k) for k in KNOBS if getattr(req, k) is not None}
            params = SamplingParams(**{"temperature": 1.0, "top_p": 1.0, **sent})  # OpenAI's defaults
        except ValueError as e:
            raise RequestError(str(e), param=getattr(e, "param", None)) from None
        vocab = self.llm.model.args.vocab_size
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:  # sorted: the last id is the largest
            raise RequestError(f"logit_bias: token ids must be in [0, {vocab})", param="logit_bias")
        per, many = req.samples, "best_of" if req.samples > req.n else "n"
        if len(prompts) * per > self.engine.max_batch_size + self.engine.max_queue:
            raise RequestError(
                f"{many}: {len(prompts) * per} choices cannot fit this server's {self.engine.max_batch_size} rows "
                f"and {self.engine.max_queue} queue places",
                param=many,
            )
        echo = getattr(req, "echo", False)  # with echo, the prompt's logprobs (also what max_tokens 0 asks for)
        loop = asyncio.get_running_loop()
        out = []
        for i, prompt in enumerate(prompts):
            budget = req.max_new_tokens if req.max_new_tokens is not None else context - len(prompt)
            if len(prompt) + max(budget, 1) > context:
                raise RequestError(
                    f"this model's context is {context} tokens; the {where} takes {len(prompt)} and "
                    f"{budget} were asked for the completion",
                    param=where if req.max_new_tokens is None else "max_tokens",
                    code="context_length_exceeded",
                )
            first = len(out)
            for j in range(per):
                index = i * per + j

                def emit(o: Output, index: int = index) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, o))

                out.append(
                    GenerationRequest(
                        prompt=prompt,
                        max_new_tokens=budget,
                        emit=emit,
                        params=params,
                        seed=None if req.seed is None else (req.seed + j) % 2**64,
                        stop_tokens=stop_tokens,
                        stop=req.stop_strings,
                        logprobs=req.n_logprobs,
                        prompt_logprobs=(req.n_logprobs or 0) if echo else None,
                        score=per > req.n,
                        copy_of=out[first] if j else None,  # one prefill per prompt, copied to its other choices
                        constraint=plan.constraint(stop_tokens) if plan is not None else None,
                    )
                )
        return out

    async def _generate(
        self,
        request: Request,
        req: SamplingRequest,
        prompts: list[list[int]],
        stop_tokens: list[int],
        chat: bool,
        plan: ChatPlan | None = None,
    ) -> Response:
        queue: asyncio.Queue = asyncio.Queue()
        gens = self._requests(req, prompts, stop_tokens, queue, plan)
        try:
            self.engine.submit(gens)
        except QueueFull as e:
            raise RequestError(f"the server is busy: {e}; retry shortly", code="queue_full", status=429) from None
        except ValueError as e:
            raise RequestError(str(e), code="context_length_exceeded") from None
        choices = [
            _Choice(i, len(prompts[i // req.samples]), token_ids=[] if req.return_token_ids else None)
            for i in range(len(gens))
        ]
        rid = new_id("chatcmpl" if chat else "cmpl")
        run = _Run(self, request, req, gens, choices, queue, rid, chat, prompts)
        run.plan = plan
        if req.stream:
            return StreamingResponse(
                run.stream(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await run.complete()


class _Run:
    """One API request in flight: its choices' outputs as they arrive, turned into OpenAI's bodies."""

    def __init__(self, server: _Server, request, req, gens, choices, queue, rid, chat, prompts):
        self.server, self.request, self.req, self.gens, self.choices = server, request, req, gens, choices
        self.queue, self.rid, self.chat, self.prompts = queue, rid, chat, prompts
        self.created, self.started = now(), time.perf_counter()
        self.logprobs: list[list[tuple[Output, str]]] = [[] for _ in choices]
        self.first_token_s: float | None = None
        self.plan: ChatPlan | None = None  # a chat request's tools and response format

    def _cancel(self) -> None:
        for g in self.gens:
            self.server.engine.cancel(g)

    def _take(self, index: int, o: Output) -> None:
        c = self.choices[index]
        if self.first_token_s is None and o.token is not None:
            self.first_token_s = time.perf_counter() - self.started
        c.text += o.text
        if o.token is not None and c.token_ids is not None:
            c.token_ids.append(o.token)
        if o.prompt_logprobs is not None:
            c.prompt_logprobs = o.prompt_logprobs
        if o.finish_reason is not None:
            c.finish_reason, c.completion_tokens, c.ttft = o.finish_reason, o.completion_tokens, o.time_to_first_token_s
            c.cumulative_logprob = o.cumulative_logprob

    def _check_error(self, o: Output) -> None:
        if o.error is not None:
            raise _EngineError(o.error)

    # -- plain -----------------------------------------------------------------------------------------

    async def complete(self) -> Response:
        pending = len(self.choices)
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while pending:
                try:
                    index, o = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    index = None
                if time.monotonic() >= next_check:  # by the clock: outputs may arrive faster than the poll
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                    if await self.request.is_disconnected():
                        log.info("%s: the client went away; its rows are freed", self.rid)
                        self._cancel()
                        return Response(status_code=499)
                if index is None:
                    continue
                self._check_error(o)
                self._take(index, o)
                if o.token is not None and self.req.n_logprobs is not None:
                    self.logprobs[index].append((o, o.text))
                pending -= o.finish_reason is not None
        except BaseException:
            self._cancel()
            raise
        self._log()
        usage = self._usage()
        ids = self._prompt_ids()
        if self.chat:
            answers = [self.plan.message(c) for c in self.choices]
            body = ChatCompletionResponse(
                id=self.rid,
                created=self.created,
                model=self.server.model_name,
                choices=[
                    ChatChoice(
                        index=c.index,
                        message=message,  # the text, or the tool calls read from it
                        logprobs=self._chat_logprobs(c.index),
                        finish_reason=finish_reason,
                        token_ids=c.token_ids,
                    )
                    for c, (message, finish_reason) in zip(self.choices, answers, strict=True)
                ],
                usage=usage,
                prompt_token_ids=ids,
            )
        else:
            body = CompletionResponse(
                id=self.rid,
                created=self.created,
                model=self.server.model_name,
                choices=[
                    CompletionChoice(
                        index=index,
                        text=prompt + c.text,
                        logprobs=self._completion_logprobs(self.logprobs[c.index], echoed, len(prompt)),
                        finish_reason=c.finish_reason,
                        token_ids=c.token_ids,
                    )
                    for index, c in best_choices(self.choices, len(self.prompts), self.req.samples, self.req.n)
                    for prompt, echoed in [self._echo(c)]
                ],
                usage=usage,
            )
        return JSONResponse(_dump(body, self.req.return_token_ids))

    # -- streamed --------------------------------------------------------------------------------------

    async def stream(self) -> AsyncIterator[str]:
        pending = len(self.choices)
        try:
            if self.chat:  # OpenAI's first chunk of each choice names the role
                yield self._event(
                    [ChatChunkChoice(index=c.index, delta=Delta(role="assistant", content="")) for c in self.choices]
                )
            while pending:
                index, o = await asyncio.wait_for(self.queue.get(), 3600)  # the engine always ends a request
                if o.error is not None:
                    yield f"data: {json.dumps(error_body(o.error, 'server_error'))}\n\n"
                    break
                self._take(index, o)
                pending -= o.finish_reason is not None
                if o.prompt_logprobs is not None:  # echo: the prompt first
                    text, echoed = self._echo(self.choices[index])
                    yield self._event([CompletionChoice(index=index, text=text, logprobs=echoed)])
                lp = [(o, o.text)] if o.token is not None and self.req.n_logprobs is not None else []
                if self.plan is not None:  # text that may be a tool call is held back until it parses
                    text, calls, reason = self.plan.stream(index, o.text, o.finish_reason)
                    o = replace(o, text=text, finish_reason=reason)
                    for call in calls:
                        yield self._event([ChatChunkChoice(index=index, delta=Delta(tool_calls=[call]))])
                if not (o.text or lp or o.finish_reason):
                    continue
                ids = [o.token] if o.token is not None and self.req.return_token_ids else None
                if self.chat:
                    choice = ChatChunkChoice(
                        index=index,
                        delta=Delta(content=o.text) if o.text or lp else Delta(),
                        logprobs=self._chat_logprobs(index, lp) if lp else None,
                        finish_reason=o.finish_reason,
                        token_ids=ids,
                    )
                else:
                    choice = CompletionChoice(
                        index=index,
                        text=o.text,
                        logprobs=self._completion_logprobs(lp) if lp else None,
                        finish_reason=o.finish_reason,
                        token_ids=ids,
                    )
                yield self._event([choice])
            else:
                if self.req.include_usage:
                    yield self._event([], usage=self._usage())
                self._log()
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away: Starlette cancels this generator
            if pending:
                log.info("%s: stream closed before its end; its rows are freed", self.rid)
                self._cancel()

    def _event(self, choices: list, usage: Usage | None = None) -> str:
        if self.chat:
            chunk = ChatCompletionChunk(
                id=self.rid, created=self.created, model=self.server.model_name, choices=choices
            )
        else:
            chunk = CompletionResponse(id=self.rid, created=self.created, model=self.server.model_name, choices=choices)
        body = _dump(chunk, self.req.return_token_ids)
        if self.req.include_usage:  # null on every chunk but the last, as OpenAI sends it
            body["usage"] = usage.model_dump() if usage is not None else None
        else:
            body.pop("usage", None)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    # -- pieces ----------------------------------------------------------------------------------------

    def _usage(self) -> Usage:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.completion_tokens for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _prompt_ids(self) -> list[int] | None:
        return self.prompts[0] if self.req.return_token_ids and len(self.prompts) == 1 else None

    def _token(self, token: int) -> tuple[str, list[int]]:
        raw = self.server.llm.tokenizer.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _chat_logprobs(self, index: int, entries=None) -> ChoiceLogprobs | None:
        entries = self.logprobs[index] if entries is None else entries
        if self.req.n_logprobs is None:
            return None
        content = []
        for o, _ in entries:
            text, raw = self._token(o.token)
            top = [TopLogprob(token=(t := self._token(i))[0], logprob=v, bytes=t[1]) for i, v in o.top or []]
            content.append(TokenLogprob(token=text, logprob=o.logprob, bytes=raw, top_logprobs=top))
        return ChoiceLogprobs(content=content)

    def _echo(self, c: _Choice) -> tuple[str, CompletionLogprobs | None]:
        """With echo, choice c's prompt as text and (with logprobs) its tokens' logprobs; else ("", None)."""
        i = c.index // self.req.samples  # a text prompt's bos is not in its echo
        text_prompt = isinstance(self.req.prompts()[i], str)
        return echo(self.server.llm.tokenizer, self.prompts[i], text_prompt, c.prompt_logprobs, self.req.n_logprobs)

    def _completion_logprobs(
        self, entries, echoed: CompletionLogprobs | None = None, offset: int = 0
    ) -> CompletionLogprobs | None:
        """The generated tokens' logprobs, after the echoed prompt's (whose text is `offset` characters)."""
        if self.req.n_logprobs is None:
            return None
        lp = echoed.model_copy(deep=True) if echoed is not None else CompletionLogprobs()
        for o, text in entries:
            lp.tokens.append(self._token(o.token)[0])
            lp.token_logprobs.append(o.logprob)
            lp.top_logprobs.append({self._token(i)[0]: v for i, v in o.top or []})
            lp.text_offset.append(offset)
            offset += len(text)
        return lp

    def _log(self) -> None:
        elapsed = time.perf_counter() - self.started
        completion = sum(c.completion_tokens for c in self.choices)
        prompt = sum(len(p) for p in self.prompts)
        ttft = self.first_token_s if self.first_token_s is not None else elapsed
        decode = max(elapsed - ttft, 1e-9)
        reasons = ",".join(sorted({c.finish_reason or "?" for c in self.choices}))
        log.info(
            "%s: %d prompt + %d completion tokens, first token after %.0f ms, %.1f tokens/s, %.2f s, finish %s",
            self.rid,
            prompt,
            completion,
            ttft * 1000,
            max(completion - len(self.choices), 0) / decode,
            elapsed,
            reasons,
        )
        m = self.server.metrics
        if m is not None:
            m.prompt_tokens.inc(prompt)
            m.generation_tokens.inc(completion)
            for c in self.choices:
                m.ttft.observe(c.ttft)


class _EngineError(RuntimeError):
    pass


def _dump(model, token_ids: bool) -> dict[str, Any]:
    """The response as JSON data; the token-id extension fields only when asked for."""
    body = model.model_dump()
    if not token_ids:
        body.pop("prompt_token_ids", None)
        for c in body.get("choices", []):
            c.pop("token_ids", None)
    return body


def create_app(
    llm: Llama,
    *,
    model_name: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    max_seq_len: int | None = None,
    prefill_chunk: int = 512,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    static_decode: bool | None = None,
    guard: Llama | None = None,
    prefix_cache_tokens: int | None = None,
) -> Starlette:
    """An ASGI app serving `llm` with the OpenAI API. The scheduler thread starts and stops with the app's
    lifespan (uvicorn runs it); `app.state.engine` is the `llama3.engine.Engine`.

    `max_seq_len` bounds each row's prompt + answer (default: the Llama's `max_seq_len`, else the model's
    context up to 2048); `max_queue` requests may wait beyond the `max_batch_size` running ones, the rest get
    HTTP 429. `api_key` (default: the LLAMA3_API_KEY environment variable): Bearer auth on all but /health.
    `guard`: a Llama Guard model that screens each conversation's last message (and each text prompt); an unsafe
    one gets HTTP 400 with code `content_filter` (answers are not screened: they stream).
    `prefix_cache_tokens`: the prefix cache's bound (default: as many tokens as the batch's rows; 0: off).
    """
    if max_seq_len is None:
        max_seq_len = llm.max_seq_len or min(llm.model.args.max_seq_len, 2048)
    engine = Engine(llm, max_batch_size, max_queue, max_seq_len, prefill_chunk, static_decode, prefix_cache_tokens)
    try:
        metrics = Metrics(engine)
    except ImportError:
        metrics = None
    name = model_name or "llama3"
    server = _Server(llm, engine, name, max_body_bytes, metrics, guard)

    async def on_request_error(request: Request, exc: RequestError) -> Response:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: "no such route", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, f"{request.method} {request.url.path}: {message}")

    async def on_engine_error(request: Request, exc: _EngineError) -> Response:
        return JSONResponse(error_body(str(exc), "server_error"), status_code=500)

    async def on_any_error(request: Request, exc: Exception) -> Response:  # logged, never shown to the client
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
            Route("/v1/completions", server.completions, methods=["POST"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
            Route("/metrics", server.metrics_route, methods=["GET"]),
            *tokenizer_routes(server),  # vLLM's /tokenize, /detokenize, /tokenizer_info
        ],
        exception_handlers={
            RequestError: on_request_error,
            HTTPException: on_http_error,
            _EngineError: on_engine_error,
            Exception: on_any_error,
        },
        lifespan=lifespan,
    )
    app.state.engine = engine
    api_key = api_key if api_key is not None else os.environ.get("LLAMA3_API_KEY") or None
    app.add_middleware(_Gate, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    return app


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """The listening socket of `run`, bound by the caller before it says it serves: a busy port or a bad address
    is then an OSError naming host:port (uvicorn, binding it itself, logs the error and exits with status 3)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))  # not yet listening: a client meanwhile is refused, not left hanging on a load
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(
    app: Starlette,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Serves `app` with uvicorn until interrupted, on `sock` (from `bind`), else on host:port (bound by `bind`)."""
    import uvicorn

    sock = bind(host, port) if sock is None else sock
    host, port = sock.getsockname()[:2]  # uvicorn's "running on" line reads the address from its config
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:  # uvicorn has logged why (the engine failed to start, say)
        raise RuntimeError("the server did not start")
