"""The `llama3` command, run as a user would: a subprocess on a tiny checkpoint, output checked against transformers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from llama3 import Tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, llama3_tokenizer_path):
    from conftest import save_tiny_hf

    d = tmp_path_factory.mktemp("cli-llama")
    hf = save_tiny_hf(d, vocab_size=128256, eos_token_id=[128001, 128008, 128009])
    (d / "original").mkdir()
    shutil.copy(llama3_tokenizer_path, d / "original" / "tokenizer.model")
    return d, hf, Tokenizer(llama3_tokenizer_path)


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "llama3", *args], input=stdin, capture_output=True, text=True, env=env, timeout=300
    )


def hf_greedy_text(hf, tok: Tokenizer, prompt_ids: list[int], n: int) -> str:
    out = hf.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(prompt_ids) :].tolist()
    for stop in (128001, 128008, 128009):
        if stop in out:
            out = out[: out.index(stop)]
    return tok.decode(out)


def test_generate_streams_the_greedy_completion(checkpoint):
    d, hf, tok = checkpoint
    r = run_cli("generate", "Hello world", "--model", str(d), "--temperature", "0", "-n", "8", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == hf_greedy_text(hf, tok, tok.encode("Hello world", bos=True), 8) + "\n"
    assert "tokens/s" in r.stderr and "model" in r.stderr


def test_quiet_prints_only_the_text(checkpoint):
    d, hf, tok = checkpoint
    r = run_cli("generate", "Hi", "--model", str(d), "--temperature", "0", "-n", "4", "--quiet", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout == hf_greedy_text(hf, tok, tok.encode("Hi", bos=True), 4) + "\n"


def test_chat_keeps_history_and_resets(checkpoint):
    d, hf, tok = checkpoint
    from llama3 import ChatFormat

    fmt = ChatFormat(tok)
    first = [{"role": "user", "content": "hi"}]
    reply1 = hf_greedy_text(hf, tok, fmt.encode_dialog_prompt(first), 6)
    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "and then?"}]
    reply2 = hf_greedy_text(hf, tok, fmt.encode_dialog_prompt(second), 6)
    reply3 = hf_greedy_text(hf, tok, fmt.encode_dialog_prompt([{"role": "user", "content": "and then?"}]), 6)
    r = run_cli(
        "chat",
        "--model",
        str(d),
        "--temperature",
        "0",
        "-n",
        "6",
        "--quiet",
        "--dtype",
        "float32",
        stdin="hi\nand then?\n/reset\nand then?\n/exit\nnever read\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{reply1}\n{reply2}\n{reply3}\n"


def test_bad_model_path_is_one_clear_line(tmp_path):
    r = run_cli("generate", "Hi", "--model", str(tmp_path / "nope"), "--quiet")
    assert r.returncode == 1
    assert r.stderr.startswith("llama3: error: checkpoint not found") and "Traceback" not in r.stderr


def test_default_model_is_the_embedded_smollm2():
    r = run_cli("generate", "The capital of France is", "--temperature", "0", "-n", "6")
    assert r.returncode == 0, r.stderr
    assert "SmolLM2-135M-Instruct" in r.stderr
    assert "Paris" in r.stdout
