from __future__ import annotations

import argparse
import json
import sys
import time

from llama3.cli.common import _budget, _check_draft, _report, _sampling, load, read_text, speculation
from llama3.cli.guard import load_guard, screen


def read_prompt(args: argparse.Namespace) -> str:
    """PROMPT, or the text of --file / stdin without its trailing newlines (as `$(cat FILE)` reads it); an empty
    or blank one is refused unless --unconditional asked for no prompt."""
    if args.unconditional:
        return ""
    if args.prompt is not None and args.prompt != "-":
        prompt, source = args.prompt, "PROMPT"
    else:
        file = args.file if args.file not in (None, "-") else None
        prompt, source = read_text(file).rstrip("\r\n"), file or "stdin"
    if not prompt.strip():
        raise ValueError(
            f"the prompt ({source}) is {'empty' if not prompt else 'only whitespace'}: nothing to continue "
            "(--unconditional generates from the begin-of-text token alone)"
        )
    return prompt


def cmd_generate(args: argparse.Namespace) -> int:
    from llama3.parallel.tp import run_on_rank0

    prompt = run_on_rank0(read_prompt, args)  # under torchrun rank 0 reads it (stdin is one), every rank gets it
    llm, log, load_s = load(args)
    spec = speculation(args, log)
    guard = load_guard(args, log) if args.guard else None
    refusal = guard and screen(guard, [{"role": "user", "content": prompt}], "message")
    if refusal:
        sys.stdout.write((json.dumps({"text": "", "refused": refusal}) if args.json else refusal) + "\n")
        return 0
    if args.chat or args.system is not None:
        dialog = [{"role": "system", "content": args.system}] if args.system is not None else []
        tokens = llm.chat_format.encode_dialog_prompt([*dialog, {"role": "user", "content": prompt}])
        extra = {"stop_tokens": llm.chat_stop_tokens}
    else:
        tokens, extra = llm.tokenizer.encode(prompt, bos=True), {}
    n = _budget(llm, len(tokens), args.max_new_tokens)
    _check_draft(spec, len(tokens), n)
    t0 = time.perf_counter()
    out_tokens, pieces = [], []
    for token, text in llm.stream(tokens, n, **_sampling(args), **extra, **spec):
        if token is not None:
            out_tokens.append(token)
        if args.json or guard:  # an answer is screened before any of it is shown
            pieces.append(text)
        elif text:
            sys.stdout.write(text)
            sys.stdout.flush()
    s = llm.last_stats
    answer = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "".join(pieces)}]
    refusal = guard and screen(guard, answer, "answer")
    if guard and not args.json:
        sys.stdout.write(refusal or "".join(pieces))
    if args.json:
        result = {
            "text": "" if refusal else "".join(pieces),
            **({"refused": refusal or None} if guard else {}),
            "tokens": out_tokens,
            "finish_reason": s["finish_reasons"][0],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": len(out_tokens)},
            "timings": {
                "load_s": round(load_s, 4),
                "time_to_first_token_s": round(s["time_to_first_token_s"], 4),
                "tokens_per_second": round(s["tokens_per_second"], 2),
                "total_s": round(time.perf_counter() - t0, 4),
            },
        }
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.json:
        _report(llm, log, args.max_new_tokens)
    return 0
