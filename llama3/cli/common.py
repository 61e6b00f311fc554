from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from llama3.checks import ParamError
from llama3.generate.params import KNOBS, SamplingParams

DEFAULT_MODEL_HELP = "a local dir, .gguf file or Hugging Face repo id (default: the embedded SmolLM2-135M-Instruct)"


GROUP_SIZES = (32, 64, 128, 256)  # llama3.quantize.GROUP_SIZES, not imported: it would import torch for --help


KERNELS = ("int4", "int4-fbgemm", "int8", "int4-dot", "fbgemm")  # llama3.quant.choice.KERNELS, not imported (torch)


# The library's parameter names (ParamError.param) and the flags that set them: an error names what was typed.
PARAM_FLAGS = {
    **{f.name: f.metadata["flag"] for f in dataclasses.fields(SamplingParams)},
    "seed": "--seed",
    "max_new_tokens": "--max-new-tokens/-n",
    "max_seq_len": "--max-seq-len/-c",
    "speculate_k": "--speculate-k",
    "prompt_lookup": "--prompt-lookup",
    "max_length": "--max-length",
    "stride": "--stride",
    "group_size": "--group-size",
}


def _add_load_args(p: argparse.ArgumentParser, model_help: str = DEFAULT_MODEL_HELP) -> None:
    p.add_argument("--model", "-m", help=model_help)
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16 (float32 for GGUF files)"
    )
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "cpu", "triton"],
        default="auto",
        help="kernel implementation (default: %(default)s)",
    )
    p.add_argument(
        "--quantize",
        choices=["auto", "int8", "int4", "none"],
        help="store the projections as int8 (per channel) or int4 (per group) weights, run with bfloat16 "
        "activations (CPU); auto (the default without --dtype): a GGUF file on the CPU runs the quantized kernels "
        "measured fastest on this CPU among those within 1%% of float32's perplexity, anything else stays float",
    )
    p.add_argument(
        "--kernel",
        choices=["auto", *KERNELS],
        help="force the CPU's quantized kernels: int4 (4-bit projections, int8 output), int4-fbgemm (the output "
        "on fbgemm's dynamic int8), int8, int4-dot (both on llama3's integer dot products, compiled on first use "
        "with the C compiler), fbgemm (every projection on fbgemm, float32 activations: fastest, perplexity "
        "+3.4%%); default: auto, measured once per machine",
    )
    p.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES, help="int4 group size (default: 32)")
    p.add_argument("--keep-output", action="store_true", help="with --quantize: leave the output projection float")
    p.add_argument("--quiet", "-q", action="store_true", help="no model/progress/speed messages on stderr")
    p.add_argument("--verbose", "-v", action="store_true", help="also say which kernels run and why (CPU, timings)")


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for the model's matmuls (default: one per core, or only the CPUs no other process is "
        "using at start; OMP_NUM_THREADS sets it too)",
    )


