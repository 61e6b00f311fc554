"""Plot the loss curve of a `llama3 finetune` run from its train_log.jsonl.

    python scripts/plot_train_log.py out/train_log.jsonl                   # writes out/train_log.png
    python scripts/plot_train_log.py out/train_log.jsonl -o loss.png --title "SmolLM2 persona, int4 base"

The log holds one record per logging step, {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"},
and one per evaluation, {"step", "eval_loss"} (llama3/finetune.py). The figure has the training loss and
the held-out eval loss (when there is one) against the optimizer step on a log scale, with the learning
rate on a second axis. Needs matplotlib: pip install -e ".[plot]".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a train_log.jsonl; errors name the file and line."""
    train, evals = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            sys.exit(f"{path}, line {n}: not JSON ({e.msg})")
        if "eval_loss" in record:
            evals.append(record)
        elif "loss" in record:
            train.append(record)
        else:
            sys.exit(f"{path}, line {n}: neither a 'loss' nor an 'eval_loss' record: keys {sorted(record)}")
    if not train and not evals:
        sys.exit(f"{path}: no records")
    return train, evals


def plot(train: list[dict], evals: list[dict], output: Path, title: str | None) -> None:
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":  # matplotlib is there but one of its own imports failed: show that
            raise
        sys.exit('plotting needs matplotlib, the "plot" extra: pip install -e ".[plot]" (or pip install matplotlib)')
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], marker=".", label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label="eval loss (held out)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per learned token (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if train and "lr" in train[0]:
        lr_ax = ax.twinx()
        lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray", linestyle=":", label="lr")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        h, lab = lr_ax.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax.legend(handles, labels, loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="a train_log.jsonl written by llama3 finetune")
    parser.add_argument("--output", "-o", type=Path, help="the PNG to write (default: beside the log, .png)")
    parser.add_argument("--title", help="the figure's title")
    args = parser.parse_args(argv)
    if not args.log.is_file():
        sys.exit(f"train log not found: {args.log}")
    train, evals = read_log(args.log)
    output = args.output or args.log.with_suffix(".png")
    plot(train, evals, output, args.title)
    last = f"train loss {train[0]['loss']:.4g} -> {train[-1]['loss']:.4g}" if train else ""
    if evals:
        last += f"{', ' if last else ''}eval loss {evals[0]['eval_loss']:.4g} -> {evals[-1]['eval_loss']:.4g}"
    print(f"wrote {output} ({len(train)} train, {len(evals)} eval records; {last})")


if __name__ == "__main__":
    main()
