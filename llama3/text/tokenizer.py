"""The Llama 3 tokenizer: byte-level BPE over 128,000 tiktoken ranks, plus 256 special tokens.

Llama 3 ships its vocabulary as a tiktoken file (`tokenizer.model`: one base64 token and its rank per
line), so encoding is tiktoken's BPE with Meta's split pattern. What this module adds around tiktoken:

- the special tokens, which the file does not contain (Meta's tokenizer appends them in code),
- Meta's pre-splitting of long input (400k-character chunks, whitespace / non-whitespace runs of at
  most 25k characters), done with a few regex probes instead of a Python loop over every character,
- loading from a Hugging Face repo: the tiktoken file when the repo has one, else the byte-level BPE
  in `tokenizer.json` mapped back to tiktoken ranks (`llama3.text.bpe`),
- a streaming decoder that never cuts a UTF-8 character in half.

Special-token names. The ranks file carries no names, and Llama 3.0 and 3.1 name the same ids
differently: 3.1 renamed 128004 `<|finetune_right_pad_id|>`, 128008 `<|eom_id|>`, 128010
`<|python_tag|>`, and so renumbered the reserved tokens (`<|reserved_special_token_2|>` is 128004 in
3.0, 128005 in 3.1). `Tokenizer(path)` uses the 3.1 names as Hugging Face's Llama 3.1 / 3.2
tokenizer.json writes them; `from_pretrained` uses the names the repo's own config lists. Lookups by a
name from the other version are not aliased: for a reserved token an alias would silently give the
wrong id in one of the two versions. The names that matter (`<|begin_of_text|>`,
`<|end_of_text|>`, `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`) are the same in both.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import difflib
import functools
import os
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import tiktoken

from llama3.checks import read_json_object
from llama3.text.bpe import TokenizerError, encoding_from_tokenizer_json

# Meta's split pattern (meta-llama/llama3 tokenizer.py).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


NUM_SPECIAL_TOKENS = 256


# Meta's limits: tiktoken's regex (an old version panicked above ~400k characters) and its BPE slow
# down badly on very long pieces, so input is cut into chunks and runs before it reaches tiktoken.
MAX_ENCODE_CHARS = 400_000


MAX_RUN_CHARS = 25_000


_BOS, _EOS = "<|begin_of_text|>", "<|end_of_text|>"


_PAD = "<|finetune_right_pad_id|>"


# Files `from_pretrained` needs, and nothing else (a model repo holds gigabytes of weights).
_TOKENIZER_FILES = [
    "original/tokenizer.model",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
]


def llama3_special_token_names(version: Literal["3.0", "3.1"] = "3.1") -> list[str]:
    """The 256 special-token names, in id order from 128000, as the given Llama release names them."""
    if version == "3.0":
        named = {0: _BOS, 1: _EOS, 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "<|eot_id|>"}
    elif version == "3.1":
        named = {
            0: _BOS,
            1: _EOS,
            4: _PAD,
            6: "<|start_header_id|>",
            7: "<|end_header_id|>",
            8: "<|eom_id|>",
            9: "<|eot_id|>",
            10: "<|python_tag|>",
        }
    else:
        raise ValueError(f"unknown Llama version {version!r}; expected '3.0' or '3.1'")
    names, reserved = [], 0
    for offset in range(NUM_SPECIAL_TOKENS):
        if offset in named:
            names.append(named[offset])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Reads a tiktoken BPE file: one `<base64 token> <rank>` per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as e:
                raise TokenizerError(f"{path}:{line_no}: expected '<base64 token> <rank>', got {line[:80]!r}") from e
            if len(ranks) != line_no:
                raise TokenizerError(f"{path}:{line_no}: token {token_b64.decode()} appears twice")
    if set(ranks.values()) != set(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


def _is_tiktoken_file(path: Path) -> bool:
    """True when the first line looks like tiktoken's format (a SentencePiece .model is binary protobuf)."""
    with open(path, "rb") as f:
        first = f.readline(1024).split()
    try:
        return len(first) == 2 and bool(base64.b64decode(first[0], validate=True)) and int(first[1]) >= 0
    except (ValueError, binascii.Error):
        return False


