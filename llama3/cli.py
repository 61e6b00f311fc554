"""The `llama3` command: `generate` streams a completion, `chat` holds a conversation in the terminal,
`quantize` writes an int8/int4 checkpoint, `perplexity` scores a text, `guard` classifies conversations with
Llama Guard (and `--guard SRC` screens what `chat` and `generate --chat` are asked and answer).

Parsing and checking the arguments needs no torch (`llama3 --help` answers at once); the model and
torch are imported only when a command runs. Exit codes: 0 done, 1 bad input or a failed load (one
line on stderr), 2 bad arguments (argparse's), 130 interrupted (Ctrl-C), 141 output pipe closed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from llama3 import __version__
from llama3.config import ParamError, SamplingParams, check_seed, parse_jsonl

GUARD_HELP = (
    "a Llama Guard checkpoint (e.g. meta-llama/Meta-Llama-Guard-2-8B) that screens each user message before the "
    "model sees it and each answer before it is shown"
)
DEFAULT_MODEL_HELP = "a local dir, .gguf file or Hugging Face repo id (default: the embedded SmolLM2-135M-Instruct)"
GROUP_SIZES = (32, 64, 128, 256)  # llama3.quantize.GROUP_SIZES, not imported: it would import torch for --help
# The library's parameter names (ParamError.param) and the flags that set them: an error names what was typed.
PARAM_FLAGS = {
    "temperature": "--temperature/-t",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
    "max_new_tokens": "--max-new-tokens/-n",
    "max_seq_len": "--max-seq-len/-c",
    "speculate_k": "--speculate-k",
    "prompt_lookup": "--prompt-lookup",
    "max_length": "--max-length",
    "stride": "--stride",
    "group_size": "--group-size",
}
CHAT_COMMANDS = {
    "/help": "show these commands",
    "/reset": "forget the conversation (keeps --system)",
    "/exit": "quit (also /quit, Ctrl-D)",
}


def _add_load_args(p: argparse.ArgumentParser, model_help: str = DEFAULT_MODEL_HELP) -> None:
    p.add_argument("--model", "-m", help=model_help)
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16 (float32 for GGUF files)"
    )
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="kernel implementation (default: %(default)s)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "int4", "none"],
        help="store the projections as int8 (per channel) or int4 (per group) weights, run with bfloat16 "
        "activations (CPU); default: int4 for the embedded model on the CPU (its own 4-bit codes), else none",
    )
    p.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES, help="int4 group size (default: 32)")
    p.add_argument("--keep-output", action="store_true", help="with --quantize: leave the output projection float")
    p.add_argument("--quiet", "-q", action="store_true", help="no model/progress/speed messages on stderr")


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for the model's matmuls (default: PyTorch's, one per core; OMP_NUM_THREADS sets it too). "
        "On a machine busy with other work, --threads 1 can be several times faster",
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
    p.add_argument("--temperature", "-t", type=float, default=0.6, help="0 is greedy (default: %(default)s)")
    p.add_argument(
        "--top-p",
        type=float,
        default=0.9,
        help="nucleus sampling: keep the likeliest tokens up to this mass (default: %(default)s)",
    )
    p.add_argument("--top-k", type=int, default=None, help="keep only the K most likely tokens (default: all)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama3",
        description="Llama 3 in pure PyTorch.",
        epilog="python -m llama3 works the same. 'llama3 COMMAND --help' shows each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"llama3 {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{generate,chat,quantize,perplexity,guard,finetune,serve}"
    )
    gen = sub.add_parser("generate", help="stream a completion of PROMPT to stdout")
    gen.add_argument(
        "prompt", nargs="?", help="the text to continue; '-' or omitted with piped input: read it from stdin"
    )
    gen.add_argument("--file", "-f", metavar="FILE", help="read the prompt from FILE ('-': stdin)")
    gen.add_argument(
        "--unconditional",
        action="store_true",
        help="no prompt: generate from the begin-of-text token alone (an empty prompt is refused otherwise)",
    )
    gen.add_argument("--chat", action="store_true", help="send PROMPT as a user message in the chat format")
    gen.add_argument("--system", help="system message (implies --chat)")
    gen.add_argument(
        "--json", action="store_true", help="print one JSON object (text, tokens, finish reason, timings), no stream"
    )
    _add_model_args(gen, max_new_tokens=256)
    gen.add_argument("--guard", metavar="SRC", help=GUARD_HELP + " (with --chat)")
    gen.set_defaults(parser=gen)  # argument errors print the usage of the command at hand
    chat = sub.add_parser("chat", help="an interactive chat (/help lists its commands)")
    chat.add_argument("--system", help="system message")
    _add_model_args(chat, max_new_tokens=512)
    chat.add_argument("--guard", metavar="SRC", help=GUARD_HELP)
    chat.set_defaults(parser=chat)
    quant = sub.add_parser(
        "quantize", help="write a checkpoint with int8/int4 weights that loads without re-quantizing"
    )
    quant.add_argument("--model", "-m", required=True, help="a local dir or Hugging Face repo id (safetensors or Meta)")
    quant.add_argument("--mode", choices=["int8", "int4"], required=True)
    quant.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES, help="int4 group size (default: 32)")
    quant.add_argument("--keep-output", action="store_true", help="leave the output projection float")
    quant.add_argument("--output", "-o", required=True, help="the directory to write")
    quant.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    quant.set_defaults(parser=quant)
    ppl = sub.add_parser("perplexity", help="perplexity of a model on a text file (strided sliding window)")
    ppl.add_argument("file", help="a UTF-8 text file, or '-' for stdin")
    _add_load_args(ppl)
    ppl.add_argument("--max-length", type=int, default=512, metavar="N", help="window length (default: 512)")
    ppl.add_argument("--stride", type=int, default=256, metavar="N", help="window step (default: 256)")
    ppl.add_argument("--bos", action="store_true", help="begin the text with the bos token")
    ppl.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _add_threads_arg(ppl)
    ppl.set_defaults(parser=ppl, max_seq_len=None)
    guard = sub.add_parser(
        "guard", help="classify conversations with Llama Guard: one JSON verdict a line (safe, categories, score)"
    )
    guard.add_argument(
        "file",
        nargs="?",
        default="-",
        help="a conversation as JSON (a list of {role, content} messages), or JSONL (one conversation a line) for "
        "a batch; '-' or omitted: stdin",
    )
    _add_load_args(guard, model_help="a Llama Guard checkpoint, e.g. meta-llama/Llama-Guard-3-1B (required)")
    guard.add_argument("--version", type=int, choices=[2, 3], help="Llama Guard 2 or 3 (default: from the checkpoint)")
    guard.add_argument("--batch-size", type=int, default=8, metavar="N", help="conversations per batch (default: 8)")
    _add_threads_arg(guard)
    guard.set_defaults(parser=guard, max_seq_len=None)
    _add_finetune_parser(sub)
    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub) -> None:
    sv = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (needs the serve extra: pip install 'llama3[serve]')"
    )
    _add_load_args(sv)
    sv.add_argument("--adapter", metavar="DIR", help="apply a LoRA adapter (llama3 finetune's or PEFT's)")
    sv.add_argument("--chat-template", choices=["auto", "builtin", "jinja"], default="auto", help="(default: auto)")
    sv.add_argument("--host", default="127.0.0.1", help="the address to bind (default: %(default)s, this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    sv.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="requests decoded together (default: 8)")
    sv.add_argument(
        "--max-seq-len",
        "-c",
        type=int,
        metavar="L",
        help="prompt + answer tokens per request (default: the model's context, at most 2048)",
    )
    sv.add_argument("--max-queue", type=int, default=64, metavar="N", help="waiting requests before HTTP 429 (64)")
    sv.add_argument("--prefill-chunk", type=int, default=512, metavar="N", help="prompt tokens per step (512)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: env LLAMA3_API_KEY, else none)")
    sv.add_argument("--served-model-name", metavar="NAME", help="the model name clients send (default: from --model)")
    sv.add_argument("--guard", metavar="SRC", help="a Llama Guard checkpoint that screens each request's last message")
    sv.set_defaults(parser=sv)


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


def _require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *flags: str) -> None:
    """Each of `flags` (attribute names) that is set must be >= 1; the error names the flag as typed."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"argument --{flag.replace('_', '-')}: must be >= 1, got {value}")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every option checked before the model loads, each error naming the flag the user typed."""
    if args.command == "quantize":
        return
    if args.command == "finetune":
        _require_positive(parser, args, "lora_rank", "batch_size", "grad_accum", "max_steps", "epochs",
                          "logging_steps", "eval_steps", "save_steps")  # fmt: skip
        if args.max_seq_len < 2:
            parser.error(f"argument --max-seq-len: must be >= 2, got {args.max_seq_len}")
        if not 0 <= args.lora_dropout < 1:
            parser.error(f"argument --lora-dropout: must be in [0, 1), got {args.lora_dropout}")
        return
    if args.command == "serve":
        _require_positive(parser, args, "max_batch_size", "prefill_chunk", "max_seq_len")
        if args.max_queue < 0:
            parser.error(f"argument --max-queue: must be >= 0, got {args.max_queue}")
        if not 0 <= args.port < 65536:
            parser.error(f"argument --port: must be in [0, 65535], got {args.port}")
        return
    _require_positive(parser, args, "threads")
    if args.command == "guard":
        if not args.model:
            parser.error(
                "argument --model/-m: required: a Llama Guard checkpoint, e.g. meta-llama/Meta-Llama-Guard-2-8B"
            )
        _require_positive(parser, args, "batch_size")
        return
    if args.keep_output and args.quantize == "none":
        parser.error("argument --keep-output: needs a quantized model (--quantize int8 or int4), got --quantize none")
    if args.command == "perplexity":
        if args.max_length < 2:
            parser.error(f"argument --max-length: must be >= 2, got {args.max_length}")
        if not 1 <= args.stride <= args.max_length:
            parser.error(f"argument --stride: must be in [1, --max-length], got {args.stride}")
        return
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"argument --top-k: must be >= 1 (omit it to keep all tokens), got {args.top_k}")
    try:
        SamplingParams(args.temperature, args.top_p, args.top_k)
        check_seed(args.seed)
    except ParamError as e:
        parser.error(param_message(e))
    if args.max_new_tokens < -1:
        parser.error(f"argument --max-new-tokens/-n: must be >= 0, or -1 for no limit, got {args.max_new_tokens}")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        parser.error(f"argument --max-seq-len/-c: must be >= 1, got {args.max_seq_len}")
    if any(not s for s in args.stop):
        parser.error("argument --stop: must not be empty")
    _require_positive(parser, args, "speculate_k", "prompt_lookup")
    if args.draft and args.prompt_lookup is not None:
        parser.error("argument --prompt-lookup: not allowed with --draft (one way of guessing at a time)")
    if args.command == "generate":
        if args.guard and not (args.chat or args.system is not None):
            parser.error("argument --guard: screens chat turns; use it with --chat (or --system)")
        if args.prompt is not None and args.file is not None:
            parser.error("give the prompt as PROMPT or with --file, not both")
        if args.unconditional:
            if args.prompt is not None or args.file is not None:
                parser.error("argument --unconditional: generates without a prompt; not allowed with PROMPT or --file")
            if args.chat or args.system is not None:
                parser.error("argument --unconditional: not allowed with --chat or --system (a chat has a message)")
        elif args.prompt is None and args.file is None and sys.stdin.isatty():
            parser.error("a PROMPT is required (or --file FILE, or text piped on stdin)")


