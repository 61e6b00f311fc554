"""The server's tokenizer, as vLLM serves it: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`.

An evaluation harness that scores log-likelihoods must count the tokens of a context and its continuation
with the server's own tokenizer. lm-evaluation-harness's `local-completions` model asks `/tokenizer_info` and
`/tokenize` first (its `RemoteTokenizer`), and otherwise needs a Hugging Face tokenizer of the same model on
the client. The shapes are vLLM's (`vllm/entrypoints/openai/protocol.py`: `TokenizeCompletionRequest`,
`TokenizeResponse`, `DetokenizeRequest`, `DetokenizeResponse`, `TokenizerInfoResponse`).

Special-token text in `/tokenize`'s prompt ("<|eot_id|>") is encoded as that special token, as a Hugging Face
tokenizer (and so vLLM) does: a client learns the end-of-text id this way (lm-eval encodes `eos_token`). This
gives a client nothing it could not send already: `/v1/completions` takes token ids.
"""

from __future__ import annotations

import asyncio

from pydantic import ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llama3.serve.protocol import OpenAIModel, RequestError, parse_request


class TokenizeRequest(OpenAIModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # the bos the server puts before a text prompt of /v1/completions
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


def tokenizer_routes(server) -> list[Route]:
    """The three routes over `server` (the app's `_Server`: its model, engine, body reader and model check)."""
    tokenizer = server.llm.tokenizer

    async def tokenize(request: Request) -> Response:
        req = parse_request(TokenizeRequest, await server._body(request))
        if req.model is not None:
            server._check_model(req.model)
        bos = req.add_special_tokens and tokenizer.bos_id >= 0
        ids = await asyncio.to_thread(tokenizer.encode, req.prompt, bos=bos, allowed_special="all")
        strs = [tokenizer.token_bytes(t).decode("utf-8", "replace") for t in ids] if req.return_token_strs else None
        return JSONResponse(
            {"count": len(ids), "max_model_len": server.engine.max_seq_len, "tokens": ids, "token_strs": strs}
        )

    async def detokenize(request: Request) -> Response:
        req = parse_request(DetokenizeRequest, await server._body(request))
        if req.model is not None:
            server._check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.n_words]
        if bad:
            raise RequestError(f"tokens: token ids must be in [0, {tokenizer.n_words}), got {bad[0]}", param="tokens")
        try:
            text = tokenizer.decode(req.tokens)
        except ValueError as e:  # an id inside the range that names no token
            raise RequestError(f"tokens: {e}", param="tokens") from None
        return JSONResponse({"prompt": text})

    async def tokenizer_info(request: Request) -> Response:
        named = tokenizer.template_tokens  # what a chat template sees as bos_token, eos_token, pad_token
        return JSONResponse(
            {
                "tokenizer_class": f"llama3.{type(tokenizer).__name__}",
                "bos_token": named.get("bos_token"),
                "eos_token": named.get("eos_token"),
                "pad_token": named.get("pad_token"),
                "unk_token": named.get("unk_token"),
                "chat_template": tokenizer.chat_template,
                "model_max_length": server.engine.max_seq_len,
                "vocab_size": tokenizer.n_words,
            }
        )

    return [
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
    ]
