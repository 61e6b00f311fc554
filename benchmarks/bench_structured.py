"""Structured output: the grammar engines' per-token mask cost, the cost of the mask in a real decode, and 100
sampled JSON answers checked against their schema.

1. Mask cost, xgrammar against llguidance, on the embedded SmolLM2's 49,152-token vocabulary and on Llama 3's
   128,256 (Meta's tokenizer.model from the llama-models package): the same schema, the same token sequence (a
   valid instance, as the tokenizer encodes it) walked through each engine's matcher; per token, the time to fill
   the bitmask of allowed tokens (and to accept the token), after compiling once. Also the one-off costs: reading
   the vocabulary, compiling the schema.
2. Decode overhead: the embedded SmolLM2-135M-Instruct (as `Llama.from_pretrained()` loads it) answering with and
   without `json_schema` (`Llama.generate`, temperature 1), tokens per second of each after the first token.
3. Validity: 100 answers sampled at temperature 1 from the embedded SmolLM2 with `json_schema`; each is parsed and
   validated with PyPI `jsonschema`.

    python benchmarks/bench_structured.py --part mask       # 1 (each part adds to benchmarks/results/structured-cpu.*)
    python benchmarks/bench_structured.py --part speed      # 2
    python benchmarks/bench_structured.py --part valid      # 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 60},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "languages", "employed"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "languages": ["English", "French", "Mathematics"],
    "employed": False,
}
PROMPT = "Describe a made-up person as JSON with the fields name, age, email, languages and employed."


def tokenizers():
    from conftest import llama3_tokenizer_file

    import llama3
    from llama3.text.tokenizer import Tokenizer
    from llama3.weights.build import gguf_file
    from llama3.weights.gguf_tokenizer import load_gguf_tokenizer
    from llama3.weights.hub import default_model, resolve

    smol = load_gguf_tokenizer(gguf_file(resolve(default_model())))
    assert llama3  # the package is importable from the repository
    return {"SmolLM2 (49,152)": (smol, 49152), "Llama 3 (128,256)": (Tokenizer(llama3_tokenizer_file()), 128256)}


def vocab_bytes(tok, vocab_size: int) -> list[bytes]:
    specials = set(tok.special_tokens.values())
    out = []
    for i in range(vocab_size):
        try:
            out.append(b"" if i in specials or i >= tok.n_words else tok.token_bytes(i))
        except Exception:
            out.append(b"")
    return out


def bench_xgrammar(tok, vocab_size: int, ids: list[int]) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    stops = list(tok.stop_tokens)
    info = xgr.TokenizerInfo(
        vocab_bytes(tok, vocab_size), xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stops
    )
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, strict_mode=True)
    t2 = time.perf_counter()
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    times = []
    for _ in range(5):
        m = xgr.GrammarMatcher(compiled)
        for t in ids:
            s = time.perf_counter()
            m.fill_next_token_bitmask(bitmask)
            assert m.accept_token(t), "the instance does not follow the grammar"
            times.append(time.perf_counter() - s)
    return _costs(t0, t1, t2, times)


def bench_llguidance(tok, vocab_size: int, ids: list[int]) -> dict:
    import llguidance
    import llguidance.torch as llt

    class Wrapped:  # what llguidance's TokenizerWrapper reads
        def __init__(self):
            self.eos_token_id = tok.stop_tokens[0]
            self.bos_token_id = tok.bos_id if tok.bos_id >= 0 else None
            self.tokens = vocab_bytes(tok, vocab_size)
            self.special_token_ids = sorted(i for i in tok.special_tokens.values() if i < vocab_size)

        def __call__(self, s):
            return tok.encode(s.decode("utf-8") if isinstance(s, bytes) else s)

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), n_vocab=vocab_size)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    )
    m = llguidance.LLMatcher(lltok, grammar)
    assert not m.is_error(), m.get_error()
    t2 = time.perf_counter()
    bitmask = llt.allocate_token_bitmask(1, vocab_size)
    times = []
    for _ in range(5):
        m = llguidance.LLMatcher(lltok, grammar)
        for t in ids:
            s = time.perf_counter()
            llt.fill_next_token_bitmask(m, bitmask, 0)
            assert m.consume_token(t), m.get_error()
            times.append(time.perf_counter() - s)
    return _costs(t0, t1, t2, times)


def _costs(t0: float, t1: float, t2: float, times: list[float]) -> dict:
    """A library's costs from its timestamps (start, vocabulary built, grammar compiled) and per-token mask times."""
    return {
        "vocab_s": t1 - t0,
        "compile_s": t2 - t1,
        "per_token_us": 1e6 * statistics.median(times),
        "per_token_p95_us": 1e6 * sorted(times)[int(0.95 * len(times))],
    }


def mask_costs() -> list[dict]:
    rows = []
    text = json.dumps(INSTANCE)  # the separators both grammars were given: ", " and ": "
    for name, (tok, vocab_size) in tokenizers().items():
        ids = tok.encode(text)
        for engine, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            r = fn(tok, vocab_size, ids)
            rows.append({"vocabulary": name, "engine": engine, "tokens": len(ids), **r})
            print(rows[-1], flush=True)
    return rows