def _add_model_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    _add_load_args(p)
    _add_threads_arg(p)
    p.add_argument(
        "--adapter", metavar="DIR", help="apply a LoRA adapter (llama3 finetune's or PEFT's) without merging"
    )
    p.add_argument(
        "--max-seq-len",
        "-c",
        type=int,
        metavar="N",
        help="context size: the most tokens (prompt + answer) the KV cache holds (default: the model's context)",
    )
    p.add_argument(
        "--max-new-tokens",
        "-n",
        type=int,
        default=max_new_tokens,
        metavar="N",
        help="the most tokens to generate; -1: until a stop or the context is full (default: %(default)s)",
    )
    for f in dataclasses.fields(SamplingParams):  # one flag per knob, as the knob describes it
        cli = dict(f.metadata["cli"])
        default = cli.pop("default", f.default)
        help = f.metadata["help"] if default in (None, ()) else f"{f.metadata['help']} (default: %(default)s)"
        kind = _flag_type(cli.pop("type")) if "type" in cli else int if f.type in ("int", "int | None") else float
        p.add_argument(*f.metadata["flag"].split("/"), type=kind, default=default, help=help, **cli)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STRING",
        help="end the answer before this text (repeatable; e.g. --stop $'\\n\\n')",
    )
    p.add_argument(
        "--draft",
        metavar="SRC",
        help="speculative decoding: a smaller model with the same vocabulary guesses, the model checks "
        "(e.g. meta-llama/Llama-3.2-1B-Instruct for 3.1-8B); loaded with the model's --device/--dtype/--backend/"
        "--quantize; same output distribution (same tokens when greedy); one prompt at a time",
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="N",
        help="speculative decoding without a draft: guesses copied from where the last N (down to 1) tokens "
        "occurred in the prompt or the answer so far (editing, summarising, code)",
    )
    p.add_argument(
        "--json-schema",
        metavar="FILE",
        help="structured output: the answer is JSON valid against this JSON Schema (grammar-constrained decoding; "
        "needs the json extra), cut only by --max-new-tokens",
    )
    p.add_argument(
        "--speculate-k", type=int, default=4, metavar="K", help="guesses per step with --draft or --prompt-lookup (4)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="CPU: decode through a torch.compile'd block, about 2x the tokens/s of a quantized model after a "
        "compile of some seconds (more on the very first run, before inductor's cache holds it); pays off for "
        "long answers and chats",
    )
    p.add_argument(
        "--chat-template",
        choices=["auto", "builtin", "jinja"],
        default="auto",
        help="the checkpoint's own Jinja template (jinja), the hand-written Llama 3 / ChatML format (builtin), or "
        "auto: the hand-written one where it equals the checkpoint's template (default: %(default)s)",
    )


def _flag_type(parse):
    """A knob's own parser for argparse: its ValueError's message becomes argparse's (naming the flag)."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *flags: str) -> None:
    """Each of `flags` (attribute names) that is set must be >= 1; the error names the flag as typed."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"argument --{flag.replace('_', '-')}: must be >= 1, got {value}")


def param_message(e: ParamError) -> str:
    """A library ParamError as argparse words it, naming the flag (PARAM_FLAGS), not the Python parameter."""
    return f"argument {PARAM_FLAGS.get(e.param, e.param)}: {e.problem}"


def read_text(source: str | None) -> str:
    """The UTF-8 text of the file `source`, or of stdin when None."""
    try:
        text = Path(source).read_text(encoding="utf-8") if source else sys.stdin.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{source or 'stdin'} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"cannot read {source}: {e.strerror}") from None
    return text


def resolve_model_source(model: str | None) -> str | Path:
    if model:
        return model
    from llama3.weights.hub import default_model

    return default_model()


def quantize_mode(args: argparse.Namespace, auto: bool = False) -> str | None:
    """--quantize; by default "auto" where `auto` (the library then quantizes a GGUF file on the CPU and leaves
    anything else float), else (fine-tuning) int4 with the file's codes for the embedded model on the CPU."""
    if args.quantize is not None:
        return None if args.quantize == "none" else args.quantize
    if auto:
        return "auto" if args.dtype is None or getattr(args, "kernel", None) not in (None, "auto") else None
    if args.model is None and args.dtype is None:
        from llama3.weights.hub import parse_device

        return "int4" if parse_device(args.device).type == "cpu" else None
    return None


# How long GNU OpenMP's threads spin between parallel regions before they sleep (libgomp's default: 300,000)
SPIN_COUNT = "10000"


