"""`llama3 eval`: task scores through lm-evaluation-harness, on our model (`llama3.eval.harness.Llama3LM`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llama3.cli.common import _add_threads_arg, resolve_model_source


def _add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model on lm-evaluation-harness tasks (needs the eval extra)",
        description="Runs lm-evaluation-harness tasks on the model through its LM interface (log-likelihoods with "
        "each shared context computed once for all its continuations, rolling log-likelihood by the strided "
        "window of 'llama3 perplexity', generation with stop strings). Unquantized weights by default (float32 "
        "on the CPU): scores are comparable with other systems' only at full precision.",
    )
    p.add_argument(
        "--model", "-m", help="a local dir, .gguf file or Hugging Face repo id (default: the embedded SmolLM2)"
    )
    p.add_argument("--tasks", "-t", required=True, metavar="T1,T2", help="lm-eval task or group names, comma-separated")
    p.add_argument("--include-path", metavar="DIR", help="a folder of your own task YAML files (lm-eval's format)")
    p.add_argument(
        "--limit", type=float, metavar="N", help="the first N documents of each task (below 1: that fraction)"
    )
    p.add_argument("--num-fewshot", type=int, metavar="N", help="examples in each prompt (default: the task's)")
    p.add_argument(
        "--batch-size",
        "-b",
        type=int,
        default=16,
        metavar="N",
        help="rows per forward: contexts, or continuations (default: 16)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="the longest input in tokens; longer contexts are cut on the left (default: the context, at most 2048)",
    )
    p.add_argument(
        "--stride", type=int, metavar="N", help="window step for rolling log-likelihoods (default: half the window)"
    )
    p.add_argument("--add-bos", action="store_true", help="begin every context with the bos token")
    p.add_argument("--json", metavar="FILE", help="write lm-eval's results (and per-document samples) as JSON")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="default: float32 on the CPU, else the checkpoint's default (bfloat16)",
    )
    p.add_argument(
        "--backend", choices=["auto", "torch", "triton"], default="auto", help="kernels (default: %(default)s)"
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "int4", "none"],
        default="none",
        help="weight-only quantization (default: none; int4 moves scores)",
    )
    p.add_argument("--seed", type=int, default=0, help="lm-eval's seeds (few-shot sampling; default: 0)")
    _add_threads_arg(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(parser=p)


def check_eval_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("batch_size", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"argument --{flag.replace('_', '-')}: must be >= 1, got {value}")
    if args.limit is not None and args.limit <= 0:
        parser.error(f"argument --limit: must be > 0, got {args.limit:g}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        parser.error(f"argument --num-fewshot: must be >= 0, got {args.num_fewshot}")
    if args.max_length is not None and args.max_length < 2:
        parser.error(f"argument --max-length: must be >= 2, got {args.max_length}")
    if args.stride is not None and (args.stride < 1 or (args.max_length and args.stride > args.max_length)):
        parser.error(f"argument --stride: must be in [1, --max-length], got {args.stride}")
    tasks = [t.strip() for t in args.tasks.split(",")]
    if not all(tasks):
        parser.error(f"argument --tasks/-t: an empty task name in {args.tasks!r}")
    args.task_list = tasks
    if args.include_path is not None and not Path(args.include_path).is_dir():
        parser.error(f"argument --include-path: {args.include_path} is not a folder")


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise ValueError("llama3 eval needs lm-evaluation-harness: pip install 'llama3[eval]'") from None
    import torch

    from llama3.eval.harness import Llama3LM

    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    manager = None
    if args.include_path:  # your own tasks alone first: indexing lm-eval's ~15,000 built-in ones takes seconds
        manager = TaskManager(include_path=args.include_path, include_defaults=False, verbosity="ERROR")
        if not all(t in manager.all_tasks for t in args.task_list):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=args.include_path, verbosity="ERROR")
    unknown = [t for t in args.task_list if t not in manager.all_tasks]
    if unknown:
        where = f" or in {args.include_path}" if args.include_path else " (--include-path adds a folder of your own)"
        raise ValueError(f"--tasks: no task named {', '.join(unknown)} in lm-eval's tasks{where}")
    src = resolve_model_source(args.model)
    log(f"llama3: model {src}")
    t0 = time.perf_counter()
    lm = Llama3LM(
        src,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        quantize=args.quantize,
        batch_size=args.batch_size,
        max_length=args.max_length,
        stride=args.stride,
        add_bos_token=args.add_bos,
        progress=not args.quiet,
    )
    load_s = time.perf_counter() - t0
    m = lm.model
    weights = args.quantize if args.quantize != "none" else f"unquantized {m.tok_embeddings.weight.dtype}"
    log(f"llama3: loaded in {load_s:.1f}s; {weights} weights, {m.tok_embeddings.weight.device}")
    if args.quantize == "none":
        log("llama3: evaluating the unquantized weights (--quantize int4/int8 is faster, but moves the scores)")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=args.task_list,
        num_fewshot=args.num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=bool(args.json),
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
        verbosity="ERROR",
    )
    eval_s = time.perf_counter() - t0
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    log(f"llama3: evaluated in {eval_s:.1f}s")
    if args.json:
        out = {
            "model": str(src),
            "weights": weights,
            "load_seconds": load_s,
            "eval_seconds": eval_s,
            "results": results["results"],
            "n-samples": results.get("n-samples"),
            "configs": results.get("configs"),
            "versions": results.get("versions"),
            "samples": results.get("samples"),
        }
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        log(f"llama3: wrote {args.json}")
    return 0
