"""Speculative decoding against plain decoding, same run, same prompt: acceptance and effective speed.

    python benchmarks/bench_speculative.py                  # CPU: the embedded SmolLM2 (int4, as the CLI runs it
                                                            # on a CPU), prompt lookup on a rewrite-this-paragraph task
    python benchmarks/bench_speculative.py --device cuda    # GPU: Llama-3-8B shape drafted by a Llama-3.2-1B shape
    python benchmarks/bench_speculative.py --smoke          # the GPU path on tiny random shapes on the CPU

CPU: greedy, plain decoding and prompt lookup (N=3) at several K take turns, median of --repeats; the tokens
are checked to be plain greedy's. Effective tokens/s is new tokens after the first over the time after the first
(the same definition as plain decode tokens/s).

GPU: random weights make acceptance meaningless (a random draft almost never agrees), so the run reports the
time of one verified step (K draft steps and one target forward of K + 1 tokens, as the speculative loop runs
them: eagerly) against a plain decode step (CUDA-graph replay and eager), and the break-even acceptance rate:
the per-guess acceptance a at which the expected tokens per step, (1 - a^(K+1)) / (1 - a), pay for the step.
Results go to benchmarks/results/speculative-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama3 import Llama, ModelArgs  # noqa: E402
from llama3.eval.bench import machine_line as machine  # noqa: E402
from llama3.eval.bench_random import NullTokenizer, random_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"

PARAGRAPH = (
    "On tuesday morning the commitee met in the old library to discuss the budget for next year. The chair "
    "opened the meeting by thanking everyone for comming, and then asked the treasurer to present the numbers. "
    "Spending on books had risen by ten percent, while the cost of heating the building had nearly doubled "
    "since the winter before. Several members suggested closing the reading room on weekends to save money, "
    "but others argued that the students depend on it most during exam season. In the end the committee agreed "
    "to ask the city for a small grant and to meet again in two weeks."
)
# Two ways to ask for the same edit: the chat model's own format, and a plain completion (which the small model
# follows by copying more faithfully: more of its answer is in the prompt)
CHAT_TASK = "Proofread the following text and return the corrected text.\n\nText: " + PARAGRAPH
COMPLETION_TASK = "Original: " + PARAGRAPH + "\nCorrected (spelling fixed, 'tuesday' changed to 'Friday'):"


def expected_tokens(a: float, k: int) -> float:
    """Tokens per verified step when each guess is accepted with probability a: 1 + a + ... + a^k."""
    return sum(a**i for i in range(k + 1))


def break_even(step_ratio: float, k: int) -> float | None:
    """The acceptance rate at which a verified step (step_ratio plain steps long) yields step_ratio tokens."""
    if step_ratio <= 1:
        return 0.0
    if step_ratio >= k + 1:
        return None  # even accepting every guess does not pay
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < step_ratio else (lo, mid)
    return (lo + hi) / 2


def run(llm: Llama, prompt: list[int], n: int, **spec) -> dict:
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    tokens = llm.generate([prompt], n, temperature=0, **spec)[0]
    sync()
    s = dict(llm.last_stats)
    s["total_s"] = time.perf_counter() - t0
    s["tokens"] = tokens
    return s


def cpu_benchmark(args) -> dict:
    llm = Llama.from_pretrained(quantize="int4", progress=False)  # what `llama3 generate` runs on a CPU
    prompts = {
        "chat": llm.chat_format.encode_dialog_prompt([{"role": "user", "content": CHAT_TASK}]),
        "completion": llm.tokenizer.encode(COMPLETION_TASK, bos=True),
    }
    stops = llm.chat_stop_tokens
    configs = {"plain": {}} | {f"prompt lookup N=3 K={k}": {"prompt_lookup": 3, "speculate_k": k} for k in args.ks}
    for spec in configs.values():  # warm-up
        run(llm, prompts["chat"], 8, stop_tokens=stops, **spec)
    rows, texts = [], {}
    for task, prompt in prompts.items():
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        for _ in range(args.repeats):  # the systems take turns, so a busy moment hits them all
            for name, spec in configs.items():
                runs[name].append(run(llm, prompt, args.new_tokens, stop_tokens=stops, **spec))
        plain_tokens = runs["plain"][0]["tokens"]
        texts[task] = llm.tokenizer.decode(plain_tokens)
        plain_rate = statistics.median(r["tokens_per_second"] for r in runs["plain"])
        for name, rs in runs.items():
            s = rs[0]
            rate = statistics.median(r["tokens_per_second"] for r in rs)
            drafted = s.get("drafted", 0)
            rows.append(
                {
                    "task": task,
                    "prompt_len": len(prompt),
                    "system": name,
                    "new_tokens": len(s["tokens"]),
                    "same_tokens_as_plain": all(r["tokens"] == plain_tokens for r in rs),
                    "first_difference": first_difference(s["tokens"], plain_tokens),
                    "decode_tok_s": rate,
                    "speedup": rate / plain_rate,
                    "total_s": statistics.median(r["total_s"] for r in rs),
                    "verify_steps": s.get("verify_steps"),
                    "drafted": drafted,
                    "accepted": s.get("accepted", 0),
                    "acceptance_rate": s["accepted"] / drafted if drafted else None,
                    "tokens_per_step": (len(s["tokens"]) - 1) / s["verify_steps"] if s.get("verify_steps") else 1.0,
                }
            )
    # bf16 activations (int4 layers) round a (K+1)-token forward differently from a one-token step, which can flip
    # a near-tie between the two likeliest tokens; in float32 the greedy tokens must be plain decoding's exactly
    f32 = Llama.from_pretrained(progress=False)
    float32_check = {}
    for task, prompt in prompts.items():
        plain_tokens = run(f32, prompt, args.new_tokens, stop_tokens=stops)["tokens"]
        for k in args.ks:
            spec = run(f32, prompt, args.new_tokens, stop_tokens=stops, prompt_lookup=3, speculate_k=k)["tokens"]
            float32_check[f"{task} K={k}"] = spec == plain_tokens
    return {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (int4)",
        "rows": rows,
        "float32_same_tokens_as_plain": float32_check,
        "texts": texts,
    }


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (in a token or in length), None if they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def step_times(args, device: torch.device) -> dict:
    if args.smoke:
        small = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=96, max_seq_len=512)
        target_args, draft_args = ModelArgs(**small), ModelArgs(**{**small, "n_layers": 1})
        dtype, names = torch.float32, ("tiny 2-layer", "tiny 1-layer")
    else:
        target_args, draft_args = ModelArgs.from_name("llama-3-8b"), ModelArgs.from_name("llama-3.2-1b")
        dtype, names = torch.bfloat16, ("Llama-3-8B shape", "Llama-3.2-1B shape")
    target = Llama(random_model(target_args, device, dtype, args.backend), NullTokenizer(target_args.vocab_size))
    draft = Llama(random_model(draft_args, device, dtype, args.backend), NullTokenizer(draft_args.vocab_size))
    eager = Llama(target.model, NullTokenizer(target_args.vocab_size), cuda_graphs=False)
    prompt = list(range(1, args.prompt_len + 1))
    n = args.new_tokens

    def per_step(llm: Llama, **spec) -> float:
        run(llm, prompt, 8, **spec)  # warm-up (and capture)
        times = []
        for _ in range(args.repeats):
            s = run(llm, prompt, n, stop_tokens=[], **spec)
            steps = s.get("verify_steps", n - 1)
            times.append((s["seconds"] - s["time_to_first_token_s"]) / steps)
        return statistics.median(times)

    plain_graph = per_step(target)
    plain_eager = per_step(eager)
    rows = [
        {
            "system": "plain decode step (graph)" if device.type == "cuda" else "plain decode step",
            "ms": plain_graph * 1e3,
        }
    ]
    if device.type == "cuda":
        rows.append({"system": "plain decode step (eager)", "ms": plain_eager * 1e3})
    for k in args.ks:
        t = per_step(target, draft=draft, speculate_k=k)
        ratio = t / plain_graph
        rows.append(
            {
                "system": f"verified step, draft K={k}",
                "ms": t * 1e3,
                "plain_steps": ratio,
                "break_even_acceptance": break_even(ratio, k),
            }
        )
    return {"model": names[0], "draft": names[1], "dtype": str(dtype).removeprefix("torch."), "rows": rows}


def markdown(result: dict) -> str:
    head = f"{result['title']}. {result['machine']}, torch {result['torch']}, {result['date']}."
    lines = [head, ""]
    if "texts" in result:
        lines += [
            "| task | system | new tokens | same tokens as plain | acceptance | tokens / target forward | decode tok/s "
            "| speedup | total s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            acc = (
                "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%} ({r['accepted']}/{r['drafted']})"
            )
            lines.append(
                f"| {r['task']} ({r['prompt_len']} tokens) | {r['system']} | {r['new_tokens']} | "
                f"{'yes' if r['same_tokens_as_plain'] else 'NO'} | {acc} | "
                f"{r['tokens_per_step']:.2f} | {r['decode_tok_s']:.1f} | {r['speedup']:.2f}x | {r['total_s']:.2f} |"
            )
    else:
        lines += ["| step | ms | plain steps | break-even acceptance |", "|---|---|---|---|"]
        for r in result["rows"]:
            ratio = f"{r['plain_steps']:.2f}" if "plain_steps" in r else "1"
            be = r.get("break_even_acceptance", "")
            be = "-" if "plain_steps" not in r else ("never" if be is None else f"{be:.0%}")
            lines.append(f"| {r['system']} | {r['ms']:.2f} | {ratio} | {be} |")
    if "float32_same_tokens_as_plain" in result:
        checks = result["float32_same_tokens_as_plain"]
        lines += [
            "",
            "Greedy tokens differ from plain decoding only where a verification forward of K + 1 tokens rounds "
            "differently from a one-token step (bf16 activations of the int4 layers) at a near-tie; the first "
            "difference per row: "
            + ", ".join(
                f"{r['task']} {r['system'].removeprefix('prompt lookup ')}: token {r['first_difference']}"
                for r in result["rows"]
                if r["first_difference"] is not None
            )
            + ". In float32 the same runs give plain decoding's tokens: "
            + ", ".join(f"{name} {'yes' if same else 'NO'}" for name, same in checks.items())
            + ".",
        ]
    lines += ["", f"The whole benchmark took {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--ks", default="4,8", help="guesses per step to measure (default: 4,8)")
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--prompt-len", type=int, default=128, help="GPU / smoke: prompt tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="the GPU path on tiny shapes on the CPU (checks the script)")
    args = p.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if device.type == "cpu" and not args.smoke:
        body = cpu_benchmark(args)
        title = (
            f"Speculative decoding by prompt lookup, {body['model']}, correct-a-paragraph task as a chat prompt and "
            f"as a completion, greedy, up to {args.new_tokens} new tokens; median of {args.repeats} runs, "
            "the systems taking turns"
        )
        name = "speculative-cpu-smollm2"
    else:
        with torch.inference_mode():
            body = step_times(args, device)
        title = (
            f"Time of a verified step, {body['model']} drafted by {body['draft']} ({body['dtype']}, random weights), "
            f"batch 1, prompt {args.prompt_len}; median of {args.repeats} runs of {args.new_tokens} tokens"
        )
        name = f"speculative-{device.type}" + ("-smoke" if args.smoke else "")
    result = {
        "benchmark": "speculative",
        "title": title,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **body,
        "seconds": time.perf_counter() - t0,
    }
    md = markdown(result)
    print(md)
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(md)


if __name__ == "__main__":
    main()
