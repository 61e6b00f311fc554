from __future__ import annotations

import argparse
import sys

from llama3.cli.common import _budget, _check_draft, _report, _sampling, load, speculation
from llama3.cli.guard import load_guard, screen

CHAT_COMMANDS = {
    "/help": "show these commands",
    "/reset": "forget the conversation (keeps --system)",
    "/exit": "quit (also /quit, Ctrl-D)",
}


def _fit_history(llm, history: list[dict[str, str]], max_new_tokens: int, log) -> tuple[list[int], int] | None:
    """The prompt for `history` (whose last message is the new one) and the answer's budget, dropping the
    oldest turns (never the system message or the new message) until both fit; None if even that fails."""
    first = 1 if history[0]["role"] == "system" else 0
    need = 1 if max_new_tokens == -1 else max_new_tokens
    dropped = 0
    while len(tokens := llm.chat_format.encode_dialog_prompt(history)) + need > llm.context_length:
        if len(history) - first == 1:
            return None
        del history[first]  # a whole turn: the user's message and the answers that followed it
        dropped += 1
        while history[first]["role"] != "user":
            del history[first]
            dropped += 1
    if dropped:
        log(f"llama3: dropped the {dropped} oldest messages to fit the {llm.context_length}-token context")
    return tokens, _budget(llm, len(tokens), max_new_tokens)


def _chat_help() -> str:
    lines = [f"  {name:<8} {what}" for name, what in CHAT_COMMANDS.items()]
    return "\n".join(["Commands:", *lines, "  //text   send a message that starts with '/'"])


def cmd_chat(args: argparse.Namespace) -> int:
    llm, log, _ = load(args)
    if args.prefix_cache_tokens != 0:  # each turn's prompt starts with the previous turns: compute only what is new
        from llama3.generate.prefix_cache import PrefixCache

        llm.prefix_cache = PrefixCache(llm.model, args.prefix_cache_tokens or llm.context_length)
    spec = speculation(args, log)
    guard = load_guard(args, log) if args.guard else None
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history: list[dict[str, str]] = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /help lists the commands; Ctrl-C stops an answer.", file=sys.stderr)
    from llama3.parallel.tp import rank0_input

    while True:
        try:
            line = rank0_input("> " if interactive else "")  # input(); under torchrun rank 0's, on every rank
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command = text.split()[0]
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                history = list(system)
                log("llama3: history cleared")
            elif command == "/help":
                print(_chat_help(), file=sys.stderr)
            else:
                print(
                    f"llama3: unknown command {command} (/help lists them; //text sends text starting with /)",
                    file=sys.stderr,
                )
            continue
        text = text[1:] if text.startswith("//") else text
        candidate = [*history, {"role": "user", "content": text}]
        fitted = _fit_history(llm, candidate, args.max_new_tokens, log)
        if fitted is None:
            n_msg = len(llm.chat_format.encode_dialog_prompt([*system, candidate[-1]]))
            print(
                f"llama3: message not sent: it takes {n_msg} tokens with the chat format, and the context holds "
                f"{llm.context_length} with {args.max_new_tokens} (-n) kept for the answer",
                file=sys.stderr,
            )
            continue
        tokens, n = fitted
        try:
            _check_draft(spec, len(tokens), n)
        except ValueError as e:
            print(f"llama3: message not sent: {e}", file=sys.stderr)
            continue
        turns = [m for m in candidate if m["role"] != "system"]  # what Llama Guard reads
        refusal = guard and screen(guard, turns, "message")
        if refusal:  # the model never sees it, and it stays out of the history
            print(refusal, flush=True)
            continue
        history = candidate
        reply, interrupted = [], False
        try:
            for _, piece in llm.stream(tokens, n, stop_tokens=llm.chat_stop_tokens, **_sampling(args), **spec):
                reply.append(piece)
                if not guard:  # a guarded answer is shown only once it is screened
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the session
            log("\nllama3: answer stopped")
            interrupted = True
        refusal = guard and screen(guard, [*turns, {"role": "assistant", "content": "".join(reply)}], "answer")
        if refusal:  # neither the question nor the answer stays in the history
            history = history[:-1]
            print(refusal, flush=True)
            continue
        if guard:
            sys.stdout.write("".join(reply))
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
        _report(llm, log, args.max_new_tokens, interrupted)
