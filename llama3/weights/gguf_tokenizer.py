"""The tokenizer stored in a GGUF file (`tokenizer.ggml.*` metadata) as our tiktoken `Tokenizer`.

    tok = load_gguf_tokenizer(path)        # llama3.Tokenizer (tiktoken)

The file's header is read by `llama3.weights.gguf`; mapping a byte-level BPE vocabulary and its merge list
to tiktoken ranks follows `llama3.text.bpe`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llama3.quant.ggml import GGUFError
from llama3.text.bpe import GPT2_PAT_STR, TokenizerError, bytes_to_unicode, without_missing_bytes
from llama3.text.tokenizer import LLAMA3_PAT_STR, Tokenizer
from llama3.weights.gguf import _GGUF, _open

# Split patterns by `tokenizer.ggml.pre`, with Hugging Face's semantics (the tokenizers the GGUF was
# converted from). tiktoken applies one regex, so SmolLM2's two-step pre-tokenizer (tokenizer.json:
# Sequence[Digits(individual_digits), ByteLevel(use_regex)]; llama.cpp: "\p{N}" then the GPT-2
# regex) is folded into one: every digit is a piece of its own, and because the GPT-2 regex then sees
# each digit as the end of its input, `\s+(?!\S)` ("whitespace not followed by a non-space") also
# accepts a digit after the whitespace: "a   1" splits as "a", "   ", "1", not "a", "  ", " ", "1".
_SMOLLM_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"


def _pat_str(pre: str, path: Path) -> str:
    patterns = {
        "llama-bpe": LLAMA3_PAT_STR,  # what llama.cpp's converter writes for Llama 3 / 3.1 / 3.2
        "llama3": LLAMA3_PAT_STR,
        "llama-v3": LLAMA3_PAT_STR,
        "smollm": _SMOLLM_PAT_STR,
        "gpt-2": GPT2_PAT_STR,
    }
    if pre not in patterns:
        raise GGUFError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(sorted(patterns))})"
        )
    return patterns[pre]


# llama.cpp token types (gguf TokenType)
_CONTROL, _USER_DEFINED, _UNKNOWN, _UNUSED = 3, 4, 2, 5


# Besides the file's eos: tokens that end a turn or a document in the chat formats we know (the eos
# of an Instruct GGUF is often only one of them). Llama 3.0 gives {128001, 128009}, 3.1 adds 128008.
_END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>")


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The byte-level BPE tokenizer (`tokenizer.ggml.model` "gpt2") stored in a GGUF file, on tiktoken.

    tiktoken's ranks are its token ids, and it merges the adjacent pair whose merged bytes have the
    lowest rank; llama.cpp and Hugging Face apply the file's merge list in order. The two agree when
    merged tokens' ids rise along the merge list, which is checked (a file where they do not is
    refused). Control, user-defined and unused tokens become tiktoken special tokens (matched in text
    only when a caller allows it). Stop tokens: the eos, `eot`/`eom` ids if the file has them, and
    whichever of `_END_TOKENS` the vocabulary has.

    What this builds from the file is kept in the weight cache (`llama3.weights.cache`): mapping 49,152 tokens
    and checking 48,900 merges is a fifth of a second of a cold start, reading it back a few milliseconds.
    """
    from llama3.weights import cache

    entry = cache.entry_for(Path(path), {"tokenizer": "gguf"}, ".tokenizer", max_bytes=None)
    encoding = entry and cache.read_tokenizer(*entry)
    if not encoding:
        encoding = _encoding(_open(path))
        if entry:
            cache.write_tokenizer(*entry, encoding)
    return Tokenizer.from_encoding(**encoding)


