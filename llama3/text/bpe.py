"""Byte-level BPE vocabularies (a Hugging Face tokenizer.json, a GGUF file's) as tiktoken ranks.

A byte-level BPE vocabulary spells its tokens in GPT-2's byte alphabet (`bytes_to_unicode`) and comes with
a merge list applied in order; tiktoken instead merges the adjacent pair whose merged token has the lowest
rank. Taking the token ids as ranks reproduces the merge list when the ids rise along it, which is checked.
tiktoken also needs every byte of a piece to be a token; `without_missing_bytes` keeps the bytes a
vocabulary lacks out of the split pattern.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from llama3.checks import read_json_object

_WORD_OR_SPACE = re.compile(r"[\w\s]")  # letters, digits, _ and whitespace (str.isalnum / isspace)

# GPT-2's split pattern: what a tokenizer.json `ByteLevel` pre-tokenizer with `use_regex: true` applies.
GPT2_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


class TokenizerError(ValueError):
    """A tokenizer file we cannot read, or a request the vocabulary cannot serve."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in.

    Bytes that are printable Latin-1 stand for themselves; the other 68 (control characters, space,
    and a few more) are moved, in byte order, to the characters from U+0100 on.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, moved = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + moved)
            moved += 1
    return mapping


def encoding_from_tokenizer_json(path: Path) -> tuple[dict[bytes, int], dict[str, int], str]:
    """(mergeable ranks, special tokens, split pattern) equivalent to a byte-level BPE tokenizer.json.

    tiktoken merges the adjacent pair whose merged token has the lowest id; Hugging Face's BPE applies
    the listed merges in list order. So the ids must rise along the merge list (checked: a file where
    they do not is refused rather than tokenized differently). tiktoken also merges a pair the list
    does not name when the two together are a token. Vocabularies converted from tiktoken list every
    such pair; trained ones do not, but their merge order makes the results agree in practice
    (SmolLM2's 49,152-token vocabulary gave identical ids on a 130k-token test), not by construction.
    """
    data = read_json_object(path, TokenizerError)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: model type {model.get('type')!r} is not supported (need byte-level BPE)")
    if data.get("normalizer") is not None:
        raise TokenizerError(f"{path}: a normalizer ({data['normalizer'].get('type')}) is not supported")
    pat_str = _pat_str_from_pre_tokenizer(data.get("pre_tokenizer"), path)

    special_tokens = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    vocab: dict[str, int] = model["vocab"]
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, token_id in vocab.items():
        if token in special_tokens:
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = token_id
        except KeyError:
            raise TokenizerError(f"{path}: vocabulary entry {token!r} is not byte-level BPE") from None

    last = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = vocab.get(left + right)
        if merged is None or merged < last:
            raise TokenizerError(
                f"{path}: merge {left!r} + {right!r} is out of vocabulary-id order, so tiktoken ranks "
                "cannot reproduce this tokenizer"
            )
        last = merged
    return ranks, special_tokens, without_missing_bytes(pat_str, ranks, path)


def without_missing_bytes(pat_str: str, ranks: dict[bytes, int], path: Path) -> str:
    """`pat_str`, changed so that characters the vocabulary cannot spell are left out of every piece.

    tiktoken needs every byte of a piece to be a token, and panics (an uncatchable-by-`except Exception`
    PanicException) on one that is not. A trained vocabulary can lack bytes: SmolLM2's has no token for
    six ASCII control characters (0x04, 0x06, 0x13, 0x14, 0x16, 0x1d) nor for the UTF-8 lead bytes
    0xf1/0xf2 (unassigned planes 4-11). tiktoken skips text its regex does not match, so excluding
    those characters from the pattern's catch-all classes drops them, as Hugging Face's BPE (no unk
    token) drops such bytes. Two differences remain on such input: HF still merges across a dropped
    byte ("!\\x04!" -> "!!"), and for a 4-byte character it keeps the continuation bytes.
    """
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if not missing:
        return pat_str
    excluded = []
    for b in missing:
        if b < 0x80:
            first, last = b, b
        elif b < 0xC2 or b > 0xF4:
            if b <= 0xBF:  # a continuation byte: part of every non-ASCII character in its range
                raise TokenizerError(f"{path}: the vocabulary has no token for byte 0x{b:02x}, which UTF-8 text uses")
            continue  # 0xc0, 0xc1, 0xf5-0xff never occur in UTF-8
        elif b < 0xE0:  # lead byte of a 2-, 3- or 4-byte character: the code points it starts
            first = (b - 0xC0) << 6
            last = first + 0x3F
        elif b < 0xF0:
            first = (b - 0xE0) << 12
            last = first + 0xFFF
        else:
            first = (b - 0xF0) << 18
            last = first + 0x3FFFF
        # Letters, digits and whitespace are matched by other parts of the pattern; those cannot be dropped.
        # (`[\w\s]` finds every candidate, a superset, in one C scan of the range; each is then checked.)
        span = np.arange(first, last + 1, dtype="<u4").tobytes().decode("utf-32-le")
        for c in (m.group() for m in _WORD_OR_SPACE.finditer(span)):
            if c.isspace() and c not in "\x1c\x1d\x1e\x1f" or unicodedata.category(c)[0] in "LN":
                raise TokenizerError(
                    f"{path}: the vocabulary has no token for byte 0x{b:02x}, which the character {c!r} uses"
                )
        excluded.append(rf"\x{{{first:x}}}" if first == last else rf"\x{{{first:x}}}-\x{{{last:x}}}")
    exclusion = "".join(excluded)
    changed = pat_str.replace(r"[^\s\p{L}\p{N}]", rf"[^\s\p{{L}}\p{{N}}{exclusion}]")
    changed = changed.replace(r"[^\r\n\p{L}\p{N}]", rf"[^\r\n\p{{L}}\p{{N}}{exclusion}]")
    if changed == pat_str:
        raise TokenizerError(f"{path}: the vocabulary lacks bytes {[hex(b) for b in missing]}")
    return changed


def _pat_str_from_pre_tokenizer(pre: dict[str, Any] | None, path: Path) -> str:
    """The split regex of the two byte-level layouts in use: Llama 3's and GPT-2's."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    if (
        len(steps) == 1
        and steps[0]
        and steps[0].get("type") == "ByteLevel"
        and steps[0].get("use_regex", True)
        and not steps[0].get("add_prefix_space", False)
    ):
        return GPT2_PAT_STR
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and "Regex" in steps[0].get("pattern", {})
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert", False)
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space", False)
    ):
        return steps[0]["pattern"]["Regex"]
    raise TokenizerError(f"{path}: unsupported pre_tokenizer {json.dumps(pre)[:300]}")


__all__ = [
    "GPT2_PAT_STR",
    "TokenizerError",
    "bytes_to_unicode",
    "encoding_from_tokenizer_json",
    "without_missing_bytes",
]
