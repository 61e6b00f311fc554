"""The prefix cache through the server: the same workloads against a server with the prefix cache (the default)
and one without (`--prefix-cache-tokens 0`), one after the other in the same run, on the embedded SmolLM2
(int4 on the CPU, as `llama3 serve` loads it).

1. A 10-turn chat: each turn sends the whole conversation so far (a system prompt, every earlier question and
   answer) and a new question through /v1/chat/completions, streamed, greedy; time to first token per turn.
2. 16 clients at once, each with the same 500-token system prompt and its own question: the prompt tokens the
   server ran through the model (its /metrics gauge `llama3_prefill_tokens_computed`).

    python benchmarks/bench_prefix_cache.py                     # results in benchmarks/results/prefix-cache-cpu.*
    python benchmarks/bench_prefix_cache.py --turns 10 --answer-tokens 32 --system-tokens 500 --clients 16

The server runs in this process (uvicorn in a thread, as the tests run it); clients are httpx, the 16 clients
in threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"

QUESTIONS = [
    "What is the capital of France?",
    "Name three prime numbers.",
    "Why is the sky blue?",
    "Give me a word that rhymes with cat.",
    "How many legs does a spider have?",
    "What is two plus two?",
    "Suggest a name for a goldfish.",
    "What colour are bananas?",
    "Say something nice about Mondays.",
    "What do bees make?",
    "Which planet is the largest?",
    "What is the opposite of hot?",
    "Name a fruit that is red.",
    "How many days are in a week?",
    "What sound does a cow make?",
    "What is frozen water called?",
]


class Server:
    """uvicorn serving `app` in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        import uvicorn

        self.app, self.sock = app, socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def chat(http, url: str, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
    """(time to first token, answer, prompt tokens) of one streamed greedy chat completion."""
    body = {"model": "smol", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0, ttft, text, prompt_tokens = time.perf_counter(), None, [], 0
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = ttft or time.perf_counter() - t0
                text.append(chunk["choices"][0]["delta"]["content"])
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    return ttft or 0.0, "".join(text), prompt_tokens


def computed(http, url: str) -> int:
    """The server's count of prompt tokens run through the model, from /metrics."""
    for line in http.get(f"{url}/metrics").text.splitlines():
        if line.startswith("llama3_prefill_tokens_computed "):
            return int(float(line.split()[1]))
    raise RuntimeError("no llama3_prefill_tokens_computed in /metrics")


def system_prompt(tokenizer, n: int) -> str:
    """A system prompt of about n tokens: numbered house rules."""
    rules, i = [], 0
    while len(tokenizer.encode(" ".join(rules))) < n:
        i += 1
        rules.append(f"Rule {i}: answer question {i} politely, in one short sentence, and never mention rule {i + 1}.")
    return " ".join(rules)


def run(llm, a, prefix_cache_tokens: int | None) -> dict:
    import httpx

    from llama3.serve.app import create_app

    app = create_app(llm, model_name="smol", max_batch_size=a.clients, max_seq_len=a.max_seq_len,
                     prefix_cache_tokens=prefix_cache_tokens)  # fmt: skip
    out: dict = {"prefix_cache": prefix_cache_tokens != 0}
    with Server(app) as s, httpx.Client(timeout=600) as http:
        chat(http, s.url, [{"role": "user", "content": "Hello!"}], 4)  # warm-up: first-call costs out of the numbers
        messages = [{"role": "system", "content": "You are a friendly assistant. Keep every answer short."}]
        turns = []
        for turn in range(a.turns):
            messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            before = computed(http, s.url)
            ttft, answer, prompt_tokens = chat(http, s.url, messages, a.answer_tokens)
            turns.append({"turn": turn + 1, "prompt_tokens": prompt_tokens, "computed": computed(http, s.url) - before,
                          "ttft_ms": round(1000 * ttft, 1), "answer": answer})  # fmt: skip
            messages.append({"role": "assistant", "content": answer})
            print(json.dumps({"prefix_cache": out["prefix_cache"], **turns[-1]}), flush=True)
        out["chat"] = turns

        system = {"role": "system", "content": system_prompt(llm.tokenizer, a.system_tokens)}
        before, t0 = computed(http, s.url), time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            results = list(
                pool.map(
                    lambda q: chat(http, s.url, [system, {"role": "user", "content": q}], a.shared_answer_tokens),
                    [QUESTIONS[i % len(QUESTIONS)] + f" (client {i})" for i in range(a.clients)],
                )
            )
        out["shared"] = {
            "clients": a.clients,
            "prompt_tokens": sum(r[2] for r in results),
            "computed": computed(http, s.url) - before,
            "seconds": round(time.perf_counter() - t0, 2),
            "system_tokens": len(llm.tokenizer.encode(system["content"])),
        }
        print(json.dumps({"prefix_cache": out["prefix_cache"], **out["shared"]}), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--answer-tokens", type=int, default=32, help="max_tokens of each chat turn (default: 32)")
    p.add_argument("--system-tokens", type=int, default=500, help="the shared system prompt (default: 500)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--shared-answer-tokens", type=int, default=8, help="max_tokens of each client (default: 8)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--out", help="results file stem (default: benchmarks/results/prefix-cache-cpu)")
    a = p.parse_args()

    import logging

    import torch

    from llama3 import Llama
    from llama3.eval.bench import cpu_model

    if a.threads:
        torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    llm = Llama.from_pretrained(device="cpu", quantize="int4", progress=False)  # as `llama3 serve` loads it
    with_cache = run(llm, a, None)
    without = run(llm, a, 0)

    last_with, last_without = with_cache["chat"][-1], without["chat"][-1]
    shared_w, shared_wo = with_cache["shared"], without["shared"]
    same = [w["answer"] == wo["answer"] for w, wo in zip(with_cache["chat"], without["chat"], strict=True)]
    summary = {
        "ttft_last_turn_speedup": round(last_without["ttft_ms"] / last_with["ttft_ms"], 2),
        "shared_prefill_cut": round(shared_wo["computed"] / shared_w["computed"], 2),
        "chat_answers_identical": all(same),
    }
    meta = {
        "model": "embedded SmolLM2-135M-Instruct, int4 (bfloat16 activations)",
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "threads": a.threads or torch.get_num_threads(),
        "turns": a.turns,
        "answer_tokens": a.answer_tokens,
        "clients": a.clients,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # at the start, at the end
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    stem = Path(a.out) if a.out else RESULTS / "prefix-cache-cpu"
    stem.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "summary": summary, "with_prefix_cache": with_cache, "without": without}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Prefix cache through the server: {meta['model']}, {meta['threads']} torch threads, {meta['machine']}, "
        f"torch {meta['torch']}, {meta['date']}; 1-minute load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (the machine's other jobs share its cores). Both servers in one run "
        f"(`python benchmarks/bench_prefix_cache.py`), greedy, streamed.",
        "",
        f"A {a.turns}-turn chat (up to {a.answer_tokens} tokens per answer; each turn sends the whole conversation):",
        "",
        "| turn | prompt tokens | computed, cache | TTFT, cache (ms) | computed, no cache | TTFT, no cache (ms) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {w['turn']} | {w['prompt_tokens']} | {w['computed']} | {w['ttft_ms']} | {wo['computed']} | "
            f"{wo['ttft_ms']} |"
            for w, wo in zip(with_cache["chat"], without["chat"], strict=True)
        ],
        "",
        f"Time to first token of turn {a.turns}: {summary['ttft_last_turn_speedup']}x lower with the prefix cache. "
        f"The answers were {'identical' if all(same) else 'not all identical'} with and without it.",
        "",
        f"{a.clients} clients at once, the same {shared_w['system_tokens']}-token system prompt and each its own "
        f"question (up to {a.shared_answer_tokens} tokens per answer):",
        "",
        "| | prompt tokens | prompt tokens computed | wall time (s) |",
        "|---|---|---|---|",
        f"| with the prefix cache | {shared_w['prompt_tokens']} | {shared_w['computed']} | {shared_w['seconds']} |",
        f"| without | {shared_wo['prompt_tokens']} | {shared_wo['computed']} | {shared_wo['seconds']} |",
        "",
        f"Prefill work cut {summary['shared_prefill_cut']}x. The whole benchmark took {meta['total_seconds']} s.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