def _encoding(f: _GGUF) -> dict:
    """The arguments of `Tokenizer.from_encoding` for the file's vocabulary (see `load_gguf_tokenizer`)."""
    model = f.get("tokenizer.ggml.model", None)
    if model != "gpt2":
        raise GGUFError(
            f"{f.path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2', as in Llama 3 and "
            "SmolLM2) is supported"
        )
    pat_str = _pat_str(f.get("tokenizer.ggml.pre", "default"), f.path)
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    types: list[int] = f.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"{f.path}: {len(tokens)} tokens but {len(types)} token types")

    alphabet = bytes_to_unicode()
    to_latin1 = str.maketrans({char: byte for byte, char in alphabet.items()})  # a token's chars -> its bytes
    outside_alphabet = re.compile("[^" + re.escape("".join(alphabet.values())) + "]")
    ranks: dict[bytes, int] = {}
    special: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (_CONTROL, _USER_DEFINED, _UNKNOWN, _UNUSED):
            if token in special:
                raise GGUFError(f"{f.path}: special token {token!r} appears twice (ids {special[token]} and {i})")
            special[token] = i
            continue
        # Ordinary tokens are spelled in GPT-2's byte alphabet; a token that is not (a converter quirk)
        # stands for its own UTF-8 text, as in transformers' GGUF reader.
        if not outside_alphabet.search(token):
            token_bytes = token.translate(to_latin1).encode("latin-1")
        else:
            token_bytes = token.encode("utf-8")
        if token_bytes in ranks:
            raise GGUFError(f"{f.path}: tokens {ranks[token_bytes]} and {i} are the same bytes {token_bytes!r}")
        ranks[token_bytes] = i
    _check_merge_order(f, {t: i for i, t in enumerate(tokens)})
    try:
        pat_str = without_missing_bytes(pat_str, ranks, f.path)
    except TokenizerError as e:
        raise GGUFError(str(e)) from None

    def special_name(key: str) -> str | None:
        token_id = f.get(f"tokenizer.ggml.{key}", None)
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens) or tokens[token_id] not in special:
            raise GGUFError(f"{f.path}: tokenizer.ggml.{key} {token_id} is not a control token")
        return tokens[token_id]

    bos, eos, pad = special_name("bos_token_id"), special_name("eos_token_id"), special_name("padding_token_id")
    stop = {special[name] for name in (eos, special_name("eot_token_id"), special_name("eom_token_id")) if name}
    stop |= {special[name] for name in _END_TOKENS if name in special}
    unk_id = f.get("tokenizer.ggml.unknown_token_id", -1)
    unk = tokens[unk_id] if 0 <= unk_id < len(tokens) and tokens[unk_id] in special else None
    # the strings a chat template sees, as transformers' GGUF reader maps them
    template_tokens = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    return dict(
        name=f.path.name,
        mergeable_ranks=ranks,
        special_tokens=special,
        pat_str=pat_str,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        stop_tokens=sorted(stop),
        chat_template=f.get("tokenizer.chat_template", None),
        template_tokens={k: v for k, v in template_tokens.items() if v is not None},
    )


def _check_merge_order(f: _GGUF, ids: dict[str, int]) -> None:
    """Refuses a merge list tiktoken's rank-ordered merging would not reproduce (see load_gguf_tokenizer).

    A token may be the result of several merges (vocabularies converted from tiktoken list every split
    of it); its first merge counts, and ids must not fall along the list.
    """
    last = -1
    for n, merge in enumerate(f.get("tokenizer.ggml.merges", [])):
        left, sep, right = merge.partition(" ")
        merged = ids.get(left + right)
        if not sep or merged is None or left not in ids or right not in ids:
            raise GGUFError(f"{f.path}: merge {n} {merge!r} does not join two tokens into a token of the vocabulary")
        if merged < last:
            raise GGUFError(
                f"{f.path}: merge {n} {merge!r} makes token {merged} after a merge made token {last}: merge order "
                "and token ids disagree, so tiktoken's rank-ordered merging cannot reproduce this vocabulary"
            )
        last = merged


__all__ = ["load_gguf_tokenizer"]
