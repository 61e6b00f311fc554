"""The `llama3` command: `generate` streams a completion, `chat` holds a conversation in the terminal,
`quantize` writes an int8/int4 checkpoint, `perplexity` scores a text, `guard` classifies conversations with
Llama Guard (and `--guard SRC` screens what `chat` and `generate --chat` are asked and answer), `inspect` draws
a layer's attention or the logit lens of a prompt, `bench` times prompt processing and generation, `eval`
scores lm-evaluation-harness tasks.

Parsing and checking the arguments needs no torch (`llama3 --help` answers at once); the model and
torch are imported only when a command runs. Exit codes: 0 done, 1 bad input or a failed load (one
line on stderr), 2 bad arguments (argparse's), 130 interrupted (Ctrl-C), 141 output pipe closed.
"""

from __future__ import annotations

import argparse
import os
import sys

from llama3 import __version__
from llama3.checks import ParamError
from llama3.cli.bench import _add_bench_parser, check_bench_args, cmd_bench
from llama3.cli.chat import cmd_chat
from llama3.cli.common import (
    GROUP_SIZES,
    PARAM_FLAGS,
    _add_load_args,
    _add_model_args,
    _add_threads_arg,
    _require_positive,
    param_message,
    set_thread_defaults,
)
from llama3.cli.eval import _add_eval_parser, check_eval_args, cmd_eval
from llama3.cli.finetune import _add_finetune_parser, cmd_finetune
from llama3.cli.generate import cmd_generate
from llama3.cli.guard import GUARD_HELP, cmd_guard
from llama3.cli.inspect import _add_inspect_parser, check_inspect_args, cmd_inspect
from llama3.cli.perplexity import cmd_perplexity
from llama3.cli.pretrain import _add_pretrain_parser, cmd_pretrain
from llama3.cli.quantize import cmd_quantize
from llama3.cli.serve import _add_serve_parser, cmd_serve
from llama3.generate.params import KNOBS, SamplingParams, check_seed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama3",
        description="Llama 3 in pure PyTorch.",
        epilog="python -m llama3 works the same. 'llama3 COMMAND --help' shows each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"llama3 {__version__}")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{generate,chat,quantize,perplexity,guard,finetune,pretrain,serve,inspect,bench,eval}",
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
    chat.add_argument(
        "--prefix-cache-tokens",
        type=int,
        metavar="N",
        help="keep the conversation's keys and values, up to N tokens, so each turn computes only its new tokens "
        "(default: the context length; 0: off)",
    )
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
    _add_pretrain_parser(sub)
    _add_serve_parser(sub)
    _add_inspect_parser(sub)
    _add_bench_parser(sub)
    _add_eval_parser(sub)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every option checked before the model loads, each error naming the flag the user typed."""
    if args.command == "quantize":
        return
    if args.command == "bench":
        return check_bench_args(parser, args)
    if args.command == "eval":
        return check_eval_args(parser, args)
    if args.command == "finetune":
        _require_positive(parser, args, "lora_rank", "batch_size", "grad_accum", "max_steps", "epochs",
                          "logging_steps", "eval_steps", "save_steps")  # fmt: skip
        if args.max_seq_len < 2:
            parser.error(f"argument --max-seq-len: must be >= 2, got {args.max_seq_len}")
        if not 0 <= args.lora_dropout < 1:
            parser.error(f"argument --lora-dropout: must be in [0, 1), got {args.lora_dropout}")
        return
    if args.command == "pretrain":
        return  # PretrainConfig.check names each flag
    if getattr(args, "prefix_cache_tokens", None) is not None and not (
        args.prefix_cache_tokens == 0 or args.prefix_cache_tokens >= 16
    ):
        parser.error(f"argument --prefix-cache-tokens: must be 0 (off) or at least 16 (one block), got "
                     f"{args.prefix_cache_tokens}")  # fmt: skip
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
    if args.command == "inspect":
        check_inspect_args(parser, args)
        return
    if args.command == "perplexity":
        if args.max_length < 2:
            parser.error(f"argument --max-length: must be >= 2, got {args.max_length}")
        if not 1 <= args.stride <= args.max_length:
            parser.error(f"argument --stride: must be in [1, --max-length], got {args.stride}")
        return
    try:
        SamplingParams(**{k: getattr(args, k) for k in KNOBS})
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


def start_world(args: argparse.Namespace) -> None:
    """Under torchrun (WORLD_SIZE > 1): the process group of the tensor-parallel ranks, started before any input
    is read; rank 0 alone reads input and prints (the other ranks' stdout and messages are silenced)."""
    if args.command not in ("generate", "chat"):
        raise ValueError(f"'llama3 {args.command}' does not run under torchrun; generate and chat do")
    from llama3.parallel.tp import TensorParallel, rank
    from llama3.weights.hub import parse_device

    TensorParallel.from_environment(parse_device(args.device))
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")  # for the life of the process
        args.quiet = True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args.parser, args)
    if args.command in ("generate", "chat", "perplexity", "guard", "inspect", "bench", "eval", "serve"):
        set_thread_defaults(threads=args.command != "bench")  # a benchmark keeps its thread count: it reports it
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
            "pretrain": cmd_pretrain,
            "serve": cmd_serve,
            "inspect": cmd_inspect,
            "bench": cmd_bench,
            "eval": cmd_eval,
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
            from llama3.parallel.tp import shutdown

            shutdown()


# Commands that leave nothing for Python's teardown to finish (no file being written, no server, no process group)
_NO_TEARDOWN = ("generate", "chat")


def run() -> None:
    """The `llama3` command and `python -m llama3`: `main`; after `generate` and `chat` the process then ends, its
    output flushed, without Python's teardown, which frees torch's modules one by one: 0.25 s of a 1.85 s
    `llama3 generate -n 16` (the same command ended with and without it, 3 runs each). Programs that call
    `main` themselves (the tests) keep their normal exit."""
    code = main()
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command in _NO_TEARDOWN and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed or broken stream: let the normal exit report it
            sys.exit(code)
        os._exit(code)
    sys.exit(code)


def _rank_note(world: bool) -> str:
    """ " (rank 2)" for messages of a torchrun rank other than 0; every rank reports its own failure."""
    if not world:
        return ""
    from llama3.parallel.tp import rank

    return f" (rank {rank()})" if rank() else ""


if __name__ == "__main__":
    sys.exit(main())