def param_message(e: ParamError) -> str:
    """A library ParamError as argparse words it, naming the flag (PARAM_FLAGS), not the Python parameter."""
    return f"argument {PARAM_FLAGS.get(e.param, e.param)}: {e.problem}"


def read_prompt(args: argparse.Namespace) -> str:
    """PROMPT, or the text of --file / stdin without its trailing newlines (as `$(cat FILE)` reads it); an empty
    or blank one is refused unless --unconditional asked for no prompt."""
    if args.unconditional:
        return ""
    if args.prompt is not None and args.prompt != "-":
        prompt, source = args.prompt, "PROMPT"
    else:
        file = args.file if args.file not in (None, "-") else None
        prompt, source = read_text(file).rstrip("\r\n"), file or "stdin"
    if not prompt.strip():
        raise ValueError(
            f"the prompt ({source}) is {'empty' if not prompt else 'only whitespace'}: nothing to continue "
            "(--unconditional generates from the begin-of-text token alone)"
        )
    return prompt


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
    from llama3.checkpoint import default_model

    return default_model()


def quantize_mode(args: argparse.Namespace) -> str | None:
    """--quantize, or for the embedded model on the CPU (its projections are Q4_1) int4 with the file's codes."""
    if args.quantize is not None:
        return None if args.quantize == "none" else args.quantize
    if args.model is None and args.dtype is None:
        from llama3.checkpoint import parse_device

        return "int4" if parse_device(args.device).type == "cpu" else None
    return None


