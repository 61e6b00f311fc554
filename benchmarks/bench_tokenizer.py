"""Encode throughput of `llama3.Tokenizer` against transformers' fast tokenizer, on the same text.

Both tokenizers are built from the same Llama 3 `tokenizer.model` (transformers' via its
`TikTokenConverter`, i.e. Hugging Face `tokenizers` in Rust). The text is generated here: a few MB of
code, English-like prose, several scripts, numbers, emoji and whitespace runs; nothing is downloaded.
Before timing, the two must agree on every token id of that text.

"tiktoken alone" calls the same tiktoken encoding directly (no long-input splitting, no checks): the
difference to ours is what the wrapper costs.

Three workloads:
- documents: ~4 KB documents encoded one call at a time (the usual case: a prompt, a file),
- one string: the whole text in a single call,
- batch: all documents in one call; transformers spreads a batch over all cores, ours is one
  thread, so this row compares a parallel baseline with a sequential loop.

    python benchmarks/bench_tokenizer.py [--mb 4] [--repeats 3] [--out benchmarks/results/tokenizer.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from llama3.text.tokenizer import LLAMA3_PAT_STR, Tokenizer


def default_model_path() -> Path:
    spec = importlib.util.find_spec("llama_models")  # found, not imported: it needs packages we do not install
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pass --model, or pip install --no-deps llama-models==0.3.0 for the Llama 3 tokenizer file")
    return Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"


# -- the text ------------------------------------------------------------------------------------------

WORDS = (
    "the of and to in is was that for it with as his on be at by had are but from or have an they which "
    "one you were all we her she there would their will when who him been has more if no out so said what "
    "up its about into than them can only other new some could time these two may then do first any my now "
    "such like our over man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three tokenizer llama "
    "attention transformer gradient embedding probability distribution"
).split()
SCRIPTS = {  # (first, last) code points of letters in a few scripts
    "cjk": (0x4E00, 0x9FFF),
    "hiragana": (0x3041, 0x3096),
    "hangul": (0xAC00, 0xD7A3),
    "cyrillic": (0x0430, 0x044F),
    "greek": (0x03B1, 0x03C9),
    "arabic": (0x0627, 0x064A),
    "devanagari": (0x0915, 0x0939),
}
EMOJI = "🦙🔥👍🏽😀🎉🚀❤️✨🇫🇷👨‍👩‍👧‍👦"


def generate_text(n_bytes: int, seed: int = 0) -> list[str]:
    """Documents of about 4 KB each, `n_bytes` of UTF-8 in all, the same for a given seed."""
    rng = random.Random(seed)
    code = _stdlib_source(rng)
    docs, total = [], 0
    while total < n_bytes:
        kind = rng.choice(["prose", "prose", "code", "multilingual", "numbers"])
        if kind == "prose":
            doc = _prose(rng, 4000)
        elif kind == "code":
            start = rng.randrange(max(1, len(code) - 4000))
            doc = code[start : start + 4000]
        elif kind == "multilingual":
            doc = _multilingual(rng, 1500)
        else:
            doc = _numbers(rng, 3000)
        docs.append(doc)
        total += len(doc.encode())
    return docs


def _stdlib_source(rng: random.Random) -> str:
    """Python source from the standard library: real code, present on every machine."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng.shuffle(files)
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files[:40])


def _prose(rng: random.Random, n_chars: int) -> str:
    out, length = [], 0
    while length < n_chars:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", ";"])
        if rng.random() < 0.1:
            sentence += rng.choice([" It's", " They're", " We'll", " I'M", " Don't"]) + " done."
        out.append(sentence + rng.choice([" ", " ", " ", "\n\n", "\n", "   "]))
        length += len(out[-1])
    return "".join(out)


def _multilingual(rng: random.Random, n_chars: int) -> str:
    out, length = [], 0
    while length < n_chars:
        first, last = SCRIPTS[rng.choice(list(SCRIPTS))]
        word = "".join(chr(rng.randint(first, last)) for _ in range(rng.randint(1, 6)))
        out.append(word + rng.choice([" ", "，", "。", " ", "\n", rng.choice(EMOJI)]))
        length += len(out[-1])
    return "".join(out)


def _numbers(rng: random.Random, n_chars: int) -> str:
    out, length = [], 0
    while length < n_chars:
        out.append(
            rng.choice(
                [
                    str(rng.randint(0, 10**12)),
                    f"{rng.random() * 1000:.4f}",
                    f"{rng.randint(1, 31):02d}/{rng.randint(1, 12):02d}/{rng.randint(1900, 2100)}",
                    " " * rng.randint(2, 40),
                    "\t" * rng.randint(1, 5),
                    "\r\n",
                ]
            )
            + rng.choice([" ", ", ", "\n"])
        )
        length += len(out[-1])
    return "".join(out)


