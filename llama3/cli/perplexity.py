from __future__ import annotations

import argparse
import json

from llama3.cli.common import load, read_text


def cmd_perplexity(args: argparse.Namespace) -> int:
    from llama3.eval.perplexity import perplexity

    text = read_text(None if args.file == "-" else args.file)
    source = "stdin" if args.file == "-" else args.file
    llm, log, _ = load(args)
    tokens = llm.tokenizer.encode(text, bos=args.bos)
    if len(tokens) < 2:
        raise ValueError(f"{source}: {len(tokens)} tokens; perplexity needs at least 2 (the first is only context)")
    max_length = args.max_length  # longer than the model's context: refused by perplexity(), named as the flag
    r = perplexity(llm.model, tokens, max_length, args.stride, progress=not args.quiet)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['perplexity']:.4f}")
        log(f"llama3: over {r['scored_tokens']} tokens, {r['windows']} windows of {max_length}, stride {r['stride']}")
    return 0
