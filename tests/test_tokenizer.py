"""The tokenizer against independent references: Meta's published ids, Hugging Face `tokenizers` built
from the same file, tiktoken with its own file loader, and Meta's long-input splitting loop.

Runs offline: the Llama 3 tokenizer file comes from the `llama-models` package (found, never imported).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import pytest
import tiktoken
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken.load import load_tiktoken_bpe

from llama3.text.bpe import GPT2_PAT_STR
from llama3.text.tokenizer import (
    LLAMA3_PAT_STR,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    _split_like_meta,
    llama3_special_token_names,
)

LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that exercises every branch of the split pattern, and the byte-level edge cases.
CORPUS = [
    "Hello world",
    "This is a test sentence.",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 3; }\r\n",
    "日本語のテキストです。中文测试，简体字。한국어 문장입니다.",
    "emoji 🦙🔥👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 keycap 1️⃣",
    "spaces    between\t\ttabs\n\n\n  \n   trailing   ",
    "   leading spaces and a final newline\n",
    "numbers 1234567890 3.14159 1,000,000 12345678901234567890 ٣٤٥ ४५६",
    "I'm you're they've he'll she'd it's don't",
    "I'M YOU'RE THEY'VE HE'LL SHE'D IT'S DON'T We'Ll yOu'Re",
    "line one\r\nline two\r\n\r\nline four\rold mac\n",
    "naïve café résumé Ångström façade Straße",
    "مرحبا بالعالم שלום עולם नमस्ते दुनिया Привет мир Γειά σου",
    "https://example.com/path?query=1&b=two#frag user@example.org",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "∑_{i=1}^{n} x_i² ≤ ∞ ∀ε>0 ∃δ",
    "zero\u200bwidth\u200djoiner e\u0301 combining a\u0308",
    "nbsp\u00a0here ideographic\u3000space\u2028line sep\u0085nel",
    "\x00\x01\x1b[31mcontrol\x1b[0m\x7f",
    "<|begin_of_text|><|eot_id|> <|start_header_id|>user<|end_header_id|>",
    "",
    " ",
    "\n",
    "a",
]


def llama3_tokenizer_model() -> Path:
    spec = importlib.util.find_spec("llama_models")  # found, not imported: its dependencies are not installed
    assert spec is not None and spec.submodule_search_locations, "install llama-models==0.3.0 --no-deps"
    return Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"


@pytest.fixture(scope="module")
def model_path() -> Path:
    path = llama3_tokenizer_model()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LLAMA3_TOKENIZER_SHA256, f"unexpected file {path}"
    return path


@pytest.fixture(scope="module")
def tok(model_path) -> Tokenizer:
    return Tokenizer(model_path)


@pytest.fixture(scope="module")
def hf_converter(model_path):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    return TikTokenConverter(vocab_file=str(model_path), pattern=LLAMA3_PAT_STR)


@pytest.fixture(scope="module")
def hf_plain(hf_converter):
    """Hugging Face `tokenizers` BPE from the same ranks, with no added tokens: all text is plain."""
    return hf_converter.converted()


@pytest.fixture(scope="module")
def tiktoken_ref(model_path) -> tiktoken.Encoding:
    """tiktoken with tiktoken's own file loader: the engine Meta's tokenizer calls, without our code."""
    return tiktoken.Encoding(
        "ref", pat_str=LLAMA3_PAT_STR, mergeable_ranks=load_tiktoken_bpe(str(model_path)), special_tokens={}
    )


def meta_pieces(text: str, max_chars: int = 400_000, max_run: int = 25_000):
    """Meta's splitting as its tokenizer.py describes it: a walk over every character."""
    for start in range(0, len(text), max_chars):
        chunk = text[start : start + max_chars]
        run, run_is_space, piece_start = 0, chunk[0].isspace(), 0
        for i, char in enumerate(chunk):
            if char.isspace() != run_is_space:
                run, run_is_space = 1, char.isspace()
            else:
                run += 1
                if run > max_run:
                    yield chunk[piece_start:i]
                    piece_start, run = i, 1
        yield chunk[piece_start:]


# -- the file and the golden ids ------------------------------------------------------------------------


def test_tokenizer_file_is_the_published_one():
    digest = hashlib.sha256(llama3_tokenizer_model().read_bytes()).hexdigest()
    assert digest == LLAMA3_TOKENIZER_SHA256


