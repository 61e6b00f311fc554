"""`llama3 bench`: prompt processing (ppN) and generation (tgN) rates over a grid, a llama-bench table on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama3.cli.common import DEFAULT_MODEL_HELP, GROUP_SIZES, KERNELS, resolve_model_source

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("auto", "none", "int8", "int4")
SYSTEMS = ("transformers", "llama.cpp", "floor")  # llama3.eval.bench_systems.SYSTEMS, not imported: it imports torch


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return values


def _choice_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = text.split(",")
        bad = [v for v in values if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(choices)}")
        return values

    return parse


def _add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="prompt processing and generation speed over a grid (a llama-bench table)",
        description="Times prompt processing (ppN: a prefill of N tokens) and text generation (tgN: N decode "
        "steps) for every combination of the lists given, each the median of --repetitions runs after a "
        "warm-up, with its spread. Markdown on stdout, progress on stderr.",
    )
    p.add_argument(
        "--model",
        "-m",
        help=DEFAULT_MODEL_HELP + "; or random:PRESET, a preset's shape (llama-3-8b, llama-3-155m, ...) with random "
        "weights made on the device",
    )
    p.add_argument("-p", "--n-prompt", type=_int_list, default=[512], metavar="N[,N]",
                   help="prompt lengths to time (ppN; 0: none; default: 512)")  # fmt: skip
    p.add_argument("-n", "--n-gen", type=_int_list, default=[128], metavar="N[,N]",
                   help="generation lengths to time (tgN; 0: none; default: 128)")  # fmt: skip
    p.add_argument("-b", "--batch-size", type=_int_list, default=[1], metavar="N[,N]", help="rows (default: 1)")
    p.add_argument("-r", "--repetitions", type=int, default=3, metavar="N", help="timed runs per test (default: 3)")
    p.add_argument(
        "-t", "--threads", type=_int_list, metavar="N[,N]", help="CPU threads (default: PyTorch's, one per core)"
    )
    p.add_argument(
        "--dtype",
        type=_choice_list(DTYPES),
        metavar="{float32,bfloat16,float16}[,...]",
        help="activation/weight dtypes (default: the checkpoint's: float32 for GGUF, else bfloat16)",
    )
    p.add_argument(
        "--quantize",
        type=_choice_list(QUANTIZE),
        metavar="{auto,none,int8,int4}[,...]",
        help="weight quantization (default: auto, as `llama3 generate` loads: a GGUF file on the CPU through the "
        "kernels measured fastest here; anything else float)",
    )
    p.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES, help="int4 group size (default: 32)")
    p.add_argument(
        "--kernel",
        type=_choice_list(KERNELS),
        metavar="{" + ",".join(KERNELS) + "}[,...]",
        help="CPU kernel plans to time side by side (default: the one measured fastest here)",
    )
    p.add_argument(
        "--backend",
        type=_choice_list(("auto", "torch", "triton")),
        default=["auto"],
        metavar="{auto,torch,triton}[,...]",
        help="kernel implementation (default: auto)",
    )
    p.add_argument("--compile", action="store_true", help="CPU: decode through a torch.compile'd block")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument(
        "--compare",
        metavar="transformers,llama.cpp,floor",
        help="also time these systems on the same source, prompts and grid, taking turns with ours; prints the "
        "ratios (one not installed is skipped with a line saying so). floor: every weight once through our "
        "kernels per token, nothing else (tgN, batch 1)",
    )
    p.add_argument("--json", metavar="FILE", help="write every row and the header as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the grid as a bar chart (needs matplotlib)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(parser=p)


def check_bench_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, values in (("-p/--n-prompt", args.n_prompt), ("-n/--n-gen", args.n_gen)):
        if any(v < 0 for v in values):
            parser.error(f"argument {flag}: must be >= 0, got {','.join(map(str, values))}")
    if not any(args.n_prompt) and not any(args.n_gen):
        parser.error("argument -p/-n: nothing to time (both are 0)")
    for flag, values in (("-b/--batch-size", args.batch_size), ("-t/--threads", args.threads or [])):
        if any(v < 1 for v in values):
            parser.error(f"argument {flag}: must be >= 1, got {','.join(map(str, values))}")
    if args.repetitions < 1:
        parser.error(f"argument -r/--repetitions: must be >= 1, got {args.repetitions}")
    args.compare_list = [s.strip() for s in args.compare.split(",")] if args.compare else []
    bad = [s for s in args.compare_list if s not in SYSTEMS]
    if bad:
        parser.error(f"argument --compare: {bad[0]!r} is not one of {', '.join(SYSTEMS)}")
    if args.plot and not args.plot.lower().endswith(".png"):
        parser.error(f"argument --plot: expected a .png file name, got {args.plot}")


def cmd_bench(args: argparse.Namespace) -> int:
    from llama3.cli.common import quantize_mode
    from llama3.eval.bench import Config, Grid, run_bench
    from llama3.eval.bench_report import markdown, plot

    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'llama3[plot]'") from None
    src = resolve_model_source(args.model)
    if args.quantize is None:  # the CLI's default: what `llama3 generate` would run
        probe = argparse.Namespace(quantize=None, model=args.model, dtype=args.dtype and args.dtype[0],
                                   device=args.device)  # fmt: skip
        quantizes = [quantize_mode(probe, auto=True)]
    else:
        quantizes = [None if q == "none" else q for q in args.quantize]
    configs, skipped = [], []
    for q in quantizes:
        for dtype in args.dtype or [None]:
            if q in ("int8", "int4") and dtype == "float32" and (args.device or "cpu").startswith("cpu"):
                # PyTorch's CPU int4 kernel takes its scales in the activation dtype and refuses float32
                skipped.append(f"--quantize {q} with --dtype float32: quantized weights run bfloat16 activations")
                continue
            for backend in args.backend:
                for kernel in args.kernel or [None]:
                    configs.append(Config(dtype, q, backend, args.compile, args.group_size, kernel))
    if not configs:
        raise ValueError(f"nothing to time: {skipped[0]}")
    grid = Grid(
        prompt_lens=args.n_prompt,
        gen_lens=args.n_gen,
        batch_sizes=args.batch_size,
        threads=args.threads or [None],
        repetitions=args.repetitions,
    )
    result = run_bench(src, configs, grid, device=args.device, compare=args.compare_list, log=log)
    result["skipped"] = skipped + result["skipped"]
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        log(f"llama3 bench: wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        log(f"llama3 bench: drew {args.plot}")
    return 0