def set_thread_defaults(threads: bool = True) -> None:
    """Thread settings that hold up on a quiet and on a busy machine (benchmarks/bench_threads.py,
    benchmarks/results/threads-cpu.md), set before torch (and GNU OpenMP, which reads them once) loads.

    GNU OpenMP's threads spin-wait between parallel regions. On a quiet machine that is the speed of a decode step,
    whose operations are tens of microseconds apart: sleeping at once (OMP_WAIT_POLICY=PASSIVE) cost the embedded
    SmolLM2 46 against 121 tok/s. A short spin, GOMP_SPINCOUNT=10000, keeps that speed (117). On a machine whose CPUs
    are busy with other work, a spinning thread holds a CPU another thread waits for, and a parallel region waits for
    whichever of its threads lost its CPU: libgomp's own spin decoded at 6.5 tok/s against one thread's 44. So where
    other processes are running now (`busy_cpus`), threads sleep at once and, with `threads`, take only the idle
    CPUs, at least one. The user's own OMP_WAIT_POLICY, GOMP_SPINCOUNT, OMP_NUM_THREADS and --threads win."""
    if "torch" in sys.modules:
        return
    idle = (os.cpu_count() or 1) - busy_cpus()  # the machine's CPUs (a container's view may have fewer)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads and idle < cores and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, idle))
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    try:
        wanted = int(os.environ.get("OMP_NUM_THREADS", "").partition(",")[0])
    except ValueError:
        wanted = cores
    if idle < wanted:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def busy_cpus() -> int:
    """How many threads of other processes are running now (Linux: /proc/loadavg's runnable count, its fourth field,
    less this process's own running threads; the least of three reads 2 ms apart, so that a thread running for an
    instant is not counted); 0 where the system does not say. Unlike the load average it does not lag a minute
    behind."""
    counts = []
    try:
        for i in range(3):
            if i:
                time.sleep(0.002)
            running = int(Path("/proc/loadavg").read_text().split()[3].partition("/")[0])
            own = sum(_running(task) for task in Path("/proc/self/task").iterdir())
            counts.append(running - own)
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, min(counts))


def _running(task: Path) -> bool:
    try:
        return (task / "stat").read_text().rpartition(")")[2].split()[0] == "R"  # after "(comm)": the state
    except (OSError, IndexError):  # the thread ended
        return False


def load(args: argparse.Namespace):
    from llama3.generate.llama import Llama

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    src = resolve_model_source(args.model)
    quantize = quantize_mode(args, auto=True)
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"llama3: model {src}")
    t0 = time.perf_counter()
    llm = Llama.from_pretrained(
        src,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        progress=not args.quiet,
        max_seq_len=args.max_seq_len,
        quantize=quantize,
        group_size=args.group_size,
        keep_output=args.keep_output,
        chat_template=getattr(args, "chat_template", "auto"),
        adapter=getattr(args, "adapter", None),
        compile=getattr(args, "compile", False),
        kernel=getattr(args, "kernel", None),
    )
    m = llm.model
    load_s = time.perf_counter() - t0
    log(
        f"llama3: loaded in {load_s:.1f}s ({m.args.num_params() / 1e6:.0f}M params, "
        f"{m.tok_embeddings.weight.dtype}{weights_note(m)}, "
        f"{m.tok_embeddings.weight.device}, backend {m.ops.name})"
    )
    if getattr(args, "verbose", False):
        log(kernel_note(m))
    if getattr(args, "compile", False):
        log("llama3: --compile: the first decode step compiles the block (seconds; inductor caches it on disk)")
    return llm, log, load_s


def weights_note(model) -> str:
    """ ", int4 weights" when the projections are quantized (asked for, or as the checkpoint stores them)."""
    w2 = model.layers[0].feed_forward.w2
    w2 = getattr(w2, "base", w2)  # under a LoRA adapter (--adapter), its frozen base
    kind = type(w2).__name__
    note = {"Int8Linear": ", int8 weights", "Int4Linear": ", int4 weights", "DynInt8Linear": ", int8 weights"}
    if kind == "DotLinear":
        note[kind] = f", {w2.mode} weights"
    choice = getattr(model, "kernel_choice", None)
    return note.get(kind, "") + (f", kernel {choice.plan}" if choice else "")


