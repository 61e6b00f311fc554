"""LoRA training speed and peak memory: `llama3.train.finetune` against transformers + PEFT and trl, same model,
data, run.

    python benchmarks/bench_finetune.py                      # the embedded SmolLM2-135M (GGUF), float32 base, CPU
    python benchmarks/bench_finetune.py --steps 4 --rounds 3 --threads 2

Every system trains the same LoRA (rank, alpha, dropout, all seven projections), with AdamW at the same
learning rate, on the same batches: the rows of benchmarks/data/persona.jsonl encoded with the model's chat
format (assistant tokens learned), grouped by length and padded as `llama3.train.finetune` does, loss summed over
learned tokens / their count, gradient clipping at 1.0. The systems:
- llama3: `llama3.train.finetune.finetune(TrainConfig(...))` itself, the loop `llama3 finetune` runs, float32 base;
- transformers + PEFT: `LlamaForCausalLM.from_pretrained(dir, gguf_file=...)` (float32) wrapped by
  `peft.get_peft_model`, trained by a plain PyTorch loop (forward for the logits, the same loss, backward,
  clip, AdamW step);
- trl: its `SFTTrainer` given that same transformers model and the LoRA as `peft_config` (trl wraps it), float32,
  no packing, no gradient checkpointing, no eval or saving. The rows go in pre-tokenized: our encoding's
  `input_ids` with the learned positions as `completion_mask` (`completion_only_loss=True`), since SmolLM2's
  chat template has no {% generation %} markers for `assistant_only_loss`; trl builds the labels from them.
  trl's collator, loss and Trainer loop do the rest; only the batches are ours, handed to its collator by a
  `get_train_dataloader` override. What differs from the other two is listed in TRL_DIFFERENCES, which the
  results carry as their note. trl is an optional baseline, not a dependency: without it the run skips it and
  says why.

Each run is a subprocess of its own (`--worker`), so its peak memory is its own: VmHWM from /proc/self/status
after training (the high-water mark of resident memory, loading included) and the peak during training
alone (the kernel's counter reset through /proc/self/clear_refs once the model is loaded, where allowed).
A run trains 2 x `--steps` steps; tokens/s counts the real (unpadded) tokens of the second half (the first
half warms up allocators and caches) over its wall time (trl: a TrainerCallback's times at the ends of the
steps). Runs alternate between systems (ABC CBA ...), so load drift on a shared machine hits all; the table gives
the median over `--rounds` runs of each.
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
SYSTEMS = ("llama3", "transformers+peft", "trl")
TRL_DIFFERENCES = (
    "trains the same model (the float32 load above; transformers' GGUF marker removed, since Trainer refuses a "
    "model marked quantized), LoRA (peft_config), AdamW (torch.optim.AdamW, not trl's default fused one), learning "
    "rate, clipping and batches in float32 (trl's bf16 and gradient-checkpointing defaults off), timed by a "
    "TrainerCallback from the end of the last warm-up step to the end of the last step. What still differs: "
    "(1) its rows are pre-tokenized, our encoding's ids with the learned positions as `completion_mask` "
    "(`completion_only_loss`), since SmolLM2's chat template has no {% generation %} markers for "
    "`assistant_only_loss`; trl turns them into the same labels (the first loss is the same); "
    "(2) the batches reach trl's collator through a `get_train_dataloader` override (a batch sampler of the other "
    "runs' batches), as Trainer's samplers only make equal-size batches and 26 rows leave a batch of 2 each epoch; "
    "(3) trl's collator pads with the tokenizer's pad id and passes an attention mask, so the model runs all L "
    "positions of a batch (the others L - 1: the last token predicts nothing) and a padded batch gets an explicit "
    "padding mask in attention (the others: causal only, padding ignored by the loss); "
    "(4) trl's fused LM head scores every position on a CPU (in tiles, without Triton) and also computes each "
    "position's entropy and top-1 for its logged metrics, where the PEFT loop takes the full logits and llama3 "
    "projects only the labelled positions; "
    "(5) the loop is transformers' Trainer with accelerate (logging every step, callbacks, a NaN check of each "
    "loss) at a constant learning rate (the PEFT loop's too; llama3's is cosine, which costs nothing); "
    "(6) its process also imports datasets and pyarrow and holds the rows as an Arrow table (in its memory after "
    "loading, measured once SFTTrainer is built)"
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


def encoded_rows(gguf: Path, args: argparse.Namespace) -> list:
    """The rows as `llama3.train.finetune` encodes them (our tokenizer and chat format): the llama3 run's ids and
    labels."""
    from llama3.text.chat_format import chat_format_for
    from llama3.train.data import prepare, read_chat_rows
    from llama3.weights.gguf_tokenizer import load_gguf_tokenizer

    chat_format = chat_format_for(load_gguf_tokenizer(gguf))
    return prepare(read_chat_rows(DATA), chat_format, args.max_seq_len, str(DATA), lambda msg: None)


def training_batches(train: list, args: argparse.Namespace) -> list[list[int]]:
    """The 2 x steps batches (row indices) `llama3.train.finetune` trains on: epoch after epoch of length-grouped
    batches (the last batch of an epoch can be short: 26 rows make batches of 8, 8, 8 and 2)."""
    from llama3.train.data import length_grouped_batches

    lengths = [len(e.ids) for e in train]
    n_batches = -(-len(train) // args.batch_size)
    epochs = [
        length_grouped_batches(lengths, args.batch_size, args.seed, e) for e in range(-(-2 * args.steps // n_batches))
    ]
    return [epochs[k // n_batches][k % n_batches] for k in range(2 * args.steps)]


def run_llama3(args: argparse.Namespace) -> dict:
    """`llama3.train.finetune.finetune` as `llama3 finetune` runs it; the log's second record gives the timed half."""
    import llama3.train.finetune as ft

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