def set_thread_defaults() -> None:
    """GNU OpenMP (PyTorch's CPU build) threads spin-wait between parallel regions; on a machine whose cores
    are busy with other work, a spinning thread holds a core another thread is waiting for, and `generate`
    ran 5-30x slower than with one thread (benchmarks/results/threads-cpu.md). PASSIVE threads sleep instead.
    Read by libgomp when torch loads, so set before torch is imported; the user's own setting wins."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def load(args: argparse.Namespace):
    from llama3.generation import Llama

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    src = resolve_model_source(args.model)
    quantize = quantize_mode(args)
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
    )
    m = llm.model
    load_s = time.perf_counter() - t0
    log(
        f"llama3: loaded in {load_s:.1f}s ({m.args.num_params() / 1e6:.0f}M params, "
        f"{m.tok_embeddings.weight.dtype}{weights_note(m)}, "
        f"{m.tok_embeddings.weight.device}, backend {m.ops.name})"
    )
    if getattr(args, "compile", False):
        log("llama3: --compile: the first decode step compiles the block (seconds; inductor caches it on disk)")
    return llm, log, load_s


def weights_note(model) -> str:
    """ ", int4 weights" when the projections are quantized (asked for, or as the checkpoint stores them)."""
    w2 = model.layers[0].feed_forward.w2
    kind = type(getattr(w2, "base", w2)).__name__  # under a LoRA adapter (--adapter), its frozen base
    return {"Int8Linear": ", int8 weights", "Int4Linear": ", int4 weights"}.get(kind, "")


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
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)


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
    if s.get("drafted"):
        log(f"llama3: {s['accepted']} of {s['drafted']} guesses accepted ({s['acceptance_rate']:.0%})")


def speculation(args: argparse.Namespace, log) -> dict[str, Any]:
    """The speculative-decoding options of `Llama.stream` (--draft, loaded here, or --prompt-lookup)."""
    spec: dict[str, Any] = {"speculate_k": args.speculate_k}
    if args.prompt_lookup is not None:
        return {**spec, "prompt_lookup": args.prompt_lookup}
    if not args.draft:
        return {}
    from llama3.generation import Llama

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


def cmd_generate(args: argparse.Namespace) -> int:
    from llama3.tp import run_on_rank0

    prompt = run_on_rank0(read_prompt, args)  # under torchrun rank 0 reads it (stdin is one), every rank gets it
    llm, log, load_s = load(args)
    spec = speculation(args, log)
    guard = load_guard(args, log) if args.guard else None
    refusal = guard and screen(guard, [{"role": "user", "content": prompt}], "message")
    if refusal:
        sys.stdout.write((json.dumps({"text": "", "refused": refusal}) if args.json else refusal) + "\n")
        return 0
    if args.chat or args.system is not None:
        dialog = [{"role": "system", "content": args.system}] if args.system is not None else []
        tokens = llm.chat_format.encode_dialog_prompt([*dialog, {"role": "user", "content": prompt}])
        extra = {"stop_tokens": llm.chat_stop_tokens}
    else:
        tokens, extra = llm.tokenizer.encode(prompt, bos=True), {}
    n = _budget(llm, len(tokens), args.max_new_tokens)
    _check_draft(spec, len(tokens), n)
    t0 = time.perf_counter()
    out_tokens, pieces = [], []
    for token, text in llm.stream(tokens, n, **_sampling(args), **extra, **spec):
        if token is not None:
            out_tokens.append(token)
        if args.json or guard:  # an answer is screened before any of it is shown
            pieces.append(text)
        elif text:
            sys.stdout.write(text)
            sys.stdout.flush()
    s = llm.last_stats
    answer = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "".join(pieces)}]
    refusal = guard and screen(guard, answer, "answer")
    if guard and not args.json:
        sys.stdout.write(refusal or "".join(pieces))
    if args.json:
        result = {
            "text": "" if refusal else "".join(pieces),
            **({"refused": refusal or None} if guard else {}),
            "tokens": out_tokens,
            "finish_reason": s["finish_reasons"][0],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": len(out_tokens)},
            "timings": {
                "load_s": round(load_s, 4),
                "time_to_first_token_s": round(s["time_to_first_token_s"], 4),
                "tokens_per_second": round(s["tokens_per_second"], 2),
                "total_s": round(time.perf_counter() - t0, 4),
            },
        }
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.json:
        _report(llm, log, args.max_new_tokens)
    return 0


def _fit_history(llm, history: list[dict[str, str]], max_new_tokens: int, log) -> tuple[list[int], int] | None:
    """The prompt for `history` (whose last message is the new one) and the answer's budget, dropping the
    oldest turns (never the system message or the new message) until both fit; None if even that fails."""
    first = 1 if history[0]["role"] == "system" else 0
    need = 1 if max_new_tokens == -1 else max_new_tokens
    dropped = 0
    while len(tokens := llm.chat_format.encode_dialog_prompt(history)) + need > llm.context_length:
        if len(history) - first == 1:
            return None
        del history[first]  # a whole turn: the user's message and the answers that followed it
        dropped += 1
        while history[first]["role"] != "user":
            del history[first]
            dropped += 1
    if dropped:
        log(f"llama3: dropped the {dropped} oldest messages to fit the {llm.context_length}-token context")
    return tokens, _budget(llm, len(tokens), max_new_tokens)


def _chat_help() -> str:
    lines = [f"  {name:<8} {what}" for name, what in CHAT_COMMANDS.items()]
    return "\n".join(["Commands:", *lines, "  //text   send a message that starts with '/'"])


def cmd_chat(args: argparse.Namespace) -> int:
    llm, log, _ = load(args)
    spec = speculation(args, log)
    guard = load_guard(args, log) if args.guard else None
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history: list[dict[str, str]] = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /help lists the commands; Ctrl-C stops an answer.", file=sys.stderr)
    from llama3.tp import rank0_input

    while True:
        try:
            line = rank0_input("> " if interactive else "")  # input(); under torchrun rank 0's, on every rank
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command = text.split()[0]
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                history = list(system)
                log("llama3: history cleared")
            elif command == "/help":
                print(_chat_help(), file=sys.stderr)
            else:
                print(
                    f"llama3: unknown command {command} (/help lists them; //text sends text starting with /)",
                    file=sys.stderr,
                )
            continue
        text = text[1:] if text.startswith("//") else text
        candidate = [*history, {"role": "user", "content": text}]
        fitted = _fit_history(llm, candidate, args.max_new_tokens, log)
        if fitted is None:
            n_msg = len(llm.chat_format.encode_dialog_prompt([*system, candidate[-1]]))
            print(
                f"llama3: message not sent: it takes {n_msg} tokens with the chat format, and the context holds "
                f"{llm.context_length} with {args.max_new_tokens} (-n) kept for the answer",
                file=sys.stderr,
            )
            continue
        tokens, n = fitted
        try:
            _check_draft(spec, len(tokens), n)
        except ValueError as e:
            print(f"llama3: message not sent: {e}", file=sys.stderr)
            continue
        turns = [m for m in candidate if m["role"] != "system"]  # what Llama Guard reads
        refusal = guard and screen(guard, turns, "message")
        if refusal:  # the model never sees it, and it stays out of the history
            print(refusal, flush=True)
            continue
        history = candidate
        reply, interrupted = [], False
        try:
            for _, piece in llm.stream(tokens, n, stop_tokens=llm.chat_stop_tokens, **_sampling(args), **spec):
                reply.append(piece)
                if not guard:  # a guarded answer is shown only once it is screened
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the session
            log("\nllama3: answer stopped")
            interrupted = True
        refusal = guard and screen(guard, [*turns, {"role": "assistant", "content": "".join(reply)}], "answer")
        if refusal:  # neither the question nor the answer stays in the history
            history = history[:-1]
            print(refusal, flush=True)
            continue
        if guard:
            sys.stdout.write("".join(reply))
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
        _report(llm, log, args.max_new_tokens, interrupted)


def load_guard(args: argparse.Namespace, log):
    """The Llama Guard model of --guard, on the chat model's device, dtype and backend."""
    from llama3.generation import Llama

    log(f"llama3: guard {args.guard}")
    return Llama.from_pretrained(
        args.guard, device=args.device, dtype=args.dtype, backend=args.backend, progress=not args.quiet
    )


