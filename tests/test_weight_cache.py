"""The per-machine cache of a GGUF file's converted CPU weights (`llama3.weights.cache`): a warm load gives the
same model as a fresh one, bit for bit, and a changed file, an unreadable entry or the off switch rebuild from the
file. Each test points the cache at its own temporary directory (tests/conftest.py turns it off elsewhere)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import TINY_CONFIGS, needs_cc
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize
from test_gguf import gguf_name, permute_like_llama_cpp, tiny_llama, write_llama_gguf

from llama3 import Transformer
from llama3.quant.dynamic import DynInt8Linear
from llama3.quant.weight_only import quantize
from llama3.weights import build


def write_q4_gguf(path, seed: int = 0):
    """A tied tiny model stored as SmolLM2's file is: Q4_1 projections, a Q8_0 embedding, F32 norms."""
    hf = tiny_llama(seed=seed, **TINY_CONFIGS["llama3.2-tied"])
    config, raw = hf.config, {}
    for name, t in hf.state_dict().items():
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            t = permute_like_llama_cpp(t, heads)
        if "proj" in name:
            raw[gguf_name(name)] = (gguf_quantize(t.numpy(), GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
        elif name == "model.embed_tokens.weight":
            raw[gguf_name(name)] = (gguf_quantize(t.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    return write_llama_gguf(path, hf, raw=raw)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("LLAMA3_WEIGHT_CACHE", str(directory))
    return directory


TOKENS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def fresh(path, kernel: str, monkeypatch) -> Transformer:
    """The model as loaded with the cache off: from the file, converted."""
    with monkeypatch.context() as m:
        m.setenv("LLAMA3_WEIGHT_CACHE", "0")
        return Transformer.from_pretrained(path, device="cpu", kernel=kernel)


def assert_same_model(got: Transformer, want: Transformer) -> None:
    got_modules, want_modules = dict(got.named_modules()), dict(want.named_modules())
    assert list(got_modules) == list(want_modules)
    for name, module in want_modules.items():
        assert type(got_modules[name]) is type(module), name
        if isinstance(module, DynInt8Linear):  # fbgemm's packed codes hold no tensors a state_dict would show
            g, w = got_modules[name].weight_codes(), module.weight_codes()
            assert torch.equal(g.codes, w.codes) and torch.equal(g.scales, w.scales), name
            assert got_modules[name].reduce_range == module.reduce_range
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for name, t in want_state.items():
        assert got_state[name].dtype == t.dtype and torch.equal(got_state[name], t), name
    assert torch.equal(got.inv_freq, want.inv_freq)
    with torch.inference_mode():
        assert torch.equal(got(TOKENS), want(TOKENS))


@pytest.mark.parametrize("kernel", ["int4-fbgemm", "int8", pytest.param("int4-dot", marks=needs_cc)])
def test_a_warm_load_gives_the_fresh_model_bit_for_bit(tmp_path, cache_dir, monkeypatch, kernel):
    path = write_q4_gguf(tmp_path / "tiny.gguf")
    want = fresh(path, kernel, monkeypatch)
    cold = Transformer.from_pretrained(path, device="cpu", kernel=kernel)  # converts, and writes the entry
    assert len(list(cache_dir.glob("*.pt"))) == 1
    assert_same_model(cold, want)

    def no_conversion(*args, **kwargs):
        raise AssertionError("a warm load converted the file's weights again")

    monkeypatch.setattr(build, "build_model", no_conversion)
    warm = Transformer.from_pretrained(path, device="cpu", kernel=kernel)
    assert_same_model(warm, want)
    assert warm.kernel_choice.plan == kernel
    tied = warm.output.weight is warm.tok_embeddings.weight if isinstance(warm.output, torch.nn.Linear) else None
    assert tied in (None, True)


def test_a_changed_file_is_converted_again(tmp_path, cache_dir, monkeypatch):
    path = write_q4_gguf(tmp_path / "tiny.gguf", seed=0)
    Transformer.from_pretrained(path, device="cpu", kernel="int4-fbgemm")
    before = path.stat()
    write_q4_gguf(path, seed=1)  # the same shapes, so the same size: only the time tells them apart
    assert path.stat().st_size == before.st_size
    if path.stat().st_mtime_ns == before.st_mtime_ns:  # a coarse file-system clock: as a later write would be
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    got = Transformer.from_pretrained(path, device="cpu", kernel="int4-fbgemm")
    assert_same_model(got, fresh(path, "int4-fbgemm", monkeypatch))
    assert len(list(cache_dir.glob("*.pt"))) == 1  # replaced, not added


def test_an_unreadable_entry_is_rebuilt(tmp_path, cache_dir, monkeypatch):
    path = write_q4_gguf(tmp_path / "tiny.gguf")
    Transformer.from_pretrained(path, device="cpu", kernel="int8")
    (entry,) = cache_dir.glob("*.pt")
    entry.write_bytes(b"not a torch file")
    want = fresh(path, "int8", monkeypatch)
    assert_same_model(Transformer.from_pretrained(path, device="cpu", kernel="int8"), want)
    monkeypatch.setattr(build, "build_model", None)  # and written again: the next load reads it
    assert_same_model(Transformer.from_pretrained(path, device="cpu", kernel="int8"), want)


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LLAMA3_WEIGHT_CACHE", "0")
    monkeypatch.chdir(tmp_path)
    path = write_q4_gguf(tmp_path / "tiny.gguf")
    Transformer.from_pretrained(path, device="cpu", kernel="int8")
    assert [p.name for p in tmp_path.rglob("*")] == ["tiny.gguf"]  # nothing written, anywhere
    monkeypatch.delenv("LLAMA3_WEIGHT_CACHE")  # by default: under XDG_CACHE_HOME
    Transformer.from_pretrained(path, device="cpu", kernel="int8")
    assert len(list((tmp_path / "xdg" / "llama3" / "weights").glob("*.pt"))) == 1


def test_a_float_load_is_not_cached(tmp_path, cache_dir):
    Transformer.from_pretrained(write_q4_gguf(tmp_path / "tiny.gguf"), device="cpu", quantize=None)
    assert not cache_dir.exists()


def test_background_prepack_copies_and_computes_as_packed_at_once():
    """DynInt8Linear prepacks in a thread: its output equals fbgemm's on a weight packed in the calling thread,
    and a copy taken before first use holds the packed weight, not the pending thread."""
    q = quantize(torch.randn(96, 64, generator=torch.Generator().manual_seed(0)), "int8")
    layer = DynInt8Linear(q, reduce_range=False)
    clone = copy.deepcopy(layer)
    weight = torch._make_per_channel_quantized_tensor(q.codes, q.scales.double(), torch.zeros(96, dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(weight, None)
    x = torch.randn(1, 64)
    want = torch.ops.quantized.linear_dynamic(x, packed, False)
    assert torch.equal(layer(x), want) and torch.equal(clone(x), want)


def tokenizer_state(tok) -> tuple:
    enc = tok._model
    return (enc._mergeable_ranks, enc._special_tokens, enc._pat_str, tok.name, tok.bos_id, tok.eos_id, tok.pad_id,
            tok.stop_tokens, tok.chat_template, tok.template_tokens, tok.n_words)  # fmt: skip


def test_a_cached_gguf_tokenizer_is_the_one_built_from_the_file(cache_dir, monkeypatch):
    from llama3.weights import gguf_tokenizer
    from llama3.weights.gguf import find_smollm2_gguf

    path = find_smollm2_gguf()
    cold = gguf_tokenizer.load_gguf_tokenizer(path)
    assert len(list(cache_dir.glob("*.tokenizer"))) == 1
    monkeypatch.setattr(gguf_tokenizer, "_encoding", None)  # a warm load builds nothing from the file
    warm = gguf_tokenizer.load_gguf_tokenizer(path)
    assert tokenizer_state(warm) == tokenizer_state(cold)
    text = "Hello <|im_end|> world 1234, ça va? 🦙\n\n  x"
    assert warm.encode(text, bos=True, allowed_special="all") == cold.encode(text, bos=True, allowed_special="all")