def _split_like_meta(text: str, max_chars: int = MAX_ENCODE_CHARS, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """Yields the pieces Meta's `encode` hands to tiktoken, cut at exactly the same places.

    Meta cuts the text every `max_chars` characters, then walks each chunk character by character and
    cuts a run of whitespace (or of non-whitespace) every `max_run` characters. That loop costs about
    as much as tiktoken's whole encode, so here the runs are found with regexes instead.
    """
    for start in range(0, len(text), max_chars):
        chunk = text[start : start + max_chars]
        bounds = [0, *_long_run_cuts(chunk, max_run), len(chunk)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            yield chunk[a:b]


def _long_run_cuts(chunk: str, max_run: int) -> list[int]:
    """Positions where Meta's loop cuts `chunk`: every `max_run` characters into a longer run.

    A run of more than `max_run` characters covers some multiple of `max_run`, so probing the run
    around those few positions tells cheaply (and without false negatives) whether there is any;
    only then is the chunk scanned.
    """
    if not any(_run_length_around(chunk, p, max_run) > max_run for p in range(max_run, len(chunk), max_run)):
        return []
    cuts = []
    for run in _long_run_regex(max_run).finditer(chunk):
        cuts.extend(range(run.start() + max_run, run.end(), max_run))
    return cuts


_WHITESPACE_RUN = re.compile(r"\s*")  # `re`'s \s is str.isspace(), the test Meta's loop uses


_NON_WHITESPACE_RUN = re.compile(r"\S*")


def _run_length_around(text: str, i: int, max_run: int) -> int:
    """Length of the run containing text[i], counted at most `max_run` + 1 characters either way."""
    run = _WHITESPACE_RUN if text[i].isspace() else _NON_WHITESPACE_RUN
    right = run.match(text, i, i + max_run + 1).end() - i
    left = run.match(text[max(0, i - max_run - 1) : i][::-1]).end()
    return left + right


@functools.lru_cache(maxsize=4)
def _long_run_regex(max_run: int) -> re.Pattern[str]:
    # The lookbehinds make each run start the only place a match is tried, so the scan is linear.
    n = max_run + 1
    return re.compile(rf"(?<!\s)\s{{{n},}}|(?<!\S)\S{{{n},}}")


class Tokenizer:
    """Text <-> token ids with tiktoken, Llama 3's way (and, via `from_encoding`, other byte-level BPEs).

    Special-token text in the input of `encode` ("<|eot_id|>" typed by a user) is plain text unless it
    is listed in `allowed_special`: prompts must not be able to forge control tokens.
    """

    n_words: int
    bos_id: int  # -1 when the vocabulary has none
    eos_id: int  # -1 when the vocabulary has none
    pad_id: int  # -1 when the vocabulary has none
    stop_tokens: list[int]
    special_tokens: dict[str, int]
    chat_template: str | None
    template_tokens: dict[str, str]  # what a chat template sees as bos_token, eos_token, pad_token, unk_token

    def __init__(self, model_path: str | os.PathLike, *, stop_tokens: list[int] | None = None):
        """Loads a Llama 3 tiktoken file; the specials get the Llama 3.1 names (see the module doc)."""
        ranks = load_tiktoken_ranks(model_path)
        names = llama3_special_token_names("3.1")
        self._setup(
            name=Path(model_path).name,
            mergeable_ranks=ranks,
            special_tokens={name: len(ranks) + i for i, name in enumerate(names)},
            pat_str=LLAMA3_PAT_STR,
            bos_token=_BOS,
            eos_token=_EOS,
            pad_token=_PAD,
            stop_tokens=stop_tokens,
            chat_template=None,
            template_tokens=None,
        )

    @classmethod
    def from_encoding(
        cls,
        *,
        name: str,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        pat_str: str,
        bos_token: str | None,
        eos_token: str | None,
        stop_tokens: list[int] | None = None,
        chat_template: str | None = None,
        pad_token: str | None = None,
        template_tokens: dict[str, str] | None = None,
    ) -> Tokenizer:
        """Any byte-level BPE given as tiktoken ranks (= token ids), e.g. a GGUF file's vocabulary.

        A vocabulary that comes with a merge list (GGUF, tokenizer.json) maps to ranks when the merged
        tokens' ids rise along that list; see `llama3.text.bpe` for how exact that is.

        `bos_token`, `eos_token` and `pad_token` name entries of `special_tokens`. Without
        `stop_tokens`, generation stops at the eos token, and at `<|eot_id|>` / `<|eom_id|>` if the
        vocabulary has them. `template_tokens` ({"bos_token": ..., "eos_token": ..., ...}) are the strings
        a chat template sees under those names, as transformers passes them; by default the bos, eos and
        pad names.
        """
        tokenizer = cls.__new__(cls)
        tokenizer._setup(
            name=name,
            mergeable_ranks=mergeable_ranks,
            special_tokens=special_tokens,
            pat_str=pat_str,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            stop_tokens=stop_tokens,
            chat_template=chat_template,
            template_tokens=template_tokens,
        )
        return tokenizer

    def _setup(
        self,
        *,
        name: str,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        pat_str: str,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None,
        stop_tokens: list[int] | None,
        chat_template: str | None,
        template_tokens: dict[str, str] | None,
    ) -> None:
        self.name = name
        self.special_tokens = dict(special_tokens)
        taken = set(mergeable_ranks.values())
        clashes = sorted(i for i in self.special_tokens.values() if i in taken)
        if clashes:
            raise TokenizerError(f"{name}: special-token ids {clashes[:8]} are also ordinary token ids")
        all_ids = taken | set(self.special_tokens.values())
        self.n_words = max(all_ids) + 1
        # Ids in [0, n_words) that name no token (a vocabulary with holes); decode rejects them.
        self._holes = frozenset(range(self.n_words)) - all_ids if len(all_ids) != self.n_words else frozenset()
        self._model = tiktoken.Encoding(
            name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self.bos_id = -1 if bos_token is None else self.special_id(bos_token)
        self.eos_id = -1 if eos_token is None else self.special_id(eos_token)
        self.pad_id = self.special_tokens.get(pad_token, -1) if pad_token else -1
        if stop_tokens is None:
            stop_tokens = [self.eos_id] if self.eos_id >= 0 else []
            stop_tokens += [self.special_tokens[t] for t in ("<|eom_id|>", "<|eot_id|>") if t in self.special_tokens]
        self.stop_tokens = sorted({self._check_id(i) for i in stop_tokens})
        self.chat_template = chat_template
        if template_tokens is None:
            named = {
                "bos_token": bos_token,
                "eos_token": eos_token,
                "pad_token": pad_token if self.pad_id >= 0 else None,
            }
            template_tokens = {k: v for k, v in named.items() if v is not None}
        self.template_tokens = dict(template_tokens)

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike) -> Tokenizer:
        """From a local directory or a Hugging Face repo id (only the tokenizer files are downloaded).

        Ranks come from the repo's tiktoken file (`original/tokenizer.model`, else `tokenizer.model`)
        when it has one, else from `tokenizer.json`. Special-token names come from the repo's config
        files; stop tokens from `generation_config.json`'s `eos_token_id`, exactly as transformers
        uses them; the chat template from `chat_template.jinja` or `tokenizer_config.json`, and the
        bos/eos/pad/unk strings that template sees from `tokenizer_config.json` as written there.
        bos/eos are Meta's (`<|begin_of_text|>` / `<|end_of_text|>`) for a Llama vocabulary even where
        an Instruct repo's config calls `<|eot_id|>` its eos: `encode(eos=True)` means end of text.
        Set HF_HUB_OFFLINE=1 to use only the local Hugging Face cache.
        """
        directory = _tokenizer_dir(src)
        config = read_json_object(directory / "tokenizer_config.json", TokenizerError, missing_ok=True)
        generation_config = read_json_object(directory / "generation_config.json", TokenizerError, missing_ok=True)
        stop_tokens = generation_config.get("eos_token_id")
        if isinstance(stop_tokens, int):
            stop_tokens = [stop_tokens]
        chat_template = _chat_template(directory, config)
        tokenizer_json = directory / "tokenizer.json"

        model_files = [directory / "original" / "tokenizer.model", directory / "tokenizer.model"]
        model_file = next((f for f in model_files if f.is_file() and _is_tiktoken_file(f)), None)
        if model_file is not None:
            ranks = load_tiktoken_ranks(model_file)
            specials = _llama3_specials_for(len(ranks), _added_token_names(config, tokenizer_json), model_file)
            pat_str = LLAMA3_PAT_STR
        elif tokenizer_json.is_file():
            ranks, specials, pat_str = encoding_from_tokenizer_json(tokenizer_json)
        else:
            raise TokenizerError(f"{directory}: no tiktoken tokenizer.model and no tokenizer.json")

        if _BOS in specials:
            bos, eos, pad = _BOS, _EOS, _PAD
        else:
            bos, eos, pad = (_token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
        return cls.from_encoding(
            name=str(src),
            mergeable_ranks=ranks,
            special_tokens=specials,
            pat_str=pat_str,
            bos_token=bos,
            eos_token=eos,
            pad_token=pad,
            stop_tokens=stop_tokens,
            chat_template=chat_template,
            template_tokens=_template_tokens(config, specials) if config else None,
        )

    # -- encoding ------------------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Token ids of `text`, optionally framed by bos / eos.

        Special-token text in `text` is encoded as the plain text it is, unless its name is in
        `allowed_special` ("all" allows every special token). Long input is cut where Meta's
        tokenizer cuts it, so the ids are Meta's for any input. Lone surrogates become U+FFFD.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        allowed = self._allowed_special(allowed_special)
        ids: list[int] = []
        if bos:
            ids.append(self._require(self.bos_id, "bos"))
        for piece in _split_like_meta(text):
            if allowed:
                ids += self._model.encode(piece, allowed_special=allowed, disallowed_special=())
            else:
                ids += self._model.encode_ordinary(piece)
        if eos:
            ids.append(self._require(self.eos_id, "eos"))
        return ids

    def _allowed_special(self, allowed_special: Literal["all"] | Collection[str]) -> Literal["all"] | set[str]:
        if allowed_special == "all":
            return "all"
        if isinstance(allowed_special, str):
            raise TypeError("allowed_special takes 'all' or a collection of token names, not a single name")
        allowed = set(allowed_special)
        for name in allowed:
            self.special_id(name)  # raises a helpful error for unknown names
        return allowed

    def _require(self, token_id: int, what: str) -> int:
        if token_id < 0:
            raise TokenizerError(f"{self.name}: this vocabulary has no {what} token")
        return token_id

    # -- decoding ------------------------------------------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of `ids` (a token can hold part of a UTF-8 character)."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"decode takes a list of token ids, got {type(ids).__name__}")
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors and arrays too
        if not all(type(i) is int for i in ids):
            raise TypeError(f"decode takes integer token ids, got {[i for i in ids if type(i) is not int][:5]}")
        if ids and (min(ids) < 0 or max(ids) >= self.n_words or self._holes):
            for i in ids:
                self._check_id(i)
        return self._model.decode_bytes(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (special tokens: their name)."""
        return self._model.decode_single_token_bytes(self._check_id(token_id))

    def _check_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.n_words:
            raise TokenizerError(f"token id {token_id} is out of range for a vocabulary of {self.n_words}")
        if token_id in self._holes:
            raise TokenizerError(f"token id {token_id} names no token in {self.name}")
        return token_id

    def stream_decoder(self) -> StreamDecoder:
        """A decoder for tokens arriving one at a time (see `StreamDecoder`)."""
        return StreamDecoder(self)

    # -- special tokens ------------------------------------------------------------------------------

    def special_id(self, name: str) -> int:
        """The id of a special token by name, e.g. "<|eot_id|>"."""
        token_id = self.special_tokens.get(name)
        if token_id is None:
            close = difflib.get_close_matches(name, self.special_tokens, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TokenizerError(f"{name!r} is not a special token of {self.name}{hint}")
        return token_id

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_words={self.n_words}, stop_tokens={self.stop_tokens})"


class StreamDecoder:
    """Decodes a stream of token ids into text as it arrives, for printing while generating.

    One token can end in the middle of a UTF-8 character (an emoji or a CJK character often spans two
    or three tokens). `push` holds such bytes back until the character is complete, so the text it
    returns never contains a U+FFFD that `decode` of the whole sequence would not. The outputs of all
    `push` calls plus `flush` concatenate to exactly `decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token (possibly empty)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back, with U+FFFD for an incomplete character; the decoder starts over."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _tokenizer_dir(src: str | os.PathLike) -> Path:
    """A local directory, or the snapshot of a Hugging Face repo's tokenizer files."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise TokenizerError(
            f"{src} is a file; from_pretrained takes a directory or a repo id "
            "(Tokenizer(path) reads a tokenizer.model file)"
        )
    if isinstance(src, os.PathLike) or path.is_absolute() or str(src).startswith((".", "~")):
        raise TokenizerError(f"no such directory: {src}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(src), allow_patterns=_TOKENIZER_FILES))


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """transformers' lookup: chat_template.jinja, else tokenizer_config.json's (default) template."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _added_token_names(config: dict[str, Any], tokenizer_json: Path) -> dict[int, str]:
    """{id: name} of the added tokens the repo lists (tokenizer_config.json, else tokenizer.json)."""
    decoder = config.get("added_tokens_decoder")
    if decoder:
        return {int(i): t["content"] for i, t in decoder.items()}
    data = read_json_object(tokenizer_json, TokenizerError, missing_ok=True)
    if data:
        return {int(t["id"]): t["content"] for t in data.get("added_tokens", [])}
    return {}


def _llama3_specials_for(n_ranks: int, listed: dict[int, str], source: Path) -> dict[str, int]:
    """The 256 specials after `n_ranks` ranks: the repo's names where it lists them, else 3.1 names."""
    by_id = {n_ranks + i: name for i, name in enumerate(llama3_special_token_names("3.1"))}
    ordinary = sorted(i for i in listed if i < n_ranks)
    if ordinary:
        raise TokenizerError(f"{source.parent}: added tokens with ordinary token ids {ordinary[:8]}")
    by_id.update(listed)
    specials = {name: i for i, name in by_id.items()}
    if len(specials) != len(by_id):
        seen: set[str] = set()
        dup = [name for name in by_id.values() if name in seen or seen.add(name)]
        raise TokenizerError(f"{source.parent}: special-token names used twice: {dup[:4]}")
    return specials


def _template_tokens(config: dict[str, Any], specials: dict[str, int]) -> dict[str, str]:
    """bos/eos/pad/unk as tokenizer_config.json names them (an Instruct repo's eos is often <|eot_id|>):
    the strings transformers hands a chat template. Names that are not tokens of the vocabulary are left out."""
    names = {k: _token_content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {k: v for k, v in names.items() if isinstance(v, str) and v in specials}


def _token_content(token: str | dict[str, Any] | None) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ..., ...}."""
    return token.get("content") if isinstance(token, dict) else token