def kernel_note(model) -> str:
    """-v: the CPU, its instruction sets, and which kernels run and why (the measured times per call)."""
    from llama3.quant import isa

    choice = getattr(model, "kernel_choice", None)
    if choice is None:
        what = "quantized as asked" if weights_note(model) else "float weights (no quantized kernel)"
        return f"llama3: {what}; CPU {isa.describe()}"
    return f"llama3: {choice.describe()}; CPU {isa.describe()}"


def _budget(llm, n_prompt: int, max_new_tokens: int) -> int:
    """The tokens an answer may take: -n, or with -1 whatever the context has left after the prompt."""
    room = llm.context_length - n_prompt
    if room < (1 if max_new_tokens == -1 else max_new_tokens):
        raise ValueError(
            f"the prompt is {n_prompt} tokens and the context holds {llm.context_length}: no room for "
            + ("an answer" if max_new_tokens == -1 else f"{max_new_tokens} new tokens (-n)")
            + " (a shorter prompt, a smaller -n, or a larger --max-seq-len)"
        )
    return room if max_new_tokens == -1 else max_new_tokens


def _check_draft(spec: dict[str, Any], n_prompt: int, n: int) -> None:
    """The --draft model reads the prompt and the answer too: both must fit its context (it may be shorter)."""
    draft = spec.get("draft")
    if draft is not None and n_prompt + n > draft.context_length:
        raise ValueError(
            f"the prompt ({n_prompt} tokens) and {n} new tokens do not fit the --draft model's context of "
            f"{draft.context_length} tokens (a shorter prompt or a smaller -n)"
        )


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    schema = {"json_schema": read_json_schema(args.json_schema)} if getattr(args, "json_schema", None) else {}
    return dict(**{k: getattr(args, k) for k in KNOBS}, seed=args.seed, stop=args.stop, **schema)


def read_json_schema(file: str) -> dict[str, Any]:
    """--json-schema FILE's schema, checked; ValueError names the file and what is wrong with it."""
    from llama3.generate.grammar import check_json_schema

    try:
        return json.loads(check_json_schema(read_text(file)))
    except ParamError as e:
        raise ValueError(f"--json-schema {file}: {e.problem.removeprefix('json_schema ')}") from None


def _report(llm, log, max_new_tokens: int, interrupted: bool = False) -> None:
    """Speed, and a marker when the answer did not end by itself: which limit cut it (-n N or the context), or
    that it was interrupted."""
    s = llm.last_stats
    if not s:
        return
    if interrupted:
        log("llama3: [stopped: interrupted]")
    elif s.get("finish_reasons") == ["length"]:
        if max_new_tokens == -1:  # -n -1: the answer took all the room the context had left
            log(f"llama3: [stopped: the context is full (--max-seq-len {llm.context_length})]")
        else:
            log(f"llama3: [stopped at the -n {max_new_tokens} limit; a larger -n raises it]")
    log(
        f"llama3: {s['decode_steps']} tokens, first after {s['time_to_first_token_s'] * 1000:.0f} ms, "
        f"{s['tokens_per_second']:.1f} tokens/s"
    )
    if s.get("cached_prompt_tokens"):
        log(f"llama3: {s['cached_prompt_tokens']} prompt tokens from the prefix cache")
    if s.get("drafted"):
        log(f"llama3: {s['accepted']} of {s['drafted']} guesses accepted ({s['acceptance_rate']:.0%})")


def speculation(args: argparse.Namespace, log) -> dict[str, Any]:
    """The speculative-decoding options of `Llama.stream` (--draft, loaded here, or --prompt-lookup)."""
    spec: dict[str, Any] = {"speculate_k": args.speculate_k}
    if args.prompt_lookup is not None:
        return {**spec, "prompt_lookup": args.prompt_lookup}
    if not args.draft:
        return {}
    from llama3.generate.llama import Llama

    log(f"llama3: draft {args.draft}")
    quantize = None if args.quantize in (None, "none") else args.quantize
    draft = Llama.from_pretrained(
        args.draft,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        progress=not args.quiet,
        quantize=quantize,
        group_size=args.group_size,
    )
    return {**spec, "draft": draft}