def smol():
    from llama3 import Llama

    llm = Llama.from_pretrained(progress=False)
    prompt = llm.chat_format.encode_dialog_prompt([{"role": "user", "content": PROMPT}])
    return llm, prompt, llm.chat_stop_tokens


def speed() -> dict:
    llm, prompt, stops = smol()
    llm.generate([prompt], 8, temperature=0, stop_tokens=stops, json_schema=SCHEMA)  # compile, warm up
    tps = {}
    for label, extra in (("unconstrained", {"stop_tokens": []}), ("json_schema", {"json_schema": SCHEMA})):
        runs = []
        for seed in range(5):
            out = llm.generate([prompt], 64, temperature=1, seed=seed, **{"stop_tokens": stops, **extra})
            s = llm.last_stats
            runs.append((len(out[0]) - 1) / max(s["seconds"] - s["time_to_first_token_s"], 1e-9))
        tps[label] = statistics.median(runs)
        print(label, tps[label], flush=True)
    return {"tokens_per_s": tps, "overhead_ms_per_token": 1000 * (1 / tps["json_schema"] - 1 / tps["unconstrained"])}


def validity(n_valid: int, max_new_tokens: int) -> dict:
    import jsonschema

    llm, prompt, stops = smol()
    valid, finish, lengths, examples = 0, {}, [], []
    for seed in range(n_valid):
        out = llm.generate([prompt], max_new_tokens, temperature=1, seed=seed, stop_tokens=stops, json_schema=SCHEMA)
        reason = llm.last_stats["finish_reasons"][0]
        finish[reason] = finish.get(reason, 0) + 1
        text = llm.tokenizer.decode(out[0])
        lengths.append(len(out[0]))
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError):
            pass
        if seed < 3:
            examples.append(text)
        print(f"sample {seed}: {reason}, {len(out[0])} tokens, valid so far {valid} of {seed + 1}", flush=True)
    return {
        "valid": valid,
        "sampled": n_valid,
        "finish_reasons": finish,
        "answer_tokens_median": statistics.median(lengths),
        "answer_tokens_max": max(lengths),
        "examples": examples,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["mask", "speed", "valid"], required=True)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=256)
    args = p.parse_args()
    out = ROOT / "benchmarks" / "results"
    path = out / "structured-cpu.json"
    result = json.loads(path.read_text()) if path.exists() else {"schema": SCHEMA}
    from llama3.eval.bench import cpu_model

    before = os.getloadavg()
    t0 = time.perf_counter()
    part = {"mask": mask_costs, "speed": speed, "valid": lambda: validity(args.samples, args.max_new_tokens)}[
        args.part
    ]()
    result[args.part] = {
        **({"rows": part} if isinstance(part, list) else part),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - t0, 1),
        "load_average_before": before,
        "load_average_after": os.getloadavg(),
    }
    path.write_text(json.dumps(result, indent=1) + "\n")
    (out / "structured-cpu.md").write_text(markdown(result))
    print(markdown(result))


def _when(r: dict) -> str:
    before, after = r["load_average_before"][0], r["load_average_after"][0]
    return f"{r['machine']}, {r['date']}, load average {before:.2f} before, {after:.2f} after"


def markdown(result: dict) -> str:
    lines = [
        "# Structured output: grammar mask cost and validity",
        "",
        "`python benchmarks/bench_structured.py --part mask|speed|valid`; the schema is in `structured-cpu.json`.",
        "",
    ]
    if "mask" in result:
        r = result["mask"]
        lines += [
            f"Mask cost ({_when(r)}): the same schema and valid instance ({r['rows'][0]['tokens']} / "
            f"{r['rows'][-1]['tokens']} tokens); per token, the bitmask of allowed tokens filled and the token "
            "accepted; over 5 walks.",
            "",
            "| vocabulary | engine | per token, median (us) | p95 (us) | vocabulary setup (s) | schema compile (s) |",
            "|---|---|---|---|---|---|",
        ]
        for x in r["rows"]:
            lines.append(
                f"| {x['vocabulary']} | {x['engine']} | {x['per_token_us']:.0f} | {x['per_token_p95_us']:.0f} | "
                f"{x['vocab_s']:.2f} | {x['compile_s']:.3f} |"
            )
        lines.append("")
    if "speed" in result:
        r = result["speed"]
        lines += [
            f"Decode ({_when(r)}): the embedded SmolLM2-135M-Instruct, up to 64 tokens at temperature 1, median of 5:",
            "",
            "| decode | tokens/s |",
            "|---|---|",
            f"| unconstrained | {r['tokens_per_s']['unconstrained']:.1f} |",
            f"| json_schema (xgrammar) | {r['tokens_per_s']['json_schema']:.1f} |",
            "",
            f"Overhead: {r['overhead_ms_per_token']:.2f} ms per token.",
            "",
        ]
    if "valid" in result:
        r = result["valid"]
        lines += [
            f"Validity ({_when(r)}): **{r['valid']} of {r['sampled']}** answers of the embedded SmolLM2-135M-Instruct, "
            f"sampled at temperature 1 (seeds 0-{r['sampled'] - 1}) with `json_schema`, parse and validate with "
            f"`jsonschema` (finish reasons {r['finish_reasons']}; answer length median {r['answer_tokens_median']} "
            f"tokens, max {r['answer_tokens_max']}).",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
