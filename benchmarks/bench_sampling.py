"""Top-p sampling on the CPU: the cost per token of the distribution `sample` draws from, sorting the whole
vocabulary (the form every sampler used before) against `sampling_probs`, which first looks for the nucleus among
the 256 most likely tokens (`nucleus_among_the_top`) and sorts only where it reaches past them.

    python benchmarks/bench_sampling.py

Logits: one row, standard normal noise plus a head of 40 tokens 4 to 8 above it (the nucleus is a few to a dozen
tokens at the CLI's temperature 0.6 and top_p 0.9), at SmolLM2's vocabulary (49,152) and Llama 3's (128,256);
and a flat row (noise only), where the nucleus holds thousands of tokens and both forms sort. The two results are
checked equal. Time: median of 200 calls after 20. Results: benchmarks/results/sampling-cpu.json and .md.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from llama3.eval.bench import load_average, machine, machine_line
from llama3.generate.params import SamplingParams
from llama3.generate.sampling import sampling_probs

RESULTS = Path(__file__).parent / "results"
PARAMS = SamplingParams(temperature=0.6, top_p=0.9, top_k=None)


def full_sort(logits: torch.Tensor) -> torch.Tensor:
    """`sampling_probs` as it was: temperature, softmax, then top-p by sorting the whole row."""
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / PARAMS.temperature
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(dim=-1) - sorted_probs > PARAMS.top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def median_us(fn, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    before, rows = load_average(), []
    g = torch.Generator().manual_seed(0)
    for vocab in (49152, 128256):
        for kind in ("peaked", "flat"):
            logits = torch.randn(1, vocab, generator=g)
            if kind == "peaked":
                logits[:, :40] += torch.linspace(8, 4, 40)
            assert torch.equal(full_sort(logits), sampling_probs(logits, PARAMS)), (vocab, kind)
            nucleus = int((full_sort(logits) > 0).sum())
            sort_us = median_us(lambda x=logits: full_sort(x))
            ours_us = median_us(lambda x=logits: sampling_probs(x, PARAMS))
            rows.append({"vocab": vocab, "logits": kind, "nucleus_tokens": nucleus, "full_sort_us": round(sort_us),
                         "sampling_probs_us": round(ours_us), "speedup": round(sort_us / ours_us, 2)})  # fmt: skip
            print(rows[-1], flush=True)
    info = machine()
    header = {
        "machine": info,
        "load_average": {"before": before, "after": load_average()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "params": {"temperature": PARAMS.temperature, "top_p": PARAMS.top_p},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sampling-cpu.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    lines = [
        f"Top-p sampling's distribution per token (temperature 0.6, top_p 0.9, one row; median us of 200 calls), "
        f"`python benchmarks/bench_sampling.py`. {machine_line(info)}; torch {torch.__version__}; {header['date']}; "
        f"load average {' '.join(map(str, before or []))} before, {' '.join(map(str, load_average() or []))} after.",
        "",
        "| vocabulary | logits | nucleus tokens | sort the row (us) | sampling_probs (us) | speed-up |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab']:,} | {r['logits']} | {r['nucleus_tokens']:,} | {r['full_sort_us']:,} | "
            f"{r['sampling_probs_us']:,} | {r['speedup']}x |"
        )
    (RESULTS / "sampling-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
