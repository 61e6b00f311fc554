from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any

from llama3.cli.common import _add_load_args, load
from llama3.cli.guard import check_guard, load_guard


def _add_serve_parser(sub) -> None:
    sv = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (needs the serve extra: pip install 'llama3[serve]')"
    )
    _add_load_args(sv)
    sv.add_argument("--adapter", metavar="DIR", help="apply a LoRA adapter (llama3 finetune's or PEFT's)")
    sv.add_argument("--chat-template", choices=["auto", "builtin", "jinja"], default="auto", help="(default: auto)")
    sv.add_argument("--host", default="127.0.0.1", help="the address to bind (default: %(default)s, this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    sv.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="requests decoded together (default: 8)")
    sv.add_argument(
        "--max-seq-len",
        "-c",
        type=int,
        metavar="L",
        help="prompt + answer tokens per request (default: the model's context, at most 2048)",
    )
    sv.add_argument("--max-queue", type=int, default=64, metavar="N", help="waiting requests before HTTP 429 (64)")
    sv.add_argument("--prefill-chunk", type=int, default=512, metavar="N", help="prompt tokens per step (512)")
    sv.add_argument(
        "--prefix-cache-tokens",
        type=int,
        metavar="N",
        help="keys and values of prompt prefixes kept for reuse, in tokens (default: the batch's rows x "
        "--max-seq-len; 0: off)",
    )
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: env LLAMA3_API_KEY, else none)")
    sv.add_argument("--served-model-name", metavar="NAME", help="the model name clients send (default: from --model)")
    sv.add_argument("--guard", metavar="SRC", help="a Llama Guard checkpoint that screens each request's last message")
    sv.set_defaults(parser=sv)


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util
    import logging

    missing = [m for m in ("starlette", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"llama3 serve needs {', '.join(missing)}: pip install 'llama3[serve]'")
    from llama3.serve.app import bind, create_app, run

    sock = bind(args.host, args.port)  # first: a busy port is one line, before minutes of loading
    try:
        llm, log, guard = _off_the_main_thread(lambda: _load_models(args))
        if not args.quiet:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        name = args.served_model_name or (
            Path(args.model).name if args.model and os.path.exists(args.model) else args.model
        )
        app = create_app(
            llm,
            model_name=name or "SmolLM2-135M-Instruct",
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            max_seq_len=args.max_seq_len,
            prefill_chunk=args.prefill_chunk,
            api_key=args.api_key,
            guard=guard,
            prefix_cache_tokens=args.prefix_cache_tokens,
        )
        engine = app.state.engine
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        log(
            f"llama3: serving '{name or 'SmolLM2-135M-Instruct'}' on http://{host}:{port}/v1 "
            f"({engine.max_batch_size} rows of {engine.max_seq_len} tokens)"
        )
        run(app, log_level="warning" if args.quiet else "info", sock=sock)
    finally:
        sock.close()
    return 0


def _load_models(args: argparse.Namespace):
    llm, log, _ = load(args)
    guard = load_guard(args, log) if args.guard else None
    if guard is not None:
        check_guard(guard, args.guard)
    return llm, log, guard


def _off_the_main_thread(fn):
    """fn() run in a thread of its own; its result, or its exception raised here.

    The models load there so that the main thread, which then only serves HTTP, never starts an OpenMP team (a
    thread's team lives as long as the thread). GNU OpenMP's threads stop spinning between parallel regions once
    it manages more threads than there are CPUs, and the main thread's idle team counted against the engine
    thread's: on the CPU every operation of a decode step then waited for its threads to wake up, and the server
    decoded the embedded SmolLM2 at 43 tok/s against 110 without it (2 vCPUs; benchmarks/results/serve-cli-cpu.md).
    The loading thread's team ends with it. (A --guard model screens requests in a worker thread of its own, whose
    team stays: with --guard the engine's threads still sleep between operations.)"""
    out: dict[str, Any] = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # raised again in the caller's thread
            out["error"] = e

    thread = threading.Thread(target=target, name="llama3-load", daemon=True)  # daemon: Ctrl-C need not wait for it
    thread.start()
    try:
        thread.join()
    except KeyboardInterrupt:
        # Ctrl-C while loading: the load cannot be stopped from this thread, and Python's exit would end the loading
        # thread inside torch's C++ code (an abort, "terminate called without an active exception"). So the
        # process ends here, as `main` ends an interrupted command.
        print("\nllama3: interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    if "error" in out:
        raise out["error"]
    return out["value"]
