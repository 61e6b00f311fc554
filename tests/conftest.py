"""Shared fixtures: tiny random checkpoints written by transformers, and the real Llama 3 tokenizer file.

Nothing here reaches the network: checkpoints are made in the test, the tokenizer file comes from the
`llama-models` package the setup command installs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLAMA3_WEIGHT_CACHE", "0")  # no test writes converted weights to ~/.cache
if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU (must be set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"

# Tiny configs covering the variants: Llama 3 (GQA), 3.1 (llama3 rope scaling), 3.2 (tied; scaling by 32), MQA, MHA.
# The scaled ones shrink original_max_position_embeddings (8192 in the real models) so that, at rope theta
# 500000, their frequencies fall in all three bands of the llama3 scaling (wavelength 2*pi/freq against
# L = original_max_position_embeddings: kept below L/4, divided above L, blended between):
#   head_dim 32, L 128: wavelengths 6.3, 14.3 | 32.4, 73.6 | 167, ... -> 2 kept, 2 blended, 12 divided;
#   head_dim 16, L 64: wavelengths 6.3 | 32.4 | 167, 861, ... -> 1 kept, 1 blended, 6 divided.
# At head_dim 16 successive wavelengths are 5.2x apart, more than the band's 4x: one blended pair at most.
# The GGUF tests use llama3.1-scaled: llama3/gguf.py cannot fit a scaling to a single blended pair, and
# refits L as 8192 with low/high factors to 6 digits (exact here: 8192 / 128 = 64).
# tests/test_model.py recounts the bands from the published formula.
TINY_CONFIGS = {
    "llama3-gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "llama3.1-scaled": dict(
        hidden_size=128,  # head_dim 32: two frequencies in the blended band
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    ),
    "llama3.2-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama3.2-scaled": dict(  # tied, Llama 3.2's factor 32, head_dim 16: one frequency in each band
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
}


# Dialogs both chat-format test files render (ours against transformers' templates): whitespace that a
# format must keep or strip, emoji and CJK, JSON and HTML-like content, an ipython (tool) turn last (Llama 3 only).
CHAT_DIALOGS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "\n\nWhat is 2+2?  "}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a haiku about llamas 🦙."},
        {"role": "assistant", "content": "Soft wool on the hills,\n  quiet steps in mountain air..."},
        {"role": "user", "content": "(now in 日本語) 123456 don't"},
    ],
    [{"role": "user", "content": "   \t  "}, {"role": "assistant", "content": '{"json": true, "html": "<b>&</b>"}'}],
    [{"role": "user", "content": "call a tool"}, {"role": "ipython", "content": "[1, 2, 3]\r\n"}],
]


# llama3's C dot-product kernels (llama3/quant/dot.c) are built by the machine's C compiler: without one they are
# no candidate, and the tests that run them are skipped, saying so
needs_cc = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None, reason="the dot-product kernels need a C compiler (cc)"
)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models (a few ms of small ops a step): with the 2 CI cores shared, a second OpenMP
    thread mostly waits at barriers, making a forward 10-20x slower on a busy machine. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_hf_config(vocab_size: int = 512, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_hf_model(seed: int = 0, vocab_size: int = 512, **overrides):
    """A random transformers LlamaForCausalLM (fp32, eval) of a tiny config."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(vocab_size, **overrides)).eval()
    # random init leaves norms at 1.0; perturb them so a swapped or skipped norm would show in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny_hf(path: Path, seed: int = 0, vocab_size: int = 512, max_shard_size=None, **overrides):
    """Saves a random LlamaForCausalLM to `path` with transformers; returns the (fp32, eval) HF model."""
    model = tiny_hf_model(seed, vocab_size, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


@pytest.fixture
def tiny_hf(tmp_path):
    """Factory: tiny_hf(name_or_overrides) -> (checkpoint dir, HF model)."""

    def make(variant: str = "llama3-gqa", **overrides):
        d = tmp_path / variant
        model = save_tiny_hf(d, **{**TINY_CONFIGS.get(variant, {}), **overrides})
        return d, model

    return make


def llama3_tokenizer_file() -> Path:
    spec = importlib.util.find_spec("llama_models")  # found, not imported: it needs packages we do not install
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llama-models package is missing; run the README's setup command")
    path = Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != LLAMA3_TOKENIZER_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {LLAMA3_TOKENIZER_SHA256}")
    return path


def fill_cache_with_garbage(model, batch: int, slots: int) -> None:
    """A KV cache of `batch` rows and `slots` slots full of large random values: slots no row has
    reached must never be read (the graph-form decode step attends over the whole cache, masked)."""
    model.setup_cache(batch, slots)
    for layer in model.layers:
        layer.attention.cache.k.normal_(0, 30)
        layer.attention.cache.v.normal_(0, 30)


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    return llama3_tokenizer_file()


# The Llama 3 Instruct chat template (tokenizer_config.json of meta-llama/Meta-Llama-3-8B-Instruct).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def hf_llama3_tokenizer(path: Path):
    """transformers' fast tokenizer converted from Meta's tokenizer.model, with the Instruct chat template:
    an independent reference for our tokenizer and chat format."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llama3.text.tokenizer import LLAMA3_PAT_STR, llama3_special_token_names

    converter = TikTokenConverter(
        vocab_file=str(path), pattern=LLAMA3_PAT_STR, extra_special_tokens=llama3_special_token_names()
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=converter.converted(), bos_token="<|begin_of_text|>")
    hf.chat_template = LLAMA3_CHAT_TEMPLATE
    assert hf.convert_tokens_to_ids("<|eot_id|>") == 128009 and hf.bos_token_id == 128000
    return hf


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory, llama3_tokenizer_path):
    """(dir, HF model): a tiny random Llama written by transformers with the real 128,256-token vocabulary,
    Meta's tokenizer.model in original/, and the eos ids the Llama 3.1 Instruct repos list. Read-only:
    a test that damages or edits it works on a copy."""
    d = tmp_path_factory.mktemp("tiny-llama3")
    hf = save_tiny_hf(d, vocab_size=128256, eos_token_id=[128001, 128008, 128009])
    (d / "original").mkdir()
    shutil.copy(llama3_tokenizer_path, d / "original" / "tokenizer.model")
    return d, hf


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation: exactly n new tokens, no stop token."""
    out = hf.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def run_main(monkeypatch, capsys, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """`llama3 ARGS` through the CLI's `main` in this process (no torch import per call): (exit code, stdout,
    stderr), with `stdin` as standard input; argparse's errors give their exit code."""
    import io
    import sys

    from llama3.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
