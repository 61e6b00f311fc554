"""LoRA training speed and peak memory: `llama3.finetune` against transformers + PEFT, same model, data, run.

    python benchmarks/bench_finetune.py                      # the embedded SmolLM2-135M (GGUF), float32 base, CPU
    python benchmarks/bench_finetune.py --steps 4 --rounds 3 --threads 2

Every system trains the same LoRA (rank, alpha, dropout, all seven projections), with AdamW at the same
learning rate, on the same batches: the rows of benchmarks/data/persona.jsonl encoded with the model's chat
format (assistant tokens learned), grouped by length and padded as `llama3.finetune` does, loss summed over
learned tokens / their count, gradient clipping at 1.0. The systems:
- llama3: `llama3.finetune.finetune(TrainConfig(...))` itself, the loop `llama3 finetune` runs, float32 base;
- transformers + PEFT: `LlamaForCausalLM.from_pretrained(dir, gguf_file=...)` (float32) wrapped by
  `peft.get_peft_model`, trained by a plain PyTorch loop (forward for the logits, the same loss, backward,
  clip, AdamW step). trl's SFTTrainer is not run (see the note the results carry).

Each run is a subprocess of its own (`--worker`), so its peak memory is its own: VmHWM from /proc/self/status
after training (the high-water mark of resident memory, loading included) and the peak during training
alone (the kernel's counter reset through /proc/self/clear_refs once the model is loaded, where allowed).
A run trains 2 x `--steps` steps; tokens/s counts the real (unpadded) tokens of the second half (the first
half warms up allocators and caches) over its wall time. Runs alternate between systems (ABBA...), so load
drift on a shared machine hits both; the table gives the median over `--rounds` runs of each.
Results go to benchmarks/results/finetune-cpu-smollm2.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "benchmarks" / "data" / "persona.jsonl"
SYSTEMS = ("llama3", "transformers+peft")
TRL_NOTE = (
    "trl's SFTTrainer not run: trl 1.16.0 installs here without changing torch or transformers (pip --dry-run), "
    "but it brings datasets, pandas and multiprocess into the shared environment; not added for this run"
)


def proc_status(key: str) -> int:
    """A memory line of /proc/self/status (VmHWM, VmRSS), in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: '5' to /proc/self/clear_refs); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- workers (one system, one run, in a process of its own) ------------------------------------------


def run_llama3(args: argparse.Namespace) -> dict:
    """`llama3.finetune.finetune` as `llama3 finetune` runs it; the log's second record gives the timed half."""
    import llama3.finetune as ft

    after_load: dict = {}
    load_for_training = ft.load_for_training

    def load_and_mark(config):  # the benchmark's only hook: note memory once the model is loaded
        out = load_for_training(config)
        after_load["rss"] = proc_status("VmRSS")
        after_load["hwm"] = proc_status("VmHWM")
        after_load["reset"] = reset_peak_rss()
        return out

    ft.load_for_training = load_and_mark
    with tempfile.TemporaryDirectory() as out:
        config = ft.TrainConfig(
            data=str(DATA),
            output=out,
            quantize=None,  # a float base (the CLI's default for the embedded model on a CPU is int4)
            dtype="float32",
            lora_rank=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            learning_rate=args.lr,
            batch_size=args.batch_size,
            max_seq_len=args.max_seq_len,
            max_steps=2 * args.steps,
            logging_steps=args.steps,
            seed=args.seed,
            device="cpu",
            progress=False,
            log=lambda msg: None,
        )
        summary = ft.finetune(config)
        records = [json.loads(line) for line in (Path(out) / ft.TRAIN_LOG).read_text().splitlines()]
    timed = records[1]
    return {
        "tokens_per_s": timed["tokens_per_s"],
        "losses": summary["losses"],
        "rss_after_load": after_load["rss"],
        "hwm_after_load": after_load["hwm"],
        "peak_reset_after_load": after_load["reset"],
    }