# -- timing --------------------------------------------------------------------------------------------


def best_seconds(fns: dict[str, callable], repeats: int) -> dict[str, dict[str, float]]:
    """Best and median wall time of each fn over `repeats` rounds; the fns take turns within a round so
    that a slow spell of a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"best": min(t), "median": statistics.median(t)} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a Llama 3 tokenizer.model (default: llama-models')")
    parser.add_argument("--mb", type=float, default=4.0, help="MB of generated text (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tokenizer.json"))
    args = parser.parse_args()

    import tiktoken
    import tokenizers
    import transformers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_path = args.model or default_model_path()
    ours = Tokenizer(model_path)
    converter = TikTokenConverter(vocab_file=str(model_path), pattern=LLAMA3_PAT_STR)
    theirs = PreTrainedTokenizerFast(tokenizer_object=converter.converted())

    docs = generate_text(int(args.mb * 1e6), args.seed)
    whole = "".join(docs)
    n_bytes = len(whole.encode())
    print(f"{len(docs)} documents, {n_bytes / 1e6:.2f} MB, {len(whole):,} characters", file=sys.stderr)

    # the same ids, or the speed comparison means nothing
    mismatched = [i for i, d in enumerate(docs) if ours.encode(d) != theirs.encode(d, add_special_tokens=False)]
    if mismatched:
        sys.exit(f"token ids differ on {len(mismatched)} documents (first: {mismatched[0]}); not timing")
    n_tokens = sum(len(ours.encode(d)) for d in docs)

    # tiktoken called directly, without Meta's splitting or our checks: what the wrapper costs
    raw = ours._model.encode_ordinary
    workloads = {
        "documents, one call each": {
            "ours": lambda: [ours.encode(d) for d in docs],
            "transformers": lambda: [theirs.encode(d, add_special_tokens=False) for d in docs],
            "tiktoken": lambda: [raw(d) for d in docs],
        },
        "whole text, one call": {
            "ours": lambda: ours.encode(whole),
            "transformers": lambda: theirs.encode(whole, add_special_tokens=False),
            "tiktoken": lambda: raw(whole),
        },
        "batch of all documents (transformers on all cores, ours sequential)": {
            "ours": lambda: [ours.encode(d) for d in docs],
            "transformers": lambda: theirs(docs, add_special_tokens=False)["input_ids"],
            "tiktoken": lambda: [raw(d) for d in docs],
        },
    }
    rows = []
    for name, fns in workloads.items():
        seconds = best_seconds(fns, args.repeats)
        row = {"workload": name, **{f"{k}_mb_per_s": n_bytes / t["best"] / 1e6 for k, t in seconds.items()}}
        row["speedup"] = seconds["transformers"]["best"] / seconds["ours"]["best"]
        row["seconds"] = seconds
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k} {row[f'{k}_mb_per_s']:.2f} MB/s" for k in fns), file=sys.stderr)

    result = {
        "benchmark": "tokenizer encode throughput",
        "text": {
            "documents": len(docs),
            "bytes": n_bytes,
            "characters": len(whole),
            "tokens": n_tokens,
            "seed": args.seed,
        },  # fmt: skip
        "ids_identical": True,
        "repeats": args.repeats,
        "results": rows,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {
            "tiktoken": tiktoken.__version__,
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    text, machine = result["text"], result["machine"]
    lines = [
        "# Tokenizer encode throughput",
        "",
        f"{text['bytes'] / 1e6:.2f} MB of generated text ({text['documents']} documents, {text['tokens']:,} "
        f"Llama 3 tokens); identical ids from both; best of {result['repeats']} runs; "
        f"{machine['cpu_count']} CPUs, {machine['platform']}; transformers {result['versions']['transformers']}, "
        f"tokenizers {result['versions']['tokenizers']}, tiktoken {result['versions']['tiktoken']}.",
        "",
        "| workload | llama3.Tokenizer MB/s | transformers fast MB/s | ours / transformers | tiktoken alone MB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        lines.append(
            f"| {row['workload']} | {row['ours_mb_per_s']:.2f} | {row['transformers_mb_per_s']:.2f} "
            f"| {row['speedup']:.2f}x | {row['tiktoken_mb_per_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