def peft_lora(args: argparse.Namespace):
    """The LoRA both transformers-side systems train: PEFT's config of the same rank, alpha, dropout, targets."""
    from peft import LoraConfig

    from llama3.model.lora import TARGET_MODULES

    return LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
    )


def run_peft(args: argparse.Namespace) -> dict:
    """transformers' model from the same GGUF, PEFT's LoRA, and a plain loop over the same batches."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from llama3.train.data import collate
    from llama3.weights.hub import default_model

    gguf = default_model()
    train = encoded_rows(gguf, args)
    batches = training_batches(train, args)

    model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, peft_lora(args))
    rss_after_load, hwm_after_load, reset = proc_status("VmRSS"), proc_status("VmHWM"), reset_peak_rss()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    losses, tokens, t0 = [], 0, 0.0
    for k, rows in enumerate(batches):
        if k == args.steps:
            tokens, t0 = 0, time.perf_counter()
        batch = [train[j] for j in rows]
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


def run_trl(args: argparse.Namespace) -> dict:
    """trl's SFTTrainer: the transformers model above, LoRA through `peft_config`, the same rows and batches."""
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from llama3.train.data import IGNORE
    from llama3.weights.hub import default_model

    gguf = default_model()
    train = encoded_rows(gguf, args)
    batches = training_batches(train, args)
    # pre-tokenized rows: our ids, and the learned positions as trl's completion mask (SmolLM2's chat template has no
    # {% generation %} markers, which `assistant_only_loss` needs); trl turns them into the same labels
    rows = Dataset.from_list(
        [{"input_ids": e.ids, "completion_mask": [int(label != IGNORE) for label in e.labels]} for e in train]
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # trl takes its pad id from it
    model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF load has dequantized every weight into plain float32 nn.Linear/Embedding, but leaves a GGUF
    # "quantizer" on the model as a marker, and Trainer refuses to train a model marked quantized: drop the marker
    # (transformers' own remove_quantization_config); the model and its numbers stay what the PEFT run trains.
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.hf_quantizer.remove_quantization_config(model)
    lora = peft_lora(args)
    step_end: dict[int, float] = {}
    records: list[dict] = []
    threads: list[int] = []

    class Timer(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            step_end[state.global_step] = time.perf_counter()
            threads.append(torch.get_num_threads())

        def on_log(self, _args, state, control, logs=None, **kwargs):
            records.append(dict(logs or {}))

    class SameBatches(SFTTrainer):
        """trl's samplers only make batches of one size; this feeds the other systems' batches to trl's collator."""

        def get_train_dataloader(self):
            dataset = self._remove_unused_columns(self.train_dataset, description="training")
            return self.accelerator.prepare(DataLoader(dataset, batch_sampler=batches, collate_fn=self.data_collator))

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,  # trl's default is bf16 autocast; the other systems train in float32
            fp16=False,
            gradient_checkpointing=False,  # trl's default is on
            max_length=args.max_seq_len,
            packing=False,
            padding_free=False,
            completion_only_loss=True,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            max_steps=2 * args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch",  # torch.optim.AdamW with its defaults, as the others (trl's default is the fused one)
            weight_decay=0.0,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        trainer = SameBatches(
            model=model,
            args=config,
            train_dataset=rows,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[Timer()],
        )
        rss_after_load, hwm_after_load, reset = proc_status("VmRSS"), proc_status("VmHWM"), reset_peak_rss()
        trainer.train()
    losses = [r["loss"] for r in records if "loss" in r]
    fed = sum(len(train[j].ids) for b in batches for j in b)
    counted = next(r["num_tokens"] for r in reversed(records) if "num_tokens" in r)
    if counted != fed or len(losses) != 2 * args.steps:
        raise RuntimeError(f"trl trained {counted} tokens in {len(losses)} steps, not the {fed} of our {len(batches)}")
    tokens = sum(len(train[j].ids) for b in batches[args.steps :] for j in b)
    return {
        "tokens_per_s": tokens / (step_end[2 * args.steps] - step_end[args.steps]),
        "losses": losses,
        "rss_after_load": rss_after_load,
        "hwm_after_load": hwm_after_load,
        "peak_reset_after_load": reset,
        "threads_while_training": sorted(set(threads)),
    }


def worker(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"llama3": run_llama3, "transformers+peft": run_peft, "trl": run_trl}[args.worker](args)
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
    from llama3.eval.bench import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores"


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

    trl_version, skipped = trl_available()
    systems = SYSTEMS if trl_version else SYSTEMS[:2]
    if skipped:
        print(f"trl's SFTTrainer skipped: {skipped}", flush=True)
    order = [s for r in range(args.rounds) for s in (systems if r % 2 == 0 else systems[::-1])]  # ABC CBA ...
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
    for system in systems:
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
    ours = rows[0]
    speedup = {row["system"]: ours["tokens_per_s"] / row["tokens_per_s"] for row in rows[1:]}
    date = datetime.date.today().isoformat()
    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        + (f"trl {trl_version}, " if trl_version else "")
        + f"Python {platform.python_version()}"
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
        "note": f"trl's SFTTrainer (trl {trl_version}) {TRL_DIFFERENCES}"
        if trl_version
        else f"trl's SFTTrainer skipped: {skipped}",
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / "finetune-cpu-smollm2"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, stem.with_suffix(".md"))


def trl_available() -> tuple[str | None, str | None]:
    """(trl's version, None) if its SFTTrainer imports here, else (None, why not)."""
    try:
        import trl
        from trl import SFTTrainer  # noqa: F401
    except Exception as e:  # an optional baseline: any import failure only skips it
        return None, f"trl does not import here ({type(e).__name__}: {e}); `pip install trl` to add it"
    return trl.__version__, None


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
    ours = rows[0]
    lines.append("")
    for row in rows[1:]:
        best = max(ours["tokens_per_s_runs"]) / max(row["tokens_per_s_runs"])
        lines.append(
            f"- llama3 / {row['system']} tokens/s: {result['speedup_tokens_per_s'][row['system']]:.2f}x (medians), "
            f"{best:.2f}x (best runs)."
        )
    lines += ["", f"{result['note']}."]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