def run_peft(args: argparse.Namespace) -> dict:
    """transformers' model from the same GGUF, PEFT's LoRA, and a plain loop over the same batches."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from llama3.chat_format import chat_format_for
    from llama3.checkpoint import default_model
    from llama3.finetune import collate, length_grouped_batches, prepare, read_chat_rows
    from llama3.gguf import load_gguf_tokenizer
    from llama3.lora import TARGET_MODULES

    gguf = default_model()
    # our tokenizer and chat format encode the rows: the same ids and labels as the llama3 run
    chat_format = chat_format_for(load_gguf_tokenizer(gguf))
    train = prepare(read_chat_rows(DATA), chat_format, args.max_seq_len, str(DATA), lambda msg: None)
    lengths = [len(e.ids) for e in train]
    n_batches = -(-len(train) // args.batch_size)

    model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    torch.manual_seed(args.seed)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    rss_after_load, hwm_after_load, reset = proc_status("VmRSS"), proc_status("VmHWM"), reset_peak_rss()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    losses, tokens, t0 = [], 0, 0.0
    batches: list[list[int]] = []
    for k in range(2 * args.steps):
        epoch, i = divmod(k, n_batches)
        if i == 0:
            batches = length_grouped_batches(lengths, args.batch_size, args.seed, epoch)
        if k == args.steps:
            tokens, t0 = 0, time.perf_counter()
        batch = [train[j] for j in batches[i]]
        inputs, targets = collate(batch, torch.device("cpu"))
        n_targets = sum(e.n_targets for e in batch)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        (loss / n_targets).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() / n_targets)
        tokens += sum(len(e.ids) for e in batch)
    seconds = time.perf_counter() - t0
    return {
        "tokens_per_s": tokens / seconds,
        "losses": losses,
        "rss_after_load": rss_after_load,
        "hwm_after_load": hwm_after_load,
        "peak_reset_after_load": reset,
    }


def worker(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = (run_llama3 if args.worker == "llama3" else run_peft)(args)
    # VmHWM now: the peak while training if the counter was reset after loading, else the peak of the whole run
    hwm = proc_status("VmHWM")
    result["peak_rss_training"] = hwm if result["peak_reset_after_load"] else None
    result["peak_rss"] = max(hwm, result["hwm_after_load"])
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


# -- driver ----------------------------------------------------------------------------------------------


def run_once(system: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", system]
    for name in ("steps", "batch_size", "max_seq_len", "rank", "alpha", "dropout", "lr", "seed", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start, load_start = time.perf_counter(), load_avg()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{system} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result |= {"system": system, "wall_s": time.perf_counter() - start, "load_avg": [load_start, load_avg()]}
    return result


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores"


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after as many warm-up steps)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each system, taking turns")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    parser.add_argument("--render", type=Path, help="only rewrite the markdown table of a results JSON")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.render:
        return write_markdown(json.loads(args.render.read_text()), args.render.with_suffix(".md"))

    import peft
    import transformers

    order = [s for r in range(args.rounds) for s in (SYSTEMS if r % 2 == 0 else SYSTEMS[::-1])]  # ABBA...
    runs = []
    load_start = load_avg()
    for system in order:
        r = run_once(system, args)
        print(
            f"{system:18s} {r['tokens_per_s']:6.1f} tok/s  peak RSS {mib(r['peak_rss_training'])} MiB training, "
            f"{mib(r['peak_rss'])} with loading (after load {mib(r['rss_after_load'])}); "
            f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}; "
            f"{r['wall_s']:.0f} s, load {r['load_avg'][0][0]}",
            flush=True,
        )
        runs.append(r)
    load_end = load_avg()

    rows = []
    for system in SYSTEMS:
        mine = [r for r in runs if r["system"] == system]
        peaks = [r["peak_rss_training"] for r in mine]
        rows.append(
            {
                "system": system,
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                "tokens_per_s_runs": [r["tokens_per_s"] for r in mine],
                "peak_rss_training": max(peaks) if None not in peaks else None,
                "peak_rss_with_load": max(r["peak_rss"] for r in mine),
                "rss_after_load": statistics.median(r["rss_after_load"] for r in mine),
                "first_loss": mine[0]["losses"][0],
                "last_loss": mine[0]["losses"][-1],
            }
        )
    ours, theirs = rows
    speedup = ours["tokens_per_s"] / theirs["tokens_per_s"]
    date = datetime.date.today().isoformat()
    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"Python {platform.python_version()}"
    )
    threads = runs[0]["threads"]
    result = {
        "benchmark": "LoRA fine-tuning tokens/s and peak RSS, CPU",
        "model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to a float32 base)",
        "data": str(DATA.relative_to(ROOT)),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "render")} | {"threads_used": threads},
        "machine": machine(),
        "versions": versions,
        "date": date,
        "load_avg_start_end": [load_start, load_end],
        "order": order,
        "rows": rows,
        "speedup_tokens_per_s": speedup,
        "runs": runs,
        "note": TRL_NOTE,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / "finetune-cpu-smollm2"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, stem.with_suffix(".md"))


def write_markdown(result: dict, path: Path) -> None:
    """The table of a result (also rewritable from its JSON: --render FILE.json)."""
    a, order, rows = result["settings"], result["order"], result["rows"]
    load_start, load_end = result["load_avg_start_end"]
    lines = [
        f"LoRA fine-tuning, SmolLM2-135M-Instruct (embedded GGUF) with a float32 base, CPU; rank {a['rank']}, "
        f"alpha {a['alpha']:g}, dropout {a['dropout']:g}, all 7 projections, AdamW lr {a['lr']:g}, batch "
        f"{a['batch_size']}, {Path(result['data']).name} (max-seq-len {a['max_seq_len']}); tokens/s = real tokens "
        f"of {a['steps']} steps after {a['steps']} warm-up steps; {a['rounds']} runs of each system taking turns "
        f"({', '.join(order)}), each run a process of its own. {result['machine']}, {a['threads_used']} torch "
        f"threads, {result['versions']}, {result['date']}; load average (1/5/15 min) {load_start} at the start, "
        f"{load_end} at the end.",
        "",
        "| system | train tokens/s, median | best run | each run (1-min load average at its start) "
        "| peak RSS while training (MiB) | peak RSS incl. loading (MiB) | RSS after loading (MiB) "
        "| loss first -> last step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mine = [r for r in result["runs"] if r["system"] == row["system"]]
        each = ", ".join(f"{r['tokens_per_s']:.1f} ({r['load_avg'][0][0]:.1f})" for r in mine)
        lines.append(
            f"| {row['system']} | {row['tokens_per_s']:.1f} | {max(row['tokens_per_s_runs']):.1f} | {each} "
            f"| {mib(row['peak_rss_training'])} | {mib(row['peak_rss_with_load'])} | {mib(row['rss_after_load'])} "
            f"| {row['first_loss']:.3f} -> {row['last_loss']:.3f} |"
        )
    ours, theirs = rows
    best = max(ours["tokens_per_s_runs"]) / max(theirs["tokens_per_s_runs"])
    lines += [
        "",
        f"llama3 / transformers+PEFT tokens/s: {result['speedup_tokens_per_s']:.2f}x (medians), {best:.2f}x (best "
        f"runs). {result['note']}.",
    ]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