def test_vocabulary_size_and_special_ids(tok):
    assert tok.n_words == 128256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    assert tok.stop_tokens == [128001, 128008, 128009]
    assert len(tok.special_tokens) == 256 and sorted(tok.special_tokens.values()) == list(range(128000, 128256))
    # Llama 3.1's names, as Hugging Face's Llama-3.1 tokenizer.json has them
    expected = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
        "<|finetune_right_pad_id|>": 128004, "<|reserved_special_token_2|>": 128005,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
        "<|eot_id|>": 128009, "<|python_tag|>": 128010, "<|reserved_special_token_3|>": 128011,
        "<|reserved_special_token_247|>": 128255,
    }  # fmt: skip
    assert {name: tok.special_id(name) for name in expected} == expected


def test_llama30_names_number_the_reserved_tokens_differently():
    names = llama3_special_token_names("3.0")
    assert names[4] == "<|reserved_special_token_2|>" and names[8] == "<|reserved_special_token_4|>"
    assert names[9] == "<|eot_id|>" and names[-1] == "<|reserved_special_token_250|>"
    assert len(set(names)) == 256 == len(set(llama3_special_token_names("3.1")))


def test_golden_ids_from_meta_and_design(tok, hf_plain):
    assert tok.encode("Hello world") == [9906, 1917]
    # Meta's llama3 test_tokenizer.py
    expected = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == expected
    for text, ids in {"system": [9125], "user": [882], "assistant": [78191], "\n\n": [271]}.items():
        assert tok.encode(text) == ids
    # and the independent implementation agrees on them
    assert hf_plain.encode("This is a test sentence.", add_special_tokens=False).ids == expected[1:-1]
    assert tok.decode(expected) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


def test_special_id_rejects_unknown_names_helpfully(tok):
    with pytest.raises(TokenizerError, match="did you mean.*<\\|eot_id\\|>"):
        tok.special_id("<|eot|>")
    assert issubclass(TokenizerError, ValueError)


def test_stop_tokens_can_be_overridden(model_path):
    assert Tokenizer(model_path, stop_tokens=[128009]).stop_tokens == [128009]
    with pytest.raises(TokenizerError, match="128256"):
        Tokenizer(model_path, stop_tokens=[128256])


def test_rejects_a_file_that_is_not_tiktoken(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("SGVsbG8= 0\nnot base64 at all\n")
    with pytest.raises(TokenizerError, match=r"tokenizer.model:2"):
        Tokenizer(bad)


# -- parity with independent implementations --------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_hf_tokenizers(tok, hf_plain, text):
    assert tok.encode(text) == hf_plain.encode(text, add_special_tokens=False).ids


def test_encode_matches_hf_on_a_long_mixed_document(tok, hf_plain):
    document = "\n".join(CORPUS) * 50  # ~60k characters, longer than one of Meta's 25k-character runs
    assert tok.encode(document) == hf_plain.encode(document, add_special_tokens=False).ids


@HYPOTHESIS
@given(st.text(max_size=200))
def test_encode_matches_hf_on_arbitrary_text(tok, hf_plain, text):
    assert tok.encode(text) == hf_plain.encode(text, add_special_tokens=False).ids


@HYPOTHESIS
@given(st.text(max_size=300))
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@HYPOTHESIS
@given(st.lists(st.sampled_from(["<|eot_id|>", "<|begin_of_text|>", "<|python_tag|>", "a", " ", "\n", "é"])))
def test_decode_inverts_encode_with_specials_allowed(tok, parts):
    text = "".join(parts)
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


# -- special-token text ---------------------------------------------------------------------------------


def test_special_token_text_is_plain_text_by_default(tok, hf_plain):
    for name in tok.special_tokens:
        ids = tok.encode(name)
        assert max(ids) < 128000, name
        assert ids == hf_plain.encode(name, add_special_tokens=False).ids
        assert tok.decode(ids) == name


def test_allowed_special_turns_only_the_listed_names_into_specials(tok):
    text = "<|begin_of_text|>hi<|eot_id|>"
    plain_bos = tok.encode("<|begin_of_text|>")
    assert tok.encode(text, allowed_special={"<|eot_id|>"}) == plain_bos + tok.encode("hi") + [128009]
    assert tok.encode(text, allowed_special="all") == [128000, *tok.encode("hi"), 128009]
    with pytest.raises(TokenizerError, match="not a special token"):
        tok.encode(text, allowed_special={"<|no_such_token|>"})
    with pytest.raises(TypeError):
        tok.encode(text, allowed_special="<|eot_id|>")


# -- long and pathological input -------------------------------------------------------------------------


PATHOLOGICAL = {
    "1M spaces": " " * 1_000_000,
    "500k a": "a" * 500_000,
    "newlines then text": "\n" * 300_000 + "x",
    "long runs across the 400k cut": ("ab" * 20_000 + " " * 30_000) * 7 + "end",
    "ideographic spaces": "\u3000" * 60_000 + "字",
    "python-only whitespace": "x" + "\x1c" * 60_000,  # str.isspace() but not regex \s in tiktoken
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_long_input_is_split_like_meta_and_fast(tok, tiktoken_ref, name):
    text = PATHOLOGICAL[name]
    start = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - start
    expected = [i for piece in meta_pieces(text) for i in tiktoken_ref.encode_ordinary(piece)]
    assert ids == expected
    assert elapsed < 10, f"{name}: {elapsed:.1f}s"


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=" \t\n\x1c\u3000ab字", max_size=60),
    st.integers(min_value=1, max_value=9),
    st.integers(min_value=1, max_value=5),
)
def test_split_points_match_meta_loop(text, max_chars, max_run):
    assert list(_split_like_meta(text, max_chars, max_run)) == list(meta_pieces(text, max_chars, max_run))


