from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llama3.checks import parse_jsonl
from llama3.cli.common import load, read_text
from llama3.guard import describe_categories

GUARD_HELP = (
    "a Llama Guard checkpoint (e.g. meta-llama/Meta-Llama-Guard-2-8B) that screens each user message before the "
    "model sees it and each answer before it is shown"
)


def load_guard(args: argparse.Namespace, log):
    """The Llama Guard model of --guard, on the chat model's device, dtype and backend."""
    from llama3.generate.llama import Llama

    log(f"llama3: guard {args.guard}")
    return Llama.from_pretrained(
        args.guard, device=args.device, dtype=args.dtype, backend=args.backend, progress=not args.quiet
    )


def screen(guard, conversation: list[dict[str, str]], what: str) -> str | None:
    """None when Llama Guard finds the last message safe, else a one-line refusal naming the categories."""
    from llama3.guard import classify

    result = classify(guard, conversation)
    if result.safe:
        return None
    return f"llama3: refused: the {what} is unsafe ({describe_categories(guard, result.categories)})"


def read_conversations(text: str, source: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """(where, conversation) pairs: one conversation (a JSON list of messages) or many (JSONL, one a line),
    each checked to be a list; `where` names it in errors ("stdin, line 3")."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list) and (not whole or not isinstance(whole[0], list)):
        return [(source, whole)]
    lines = parse_jsonl(text.splitlines(), source)
    if not lines:
        raise ValueError(f"{source}: no conversation (a JSON list of messages, or one such list a line)")
    for number, conversation in lines:
        if not isinstance(conversation, list):
            kind = type(conversation).__name__
            raise ValueError(f"{source}, line {number}: a conversation is a list of messages, got {kind}")
    return [(f"{source}, line {number}", conversation) for number, conversation in lines]


def cmd_guard(args: argparse.Namespace) -> int:
    from llama3.guard import classify_batch, format_prompt

    source = "stdin" if args.file == "-" else args.file
    conversations = read_conversations(read_text(None if args.file == "-" else args.file), source)
    for where, conversation in conversations:  # every one checked before the model loads
        try:
            format_prompt(conversation)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    llm, log, _ = load(args)
    for start in range(0, len(conversations), args.batch_size):
        batch = [conversation for _, conversation in conversations[start : start + args.batch_size]]
        for result in classify_batch(llm, batch, version=args.version):
            verdict = {"safe": result.safe, "categories": result.categories, "score": round(result.score, 6)}
            sys.stdout.write(json.dumps(verdict) + "\n")
        sys.stdout.flush()
    return 0


def check_guard(guard, source: str) -> None:
    """A --guard model that cannot give a Llama Guard verdict is refused at start, not at each request: it
    classifies one harmless message, the check `classify` makes of every verdict."""
    from llama3.guard import classify

    try:
        classify(guard, [{"role": "user", "content": "Hello"}])
    except ValueError as e:
        raise ValueError(f"--guard {source}: not a Llama Guard model ({e})") from None
