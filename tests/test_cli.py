"""The `llama3` command, run as a user would: a subprocess on a tiny checkpoint, its output checked against
transformers (greedy `generate`, and the official Llama 3 chat template rendered by transformers)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import hf_greedy, run_main

STOPS = (128001, 128008, 128009)  # the Llama 3.1 Instruct stop tokens (generation_config.json's eos ids)


@pytest.fixture(scope="module")
def checkpoint(tiny_llama3, llama3_tokenizer_path):
    """(dir, HF model, HF tokenizer with the Instruct chat template): the references are all transformers'."""
    from conftest import hf_llama3_tokenizer

    return (*tiny_llama3, hf_llama3_tokenizer(llama3_tokenizer_path))


def run_cli(*args: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """The command in a fresh process, as a user runs it (for exit codes, signals, pipes, imports)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "llama3", *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture
def cli(capsys, monkeypatch):
    """The command's `main` in this process (no torch import per call): returncode, stdout and stderr."""

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(args, *run_main(monkeypatch, capsys, *args, stdin=stdin))

    return run


def tiny(d, *args: str) -> tuple[str, ...]:
    return ("--model", str(d), "--temperature", "0", "--dtype", "float32", *args)


def hf_greedy_until_stop(hf, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, up to (not including) the first stop token."""
    out = hf_greedy(hf, prompt_ids, n)
    return next((out[:i] for i, t in enumerate(out) if t in STOPS), out)


def completion(checkpoint, prompt: str, n: int) -> tuple[list[int], list[int], str]:
    """(prompt ids, new ids, new text) of a greedy completion by transformers."""
    _, hf, hf_tok = checkpoint
    ids = [hf_tok.bos_token_id, *hf_tok.encode(prompt, add_special_tokens=False)]
    new = hf_greedy_until_stop(hf, ids, n)
    return ids, new, hf_tok.decode(new)


def chat_reply(checkpoint, dialog: list[dict], n: int) -> str:
    _, hf, hf_tok = checkpoint
    ids = hf_tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=False)
    return hf_tok.decode(hf_greedy_until_stop(hf, list(ids), n))


def chat_prompt_len(checkpoint, dialog: list[dict]) -> int:
    ids = checkpoint[2].apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=False)
    return len(ids)


# -- generate -----------------------------------------------------------------------------------------------


def test_generate_streams_the_greedy_completion(checkpoint):
    r = run_cli("generate", "Hello world", *tiny(checkpoint[0], "-n", "8"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == completion(checkpoint, "Hello world", 8)[2] + "\n"
    assert "tokens/s" in r.stderr and "model" in r.stderr
    assert "[stopped at the -n 8 limit" in r.stderr  # the answer was cut by -n, not ended by the model


TEARDOWN_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('teardown ran\\n'))\n"
    "sys.argv = ['llama3', *sys.argv[1:]]\n"
    "from llama3.cli import run\n"
    "run()"
)


def test_generate_ends_without_pythons_teardown_and_keeps_its_output(checkpoint):
    """`llama3 generate` ends the process once its output is flushed (`llama3.cli.run`: Python's teardown of torch
    took 0.25 s of a cold start): the whole answer arrives through a pipe and the exit code is kept, and atexit
    hooks do not run. Any other command exits normally."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ("generate", "Hello world", *tiny(checkpoint[0], "-n", "8", "--json"))
    r = subprocess.run([sys.executable, "-c", TEARDOWN_PROBE, *args], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == completion(checkpoint, "Hello world", 8)[2]
    assert "teardown ran" not in r.stderr
    r = subprocess.run([sys.executable, "-c", TEARDOWN_PROBE, "quantize", "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "teardown ran" in r.stderr


def test_compile_decodes_transformers_greedy_text(cli, checkpoint, monkeypatch):
    import llama3.generate.llama

    compile_block, made = llama3.generate.llama.compiled_block, []
    monkeypatch.setattr(llama3.generate.llama, "compiled_block", lambda: made.append(1) or compile_block())
    r = cli("generate", "Hello world", *tiny(checkpoint[0], "-n", "8", "--compile", "--quiet"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == completion(checkpoint, "Hello world", 8)[2] + "\n"
    assert made == [1]  # --compile reached Llama


def test_quiet_prints_only_the_text(cli, checkpoint):
    r = cli("generate", "Hi", *tiny(checkpoint[0], "-n", "4", "--quiet"))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout == completion(checkpoint, "Hi", 4)[2] + "\n"


@pytest.mark.parametrize(
    "args, stdin",
    [
        (["-"], "The prompt\nspans lines\n"),  # '-' reads stdin; the trailing newline goes, as $(cat) drops it
        ([], "The prompt\nspans lines\r\n"),  # no PROMPT and piped input
        (["--file", "FILE"], None),
        (["-f", "-"], "The prompt\nspans lines\n\n"),
    ],
)
def test_prompt_from_stdin_or_file(cli, checkpoint, tmp_path, args, stdin):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("The prompt\nspans lines\n", encoding="utf-8")
    args = [str(prompt_file) if a == "FILE" else a for a in args]
    r = cli("generate", *args, *tiny(checkpoint[0], "-n", "6", "-q"), stdin=stdin or "")
    assert r.returncode == 0, r.stderr
    assert r.stdout == completion(checkpoint, "The prompt\nspans lines", 6)[2] + "\n"


def test_unreadable_prompt_file_is_named(cli, checkpoint, tmp_path):
    missing = tmp_path / "nope.txt"
    r = cli("generate", "-f", str(missing), *tiny(checkpoint[0], "-q"))
    assert r.returncode == 1 and "nope.txt" in r.stderr and "Traceback" not in r.stderr
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    r = cli("generate", "-f", str(latin1), *tiny(checkpoint[0], "-q"))
    assert r.returncode == 1 and "latin1.txt is not UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_system_message_uses_the_chat_template(cli, checkpoint):
    r = cli("generate", "What is 2+2?", "--system", "Be terse.", *tiny(checkpoint[0], "-n", "6", "-q"))
    assert r.returncode == 0, r.stderr
    dialog = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}]
    assert r.stdout == chat_reply(checkpoint, dialog, 6) + "\n"


def test_stop_string_ends_the_answer_before_it(cli, checkpoint):
    _, _, text = completion(checkpoint, "Hello world", 24)
    stop = text[6:9]  # spans characters from the middle of the answer
    assert len(stop) == 3 and text.find(stop) < 6 + 1
    r = cli("generate", "Hello world", *tiny(checkpoint[0], "-n", "24", "-q", "--stop", "never seen", "--stop", stop))
    assert r.returncode == 0, r.stderr
    assert r.stdout == text[: text.find(stop)] + "\n"


def test_json_output(cli, checkpoint):
    ids, new, text = completion(checkpoint, "Hello world", 8)
    r = cli("generate", "Hello world", "--json", *tiny(checkpoint[0], "-n", "8"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == text and out["tokens"] == new
    assert out["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8}
    assert set(out["timings"]) == {"load_s", "time_to_first_token_s", "tokens_per_second", "total_s"}
    stop = text[2:5]
    r = cli("generate", "Hello world", "--json", "--stop", stop, *tiny(checkpoint[0], "-n", "8", "-q"))
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop" and out["text"] == text[: text.find(stop)]


def test_zero_new_tokens_generates_nothing(cli, checkpoint):
    r = cli("generate", "Hello world", "--json", *tiny(checkpoint[0], "-n", "0", "-q"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["text"], out["tokens"], out["finish_reason"]) == ("", [], "length")


def test_minus_one_fills_the_context(cli, checkpoint):
    ids, new, text = completion(checkpoint, "Hi", 30)
    r = cli("generate", "Hi", "--json", *tiny(checkpoint[0], "-n", "-1", "-c", str(len(ids) + 12), "-q"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == new[:12]  # exactly the context's room after the prompt
    r = cli("generate", "Hi", *tiny(checkpoint[0], "-n", "-1", "-c", str(len(ids) + 12)))
    assert f"[stopped: the context is full (--max-seq-len {len(ids) + 12})]" in r.stderr  # the limit was not -n
    assert "-n" not in r.stderr.split("[stopped")[1].split("]")[0]
    r = cli("generate", "Hi", *tiny(checkpoint[0], "-n", "-1", "-c", str(len(ids)), "-q"))
    assert r.returncode == 1 and "no room for an answer" in r.stderr


def test_context_size_bounds_prompt_plus_answer(cli, checkpoint):
    ids, _, text = completion(checkpoint, "Hello world", 8)
    at_limit = cli("generate", "Hello world", *tiny(checkpoint[0], "-n", "8", "-c", str(len(ids) + 8), "-q"))
    assert at_limit.returncode == 0 and at_limit.stdout == text + "\n"
    over = cli("generate", "Hello world", *tiny(checkpoint[0], "-n", "8", "-c", str(len(ids) + 7), "-q"))
    assert over.returncode == 1 and over.stderr.startswith("llama3: error: the prompt is") and "-n" in over.stderr
    beyond = cli("generate", "Hello world", *tiny(checkpoint[0], "-c", "257", "-q"))  # the context is 256
    assert beyond.returncode == 2 and beyond.stderr.count("\n") == 1, beyond.stderr
    assert beyond.stderr.startswith("llama3 generate: error: argument --max-seq-len/-c: must be at most the model's")
    assert "256" in beyond.stderr and "max_seq_len" not in beyond.stderr  # the flag, not the Python name


# -- empty prompts (4b) -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, stdin",
    [([], ""), ([], "\n\n"), (["-"], " \t\n"), ([""], ""), (["  \n "], ""), (["--file", "FILE"], "")],
    ids=["no-stdin", "newlines", "dash-blank", "empty-arg", "blank-arg", "empty-file"],
)
def test_an_empty_prompt_is_refused_naming_unconditional(cli, checkpoint, tmp_path, args, stdin):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    args = [str(tmp_path / "empty.txt") if a == "FILE" else a for a in args]
    r = cli("generate", *args, *tiny(checkpoint[0], "-n", "4"), stdin=stdin)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert r.stderr.startswith("llama3: error: the prompt") and "--unconditional" in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr  # refused before the model loaded: nothing else printed


def test_unconditional_generates_from_the_bos_token_alone(cli, checkpoint):
    _, hf, hf_tok = checkpoint
    new = hf_greedy_until_stop(hf, [hf_tok.bos_token_id], 6)
    r = cli("generate", "--unconditional", "--json", *tiny(checkpoint[0], "-n", "6", "-q"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == new and out["usage"]["prompt_tokens"] == 1


@pytest.mark.parametrize("args", [["Hi"], ["--file", "x.txt"], ["--chat"], ["--system", "Be brief."]])
def test_unconditional_with_a_prompt_or_chat_is_refused(args):
    r = run_cli("generate", "--unconditional", *args, "--model", "/nonexistent/model")
    assert r.returncode == 2 and "argument --unconditional" in r.stderr and "nonexistent" not in r.stderr, r.stderr


# -- checked before anything loads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--top-p", "nan"], "--top-p"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.0001"], "--top-p"),
        (["--temperature", "-0.5"], "--temperature"),
        (["--temperature", "inf"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-k", "0"], "--top-k"),
        (["--seed", "-1"], "--seed"),
        (["-n", "-2"], "--max-new-tokens"),
        (["-c", "0"], "--max-seq-len"),
        (["--stop", ""], "--stop"),
        (["--threads", "0"], "--threads"),
        (["--top-p", "x"], "--top-p"),
    ],
)
def test_bad_options_name_the_flag_before_loading(args, flag):
    r = run_cli("generate", "Hi", "--model", "/nonexistent/model", *args)
    assert r.returncode == 2, r.stderr
    assert f"llama3 generate: error: argument {flag}" in r.stderr
    assert "None" not in r.stderr and "_" not in r.stderr.splitlines()[-1]  # no Python value or parameter name
    assert "nonexistent" not in r.stderr and "Traceback" not in r.stderr  # the model was never looked for


def test_prompt_and_file_together_are_refused():
    r = run_cli("generate", "Hi", "-f", "x.txt")
    assert r.returncode == 2 and "not both" in r.stderr


def test_help_and_argument_errors_do_not_import_torch():
    for args in (["--help"], ["generate", "--help"], ["generate", "Hi", "--top-p", "2"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "llama3", *args], capture_output=True, text=True)
        imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
        assert "llama3.cli" in imported and "torch" not in imported, args


def test_version_is_the_installed_distributions():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llama3 {importlib.metadata.version('llama3')}"


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "unknown device 'gpu'"), ("cuda:x", "unknown device 'cuda:x'"), ("cuda:99", "'cuda:99' is not available")]
    + ([("cuda", "'cuda' is not available")] if not torch.cuda.is_available() else []),
)
def test_bad_device_is_one_line(cli, checkpoint, device, message):
    r = cli("generate", "Hi", *tiny(checkpoint[0], "--device", device, "-q"))
    assert r.returncode == 1 and r.stderr.startswith("llama3: error: ") and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize("content", [b"this is a text file, not a checkpoint\n" * 3, b"", b"\xff" * 16])
def test_corrupt_weights_file_is_one_line(cli, checkpoint, tmp_path, content):
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint[0], d)
    (d / "model.safetensors").write_bytes(content)
    r = cli("generate", "Hi", *tiny(d, "-q"))
    assert r.returncode == 1 and "model.safetensors" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_bad_model_path_is_one_clear_line(cli, tmp_path):
    r = cli("generate", "Hi", "--model", str(tmp_path / "nope"), "--quiet")
    assert r.returncode == 1
    assert r.stderr.startswith("llama3: error: checkpoint not found") and "Traceback" not in r.stderr


def test_guard_help_says_the_model_is_required(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "guard", "--help")
    assert code == 0
    model_help = " ".join(out.split("--model MODEL, -m MODEL")[1].split("--device")[0].split())
    assert "required" in model_help and "embedded" not in model_help, model_help


# -- threads (6) --------------------------------------------------------------------------------------------


def test_threads_sets_torch_threads(cli, checkpoint):
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        r = cli("generate", "Hi", *tiny(checkpoint[0], "-n", "2", "-q", "--threads", "1"))
        assert r.returncode == 0, r.stderr
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)


THREAD_PROBE = (
    "import os, sys, llama3.cli as c, llama3.cli.common as common\n"
    "common.busy_cpus = lambda: int(sys.argv[1]) if sys.argv[1] != 'all' else os.cpu_count()\n"
    "show = lambda a: print(*(os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'OMP_NUM_THREADS')),"
    " 'torch' in sys.modules) or 0\n"
    "c.cmd_generate = c.cmd_bench = show\n"
    "sys.exit(c.main(sys.argv[2:]))"
)


def thread_settings(busy: str, env: dict, *args: str) -> list[str]:
    """(OMP_WAIT_POLICY, GOMP_SPINCOUNT, OMP_NUM_THREADS, torch imported) as `llama3 ARGS` leaves them before torch
    loads, with `busy` CPUs running other processes."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    cmd = [sys.executable, "-c", THREAD_PROBE, busy, *(args or ("generate", "Hi"))]
    r = subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.parametrize(
    "busy, env, expected",
    [
        ("0", {}, ["None", "10000", "None"]),  # quiet: a short spin, every core
        ("all", {}, ["PASSIVE", "None", "1"]),  # every CPU busy: sleep at once, one thread
        ("all", {"OMP_NUM_THREADS": "2"}, ["PASSIVE", "None", "2"]),  # the user's thread count stays
        ("0", {"OMP_WAIT_POLICY": "ACTIVE"}, ["ACTIVE", "None", "None"]),  # the user's own policy stays
        ("all", {"GOMP_SPINCOUNT": "1000"}, ["None", "1000", "1"]),
    ],
)
def test_openmp_settings_follow_how_busy_the_machine_is(busy, env, expected):
    """Set before torch (and its libgomp) loads, which reads them once: the state the test reads has no torch."""
    assert thread_settings(busy, env) == [*expected, "False"]


def test_a_benchmark_keeps_its_thread_count_on_a_busy_machine():
    assert thread_settings("all", {}, "bench")[2] == "None"


def test_busy_cpus_counts_the_processes_running_beside_this_one():
    from llama3.cli.common import busy_cpus

    if not Path("/proc/loadavg").is_file():
        pytest.skip("the runnable count is read from Linux's /proc/loadavg")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)  # started and running
        assert busy_cpus() >= 2
    finally:
        for p in spinners:
            p.kill()
            p.wait()


# -- interrupts and pipes -----------------------------------------------------------------------------------


def popen(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "llama3", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )


def test_ctrl_c_while_loading_exits_130(checkpoint):
    p = popen("generate", "Hi", *tiny(checkpoint[0], "-n", "4"))
    assert p.stderr.readline().startswith(b"llama3: model")  # printed just before the load starts
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and b"interrupted" in err and b"Traceback" not in err, err


SLOW_SERVER_LOAD = """
import sys, time
import torch
import llama3.cli.serve as serve
def load(args):  # a load that is busy in torch's C++ code until Ctrl-C
    a = torch.randn(1000, 1000)
    print("loading", file=sys.stderr, flush=True)
    end = time.time() + 60
    while time.time() < end:
        a = torch.mm(a, a).clamp_(-1, 1)
serve._load_models = load
sys.argv = ["llama3", "serve", "--port", sys.argv[1]]
from llama3.cli import run
run()
"""


def test_ctrl_c_while_the_server_loads_exits_130():
    """`llama3 serve` loads in a thread of its own (llama3/cli/serve.py). Ctrl-C must still end it at once with 130,
    not abort it ("terminate called without an active exception", -6) as Python's exit would, ending the loading
    thread inside torch's C++ code."""
    pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-c", SLOW_SERVER_LOAD, str(port)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert p.stderr.readline() == b"loading\n"
    time.sleep(0.2)  # inside torch.mm
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip().endswith(b"llama3: interrupted"), err
    assert b"terminate" not in err and b"Traceback" not in err, err


def test_ctrl_c_while_generating_exits_130(checkpoint, tmp_path):
    d = shutil.copytree(checkpoint[0], tmp_path / "long")  # the tiny model with a long context: a minute of work
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32768}))
    p = popen("generate", "Hi", *tiny(d, "-n", "-1", "--stop", "never seen"))
    assert p.stdout.read(1)  # the answer has begun
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and b"interrupted" in err and b"Traceback" not in err, err


def test_closed_output_pipe_exits_quietly(checkpoint):
    p = popen("generate", "Hi", *tiny(checkpoint[0], "-n", "8", "-q"))
    p.stdout.close()  # the reader is gone before the first piece is written (as `| head -c 0` would leave it)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141 and err == b"", err  # 128 + SIGPIPE, and no "Exception ignored" on exit


# -- chat ---------------------------------------------------------------------------------------------------


def test_chat_keeps_history_and_resets(cli, checkpoint):
    first = [{"role": "user", "content": "hi"}]
    reply1 = chat_reply(checkpoint, first, 6)
    second = [*first, {"role": "assistant", "content": reply1}, {"role": "user", "content": "and then?"}]
    reply2 = chat_reply(checkpoint, second, 6)
    reply3 = chat_reply(checkpoint, [{"role": "user", "content": "and then?"}], 6)
    r = cli(
        "chat", *tiny(checkpoint[0], "-n", "6", "-q"), stdin="hi\nand then?\n/reset\nand then?\n/exit\nnever read\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{reply1}\n{reply2}\n{reply3}\n"


def test_chat_commands_stay_local(cli, checkpoint):
    dialog = [{"role": "user", "content": "hi"}]
    reply = chat_reply(checkpoint, dialog, 6)
    slash = chat_reply(
        checkpoint, [*dialog, {"role": "assistant", "content": reply}, {"role": "user", "content": "/hi"}], 6
    )
    r = cli("chat", *tiny(checkpoint[0], "-n", "6"), stdin="/help\n/bogus\nhi\n//hi\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{reply}\n{slash}\n"  # two answers: /help and /bogus never reached the model
    assert "/reset" in r.stderr and "unknown command /bogus" in r.stderr


def test_chat_drops_the_oldest_turn_exactly_when_the_context_is_short(cli, checkpoint):
    n = 6
    first = [{"role": "user", "content": "hi"}]
    reply1 = chat_reply(checkpoint, first, n)
    second = [*first, {"role": "assistant", "content": reply1}, {"role": "user", "content": "and then?"}]
    fits = chat_prompt_len(checkpoint, second) + n
    alone = chat_reply(checkpoint, second[2:], n)
    r = cli("chat", *tiny(checkpoint[0], "-n", str(n), "-c", str(fits)), stdin="hi\nand then?\n")
    assert r.stdout == f"{reply1}\n{chat_reply(checkpoint, second, n)}\n" and "dropped" not in r.stderr
    r = cli("chat", *tiny(checkpoint[0], "-n", str(n), "-c", str(fits - 1)), stdin="hi\nand then?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{reply1}\n{alone}\n" and "dropped the 2 oldest messages" in r.stderr


def test_chat_refuses_an_over_long_message_and_goes_on(cli, checkpoint):
    reply = chat_reply(checkpoint, [{"role": "user", "content": "hi"}], 6)
    long = "word " * 200  # far more than -c 64 holds
    r = cli("chat", *tiny(checkpoint[0], "-n", "6", "-c", "64"), stdin=f"{long}\nhi\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{reply}\n" and "message not sent" in r.stderr


def test_chat_answer_stopped_by_ctrl_c_says_interrupted(cli, checkpoint, monkeypatch):
    """Ctrl-C during an answer ends that answer (the chat goes on); its note says so, not that -n cut it."""
    from llama3.generate.llama import Llama

    stream = Llama.stream

    def interrupted_after_one_piece(self, *args, **kwargs):
        pieces = stream(self, *args, **kwargs)
        yield next(pieces)
        pieces.close()  # as a KeyboardInterrupt would close it: the stats are written, finish reason "length"
        raise KeyboardInterrupt

    monkeypatch.setattr(Llama, "stream", interrupted_after_one_piece)
    r = cli("chat", *tiny(checkpoint[0], "-n", "6"), stdin="hi\n")
    assert r.returncode == 0, r.stderr
    assert "answer stopped" in r.stderr and "[stopped: interrupted]" in r.stderr
    assert "-n" not in r.stderr.split("answer stopped")[1], r.stderr


def test_a_draft_with_a_shorter_context_is_named_by_its_flag(cli, checkpoint, tmp_path):
    d = shutil.copytree(checkpoint[0], tmp_path / "short")  # the same model as its own draft, 16-token context
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    r = cli("generate", "Hello world", "--draft", str(d), *tiny(checkpoint[0], "-n", "20", "-q"))
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert "--draft model's context of 16 tokens" in r.stderr and "max_new_tokens" not in r.stderr
    r = cli("chat", "--draft", str(d), *tiny(checkpoint[0], "-n", "20", "-q"), stdin="hi\n")
    assert r.returncode == 0 and r.stdout == "" and "message not sent" in r.stderr and "--draft" in r.stderr


def test_default_model_is_the_embedded_smollm2():
    r = run_cli("generate", "The capital of France is", "--temperature", "0", "-n", "6", "-v")
    assert r.returncode == 0, r.stderr
    assert "SmolLM2-135M-Instruct" in r.stderr and "int4 weights" in r.stderr  # its own Q4_1 codes, on the CPU
    assert "Paris" in r.stdout
    # -v: the kernel plan measured for this machine (llama3.quant.choice), and why
    assert re.search(
        r"llama3: kernel (int4|int4-fbgemm|int8|int4-dot): .* \(per call, 1 row: int4 projection [\d.]+ us", r.stderr
    )
    assert "; CPU " in r.stderr and "ATen dispatch" in r.stderr


def test_quantize_flags(cli, checkpoint):
    r = cli("generate", "Hi", "--model", str(checkpoint[0]), "-n", "2", "--quantize", "int8")
    assert r.returncode == 0 and "torch.bfloat16, int8 weights" in r.stderr, r.stderr
    r = cli("generate", "Hi", *tiny(checkpoint[0], "-n", "2", "--quantize", "int4"))  # tiny() asks for float32
    assert r.returncode == 1 and "bfloat16" in r.stderr, r.stderr
    r = cli("generate", "Hi", "--model", str(checkpoint[0]), "-n", "2", "--quantize", "int4", "--group-size", "48")
    assert r.returncode == 2 and "argument --group-size" in r.stderr
    r = cli("generate", "Hi", "--model", str(checkpoint[0]), "-n", "2", "--quantize", "none", "--keep-output")
    assert r.returncode == 2 and "argument --keep-output" in r.stderr, r.stderr


def test_quantize_command_writes_a_checkpoint_generate_loads(cli, checkpoint, tmp_path):
    out = tmp_path / "int8"
    r = cli("quantize", "--model", str(checkpoint[0]), "--mode", "int8", "--output", str(out))
    assert r.returncode == 0 and f"wrote {out} (int8" in r.stderr, r.stderr
    r = cli("generate", "Hi", "--model", str(out), "-n", "2", "-t", "0")
    assert r.returncode == 0 and "int8 weights" in r.stderr, r.stderr
    r = cli("quantize", "--model", str(tmp_path / "missing"), "--mode", "int4", "--output", str(tmp_path / "x"))
    assert r.returncode == 1 and "checkpoint not found" in r.stderr


def test_perplexity_command_equals_transformers_nll(cli, checkpoint, tmp_path):
    """Windows of 16 that do not overlap: each scores its tokens after the first from transformers' logits."""
    _, hf, hf_tok = checkpoint
    text = "The quick brown fox jumps over the lazy dog. " * 6
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    args = ("--model", str(checkpoint[0]), "--dtype", "float32", "--max-length", "16")
    r = cli("perplexity", str(tmp_path / "text.txt"), *args, "--stride", "16")
    assert r.returncode == 0, r.stderr
    ids = torch.tensor(hf_tok.encode(text, add_special_tokens=False))
    nll, scored = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, 16):
            window = ids[begin : begin + 16]
            log_probs = hf(window[None]).logits[0, :-1].double().log_softmax(-1)
            nll -= log_probs.gather(-1, window[1:, None]).sum().item()
            scored += len(window) - 1
    assert float(r.stdout) == pytest.approx(math.exp(nll / scored), rel=1e-4)  # printed to 4 decimals
    r = cli("perplexity", str(tmp_path / "text.txt"), *args, "--stride", "17")
    assert r.returncode == 2 and "argument --stride" in r.stderr


def test_perplexity_window_longer_than_the_context_is_refused(cli, checkpoint, tmp_path):
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 6, encoding="utf-8")
    r = cli("perplexity", str(tmp_path / "text.txt"), "--model", str(checkpoint[0]), "--max-length", "100000", "-q")
    assert r.returncode == 2 and r.stdout == "", r.stdout  # not clamped to the context and scored silently
    assert r.stderr.startswith("llama3 perplexity: error: argument --max-length: must be in [2, 256] (the model's")
    assert r.stderr.count("\n") == 1 and "max_length" not in r.stderr
    (tmp_path / "short.txt").write_text("", encoding="utf-8")
    r = cli("perplexity", str(tmp_path / "short.txt"), "--model", str(checkpoint[0]), "-q")
    assert r.returncode == 1 and "short.txt: 0 tokens; perplexity needs at least 2" in r.stderr, r.stderr