# -- decoding ------------------------------------------------------------------------------------------


def test_decode_rejects_ids_out_of_range(tok):
    for bad in (-1, 128256, 10**9):
        with pytest.raises(TokenizerError, match=rf"{bad}.*128256"):
            tok.decode([1, bad])
    with pytest.raises(TokenizerError, match="128256"):
        tok.stream_decoder().push(128256)


def test_decode_accepts_tensors(tok):
    assert tok.decode(torch.tensor([9906, 1917])) == "Hello world"
    assert tok.decode_bytes((9906, 1917)) == b"Hello world"


STREAM_TEXTS = ["🦙 llamas 🦙🦙", "齉龘靐 鬱", "饕餮 魑魅魍魉", "👨‍👩‍👧‍👦 family", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀𓀁", "쀍 뷁"]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder_holds_back_partial_characters(tok, text):
    ids = tok.encode(text)
    # the case worth testing: some token is not valid UTF-8 on its own
    assert any(not _is_utf8(tok.decode_bytes([i])) for i in ids), "pick text whose characters span tokens"
    decoder = tok.stream_decoder()
    assert isinstance(decoder, StreamDecoder)
    pieces = [decoder.push(i) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == tok.decode(ids) == text


@HYPOTHESIS
@given(st.lists(st.integers(min_value=0, max_value=128255), max_size=40))
def test_stream_decoder_concatenates_to_decode(tok, ids):
    decoder = tok.stream_decoder()
    streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert streamed == tok.decode(ids)


def test_stream_decoder_flushes_an_incomplete_character(tok):
    partial = next(i for i in tok.encode("🦙") if not _is_utf8(tok.decode_bytes([i])))
    decoder = tok.stream_decoder()
    assert decoder.push(partial) == ""
    assert decoder.flush() == tok.decode([partial]) and "\ufffd" in tok.decode([partial])
    assert decoder.push(9906) == "Hello"  # flush starts over


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# -- from_pretrained -------------------------------------------------------------------------------------


def _llama30_names() -> list[str]:
    """Llama 3.0's names as its tokenizer.json lists them (written out, not from llama3.tokenizer)."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
             9: "<|eot_id|>"}  # fmt: skip
    reserved = iter(range(256))
    return [named[i] if i in named else f"<|reserved_special_token_{next(reserved)}|>" for i in range(256)]


@pytest.fixture(scope="module")
def hf_json_dir(tmp_path_factory, hf_converter):
    """A repo directory holding only a tokenizer.json written by Hugging Face `tokenizers` (3.0 names)."""
    from tokenizers import AddedToken

    hf = hf_converter.converted()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in _llama30_names()])
    assert hf.token_to_id("<|eot_id|>") == 128009
    directory = tmp_path_factory.mktemp("llama3-json")
    hf.save(str(directory / "tokenizer.json"))
    return directory


def test_from_pretrained_tokenizer_json_matches_the_model_file(tok, hf_json_dir):
    from_json = Tokenizer.from_pretrained(hf_json_dir)
    assert from_json.n_words == 128256
    for text in [*CORPUS, PATHOLOGICAL["long runs across the 400k cut"]]:
        assert from_json.encode(text) == tok.encode(text)
    ordinary = range(128000)
    assert [from_json.token_bytes(i) for i in ordinary] == [tok.token_bytes(i) for i in ordinary]
    # names are the file's own (Llama 3.0): no eom, no pad, stop tokens from the names present
    assert from_json.special_id("<|reserved_special_token_2|>") == 128004
    assert "<|eom_id|>" not in from_json.special_tokens
    assert (from_json.bos_id, from_json.eos_id, from_json.pad_id) == (128000, 128001, -1)
    assert from_json.stop_tokens == [128001, 128009]
    assert from_json.chat_template is None


def test_from_pretrained_reads_generation_and_tokenizer_config(tmp_path, model_path):
    repo = tmp_path / "repo"
    (repo / "original").mkdir(parents=True)
    (repo / "original" / "tokenizer.model").symlink_to(model_path)  # the licensed file is not copied
    added = {str(128000 + i): {"content": name, "special": True} for i, name in enumerate(_llama30_names())}
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = {"added_tokens_decoder": added, "chat_template": template, "eos_token": "<|eot_id|>"}
    (repo / "tokenizer_config.json").write_text(json.dumps(config))
    # the file's list, though these 3.0 names alone would give [128001, 128009]
    (repo / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    tokenizer = Tokenizer.from_pretrained(repo)
    assert tokenizer.stop_tokens == [128001, 128008, 128009]
    assert tokenizer.chat_template == template
    assert tokenizer.eos_id == 128001  # Meta's end of text, though the Instruct config names <|eot_id|>
    assert tokenizer.special_id("<|reserved_special_token_4|>") == 128008
    assert tokenizer.encode("Hello world") == [9906, 1917]

    (repo / "generation_config.json").write_text(json.dumps({"eos_token_id": 128001}))  # an int
    assert Tokenizer.from_pretrained(repo).stop_tokens == [128001]


def test_from_pretrained_a_repo_id_from_the_offline_cache(tmp_path, model_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    snapshot = cache / "models--test-org--tiny-llama" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (cache / "models--test-org--tiny-llama" / "refs").mkdir()
    (cache / "models--test-org--tiny-llama" / "refs" / "main").write_text(commit)
    (snapshot / "tokenizer.model").symlink_to(model_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    tokenizer = Tokenizer.from_pretrained("test-org/tiny-llama")
    assert tokenizer.encode("Hello world") == [9906, 1917]
    assert tokenizer.stop_tokens == [128001, 128008, 128009]  # no generation_config.json: 3.1 defaults


def test_from_pretrained_errors(tmp_path, model_path):
    with pytest.raises(TokenizerError, match="no such directory"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="is a file"):
        Tokenizer.from_pretrained(model_path)
    with pytest.raises(TokenizerError, match="no tiktoken tokenizer.model and no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


# -- a generic byte-level BPE (the GGUF / SmolLM2 path) ---------------------------------------------------

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_hf_tokenizer():
    """SmolLM2's layout in miniature, trained by Hugging Face `tokenizers`: specials at ids 0-2, the 256
    byte symbols, then the learned merges; GPT-2's byte-level pre-tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=TINY_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    hf.train_from_iterator([*CORPUS, "You are a helpful assistant. The user asks; the system answers."] * 3, trainer)
    assert hf.token_to_id("<|im_end|>") == 2 and hf.get_vocab_size() > 400
    return hf


def tiny_ranks(hf) -> dict[bytes, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return {bytes(byte_of[c] for c in t): i for t, i in hf.get_vocab().items() if t not in TINY_SPECIALS}


def test_from_encoding_matches_hf_on_a_gpt2_style_vocab():
    hf = tiny_hf_tokenizer()
    ours = Tokenizer.from_encoding(
        name="tiny", mergeable_ranks=tiny_ranks(hf), special_tokens={t: i for i, t in enumerate(TINY_SPECIALS)},
        pat_str=GPT2_PAT_STR, bos_token=None, eos_token="<|endoftext|>",
    )  # fmt: skip
    assert ours.n_words == hf.get_vocab_size()
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.stop_tokens) == (-1, 0, -1, [0])
    for text in [*CORPUS, "\n".join(CORPUS)]:
        plain = text.replace("<|", "< |")  # HF reads special-token text as specials
        assert ours.encode(plain) == hf.encode(plain).ids, plain
    assert ours.encode("hello", eos=True)[-1] == 0
    with pytest.raises(TokenizerError, match="no bos"):
        ours.encode("hello", bos=True)


def test_from_pretrained_gpt2_style_tokenizer_json(tmp_path):
    hf = tiny_hf_tokenizer()
    hf.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_pretrained(tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.stop_tokens, ours.chat_template) == (1, 2, [2], template)
    for text in CORPUS:
        plain = text.replace("<|", "< |")  # HF would read special text as specials
        assert ours.encode(plain) == hf.encode(plain).ids
        assert ours.decode(ours.encode(text)) == text


def test_tokenizer_json_with_merges_out_of_id_order_is_refused(tmp_path):
    data = json.loads(tiny_hf_tokenizer().to_str())
    data["model"]["merges"] = data["model"]["merges"][::-1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="out of vocabulary-id order"):
        Tokenizer.from_pretrained(tmp_path)