def screen(guard, conversation: list[dict[str, str]], what: str) -> str | None:
    """None when Llama Guard finds the last message safe, else a one-line refusal naming the categories."""
    from llama3.guard import classify

    result = classify(guard, conversation)
    if result.safe:
        return None
    return f"llama3: refused: the {what} is unsafe ({describe_categories(guard, result.categories)})"


def describe_categories(guard, codes: list[str]) -> str:
    """ "S9: Hate, S1: Violent Crimes" with the names of the checkpoint's own categories."""
    from llama3.guard import GUARD2_CATEGORIES, GUARD3_CATEGORIES, guard_version

    names = GUARD2_CATEGORIES if guard_version(guard) == 2 else GUARD3_CATEGORIES
    described = []
    for code in codes:
        i = int(code[1:]) - 1
        described.append(f"{code}: {names[i].strip().rstrip('.')}" if 0 <= i < len(names) else code)
    return ", ".join(described) or "no category given"


def read_conversations(text: str, source: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """(where, conversation) pairs: one conversation (a JSON list of messages) or many (JSONL, one a line),
    each checked to be a list; `where` names it in errors ("stdin, line 3")."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list) and (not whole or not isinstance(whole[0], list)):
        return [(source, whole)]
    lines = parse_jsonl(text.splitlines(), source)
    if not lines:
        raise ValueError(f"{source}: no conversation (a JSON list of messages, or one such list a line)")
    for number, conversation in lines:
        if not isinstance(conversation, list):
            kind = type(conversation).__name__
            raise ValueError(f"{source}, line {number}: a conversation is a list of messages, got {kind}")
    return [(f"{source}, line {number}", conversation) for number, conversation in lines]


def cmd_guard(args: argparse.Namespace) -> int:
    from llama3.guard import classify_batch, format_prompt

    source = "stdin" if args.file == "-" else args.file
    conversations = read_conversations(read_text(None if args.file == "-" else args.file), source)
    for where, conversation in conversations:  # every one checked before the model loads
        try:
            format_prompt(conversation)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    llm, log, _ = load(args)
    for start in range(0, len(conversations), args.batch_size):
        batch = [conversation for _, conversation in conversations[start : start + args.batch_size]]
        for result in classify_batch(llm, batch, version=args.version):
            verdict = {"safe": result.safe, "categories": result.categories, "score": round(result.score, 6)}
            sys.stdout.write(json.dumps(verdict) + "\n")
        sys.stdout.flush()
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from llama3.checkpoint import save_quantized

    t0 = time.perf_counter()
    out = save_quantized(args.model, args.output, args.mode, args.group_size, not args.quiet, args.keep_output)
    if not args.quiet:
        size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors")) / 1e6
        print(f"llama3: wrote {out} ({args.mode}, {size:.0f} MB) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from llama3.perplexity import perplexity

    text = read_text(None if args.file == "-" else args.file)
    source = "stdin" if args.file == "-" else args.file
    llm, log, _ = load(args)
    tokens = llm.tokenizer.encode(text, bos=args.bos)
    if len(tokens) < 2:
        raise ValueError(f"{source}: {len(tokens)} tokens; perplexity needs at least 2 (the first is only context)")
    max_length = args.max_length  # longer than the model's context: refused by perplexity(), named as the flag
    r = perplexity(llm.model, tokens, max_length, args.stride, progress=not args.quiet)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['perplexity']:.4f}")
        log(f"llama3: over {r['scored_tokens']} tokens, {r['windows']} windows of {max_length}, stride {r['stride']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util
    import logging

    missing = [m for m in ("starlette", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"llama3 serve needs {', '.join(missing)}: pip install 'llama3[serve]'")
    from llama3.serve import bind, create_app, run

    sock = bind(args.host, args.port)  # first: a busy port is one line, before minutes of loading
    try:
        llm, log, _ = load(args)
        guard = load_guard(args, log) if args.guard else None
        if guard is not None:
            check_guard(guard, args.guard)
        if not args.quiet:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        name = args.served_model_name or (
            Path(args.model).name if args.model and os.path.exists(args.model) else args.model
        )
        app = create_app(
            llm,
            model_name=name or "SmolLM2-135M-Instruct",
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            max_seq_len=args.max_seq_len,
            prefill_chunk=args.prefill_chunk,
            api_key=args.api_key,
            guard=guard,
        )
        engine = app.state.engine
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        log(
            f"llama3: serving '{name or 'SmolLM2-135M-Instruct'}' on http://{host}:{port}/v1 "
            f"({engine.max_batch_size} rows of {engine.max_seq_len} tokens)"
        )
        run(app, log_level="warning" if args.quiet else "info", sock=sock)
    finally:
        sock.close()
    return 0


def check_guard(guard, source: str) -> None:
    """A --guard model that cannot give a Llama Guard verdict is refused at start, not at each request: it
    classifies one harmless message, the check `classify` makes of every verdict."""
    from llama3.guard import classify

    try:
        classify(guard, [{"role": "user", "content": "Hello"}])
    except ValueError as e:
        raise ValueError(f"--guard {source}: not a Llama Guard model ({e})") from None


def cmd_finetune(args: argparse.Namespace) -> int:
    from llama3.finetune import TrainConfig, finetune

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


def start_world(args: argparse.Namespace) -> None:
    """Under torchrun (WORLD_SIZE > 1): the process group of the tensor-parallel ranks, started before any input
    is read; rank 0 alone reads input and prints (the other ranks' stdout and messages are silenced)."""
    if args.command not in ("generate", "chat"):
        raise ValueError(f"'llama3 {args.command}' does not run under torchrun; generate and chat do")
    from llama3.checkpoint import parse_device
    from llama3.tp import TensorParallel, rank

    TensorParallel.from_environment(parse_device(args.device))
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")  # for the life of the process
        args.quiet = True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args.parser, args)
    if args.command in ("generate", "chat", "perplexity", "guard"):
        set_thread_defaults()
    world = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        if world:
            start_world(args)
        commands = {
            "generate": cmd_generate,
            "chat": cmd_chat,
            "quantize": cmd_quantize,
            "perplexity": cmd_perplexity,
            "guard": cmd_guard,
            "finetune": cmd_finetune,
            "serve": cmd_serve,
        }
        return commands[args.command](args)
    except ParamError as e:  # a setting the model refuses (e.g. longer than its context): named as its flag
        if e.param not in PARAM_FLAGS:
            print(f"llama3: error{_rank_note(world)}: {e}", file=sys.stderr)
            return 1
        print(f"llama3 {args.command}: error{_rank_note(world)}: {param_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nllama3: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it: a script can tell an interrupted run from a finished one
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE
    except (ValueError, OSError, RuntimeError) as e:  # bad input, a failed load: one line, no traceback
        print(f"llama3: error{_rank_note(world)}: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print(
            "llama3: error: out of memory (a smaller model, --dtype bfloat16 or a smaller --max-seq-len)",
            file=sys.stderr,
        )
        return 1
    finally:
        if world:  # a rank that ends, by an error too, leaves the group: the others fail at once, not at a timeout
            from llama3.tp import shutdown

            shutdown()


def _rank_note(world: bool) -> str:
    """ " (rank 2)" for messages of a torchrun rank other than 0; every rank reports its own failure."""
    if not world:
        return ""
    from llama3.tp import rank

    return f" (rank {rank()})" if rank() else ""


if __name__ == "__main__":
    sys.exit(main())
