from __future__ import annotations

import argparse
import re
import sys
import time

from llama3.checks import ParamError
from llama3.cli.common import DEFAULT_MODEL_HELP, GROUP_SIZES, quantize_mode


def _add_finetune_parser(sub) -> None:
    ft = sub.add_parser(
        "finetune", help="LoRA / QLoRA supervised fine-tuning on chat rows; writes a PEFT adapter (and --merge a model)"
    )
    ft.add_argument("--model", "-m", help=DEFAULT_MODEL_HELP)
    ft.add_argument("--data", required=True, metavar="FILE", help='JSONL rows {"messages": [...]} (or .parquet)')
    ft.add_argument("--output", "-o", required=True, metavar="DIR", help="where the adapter, log and checkpoint go")
    ft.add_argument("--eval-data", metavar="FILE", help="held-out rows: eval loss at --eval-steps and at the end")
    ft.add_argument("--lora-rank", type=int, default=8, metavar="R", help="(default: %(default)s)")
    ft.add_argument("--lora-alpha", type=float, default=16.0, metavar="A", help="scaling alpha / R (default: 16)")
    ft.add_argument("--lora-dropout", type=float, default=0.05, metavar="P", help="(default: %(default)s)")
    ft.add_argument("--use-rslora", action="store_true", help="scale by alpha / sqrt(R)")
    ft.add_argument(
        "--target-modules",
        nargs="+",
        metavar="NAME",
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="HF projection names to adapt (default: all of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)",
    )
    ft.add_argument("--learning-rate", "--lr", type=float, default=2e-4, metavar="LR", help="(default: %(default)s)")
    ft.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's (default: %(default)s)")
    ft.add_argument("--batch-size", type=int, default=4, metavar="B", help="rows per micro-batch (default: 4)")
    ft.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per step (default: 1)")
    ft.add_argument("--max-seq-len", type=int, default=1024, metavar="L", help="longer rows are truncated (1024)")
    steps = ft.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: --epochs passes)")
    steps.add_argument("--epochs", type=int, default=1, metavar="E", help="passes over the data (default: 1)")
    ft.add_argument("--warmup-steps", type=int, default=0, metavar="W", help="linear warmup, then cosine (0)")
    ft.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default: %(default)s)")
    ft.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    ft.add_argument(
        "--quantize",
        choices=["int8", "int4", "none"],
        help="QLoRA: a quantized frozen base (CPU); default: int4 for the embedded model on the CPU, else none",
    )
    ft.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES, help="int4 group size (default: 32)")
    ft.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    ft.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="the frozen base's dtype")
    ft.add_argument("--logging-steps", type=int, default=10, metavar="N", help="a train_log.jsonl record every N")
    ft.add_argument("--eval-steps", type=int, metavar="N", help="eval loss every N steps (default: at each save)")
    ft.add_argument("--save-steps", type=int, metavar="N", help="checkpoint every N steps (default: at the end)")
    ft.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    ft.add_argument("--merge", action="store_true", help="also write DIR/merged: a full checkpoint (HF layout)")
    ft.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ft.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages on stderr")
    ft.set_defaults(parser=ft, keep_output=False)
    # argparse's own pattern (-1, -.5) takes "-1e-3" or "-inf" for an option ("expected one argument"): every
    # number is read as a value here, so that a negative --learning-rate is refused by name (no flag is numeric)
    ft._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$", re.IGNORECASE)


def cmd_finetune(args: argparse.Namespace) -> int:
    from llama3.train.finetune import TrainConfig, finetune

    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    quantize = quantize_mode(args)
    config = TrainConfig(
        data=args.data,
        output=args.output,
        model=args.model,
        eval_data=args.eval_data,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=tuple(args.target_modules),
        use_rslora=args.use_rslora,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_seq_len=args.max_seq_len,
        max_steps=args.max_steps,
        epochs=args.epochs,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        gradient_checkpointing=args.gradient_checkpointing,
        quantize=quantize,
        group_size=args.group_size,
        device=args.device,
        dtype=args.dtype,
        logging_steps=args.logging_steps,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        resume=args.resume,
        merge=args.merge,
        seed=args.seed,
        progress=not args.quiet,
        log=log,
    )
    try:
        config.check()
    except ParamError as e:  # the field named as the flag that sets it
        args.parser.error(f"argument --{e.param.replace('_', '-')}: {e.problem}")
    t0 = time.perf_counter()
    summary = finetune(config)
    losses = summary["losses"]
    if losses:
        log(
            f"llama3: {summary['steps']} steps in {time.perf_counter() - t0:.0f}s, "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        )
    return 0
