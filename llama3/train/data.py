"""The data side of fine-tuning: chat rows read from JSONL or parquet, encoded into (ids, labels), batched.

    rows = read_chat_rows("train.jsonl")        # {"messages": [{"role": ..., "content": ...}, ...]} a line
    examples = prepare(rows, chat_format, max_seq_len=1024, source="train.jsonl", log=print)

Each row is encoded with the model's own chat format (Llama 3 headers or ChatML), and only the assistant
turns are learned: their content and the token that ends the turn (<|eot_id|> / <|im_end|>), never the
headers, the system or user turns. Rows longer than `max_seq_len` are truncated (their end is cut, with a
warning giving the count); a row left with no assistant token after the cut is dropped (also counted).

Batches group rows of similar length (shuffled, then sorted by length within windows of 16 batches, the
batch order shuffled again), padded on the right; causal attention means real tokens never see the padding,
and padded positions carry no label.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llama3.checks import parse_jsonl
from llama3.text.chat_format import ChatFormat, ChatMLFormat, _validate
from llama3.text.template import JinjaChatFormat

IGNORE = -100  # the label of a position that is not learned (transformers' convention)


BUCKET_BATCHES = 16  # rows are sorted by length within windows of this many batches


class DataError(ValueError):
    """A training file or row that cannot be used: the file, the row (1-based line) and the field are named."""


def read_chat_rows(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """The `messages` of every row of a JSONL file (one JSON object a line), or a parquet file (needs pyarrow)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected a data file (JSONL rows, or .parquet)")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'llama3[parquet]')") from None
        rows = [(i + 1, row) for i, row in enumerate(pq.read_table(path).to_pylist())]
        where = "row"
    else:
        with open(path, encoding="utf-8") as f:
            try:
                lines = list(f)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        rows = parse_jsonl(lines, path, DataError)
        where = "line"
    dialogs = []
    for n, row in rows:
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            got = f"keys {sorted(row)}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
            raise DataError(f"{path}, {where} {n}: expected an object with a non-empty 'messages' list, got {got}")
        dialogs.append(messages)
    if not dialogs:
        raise DataError(f"{path}: no rows")
    return dialogs


def encode_example(
    chat_format: ChatFormat | ChatMLFormat | JinjaChatFormat, messages: Sequence[dict]
) -> tuple[list[int], list[int]]:
    """(token ids, labels) of a dialog in `chat_format`, labels IGNORE except on assistant turns.

    The ids are the dialog's prompt as `encode_dialog_prompt` builds it, without the final assistant header.
    An assistant turn learns what follows its header, up to and including the token that ends the turn.
    """
    if isinstance(chat_format, JinjaChatFormat):
        return _encode_with_template(chat_format, messages)
    _validate(messages, chat_format.roles)  # errors name the message and the field
    if isinstance(chat_format, ChatMLFormat):
        messages = chat_format._with_default_system(messages)  # the system turn the template adds, if any
        ids = [chat_format.tokenizer.bos_id] if chat_format.add_bos else []
        end = chat_format.im_end_id
    else:
        ids, end = [chat_format.tokenizer.bos_id], chat_format.eot_id
    labels = [IGNORE] * len(ids)
    for message in messages:
        turn = chat_format.encode_message(message)
        ids += turn
        if message["role"] != "assistant":
            labels += [IGNORE] * len(turn)
            continue
        header = chat_format.encode_header(message)
        start = _common_prefix(turn, header)  # ChatML encodes role and content as one text: compare, do not assume
        stop = len(turn) - turn[::-1].index(end) if end in turn else len(turn)  # through the turn's end token
        labels += [IGNORE] * start + turn[start:stop] + [IGNORE] * (len(turn) - stop)
    return ids, labels


def _encode_with_template(chat_format: JinjaChatFormat, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """A checkpoint's own template: assistant turn k is what rendering messages[:k + 1] adds to the prompt of
    messages[:k] (with the generation prompt), up to and including its last stop token."""
    ids = chat_format.encode_dialog_prompt(messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    stops = set(chat_format.stop_tokens)
    for k, message in enumerate(messages):
        if not role_is_assistant(message):
            continue
        prompt = chat_format.encode_dialog_prompt(messages[:k], add_generation_prompt=True) if k else []
        through = chat_format.encode_dialog_prompt(messages[: k + 1], add_generation_prompt=False)
        if through[: len(prompt)] != prompt or ids[: len(through)] != through:
            raise ValueError(f"message {k}: the chat template renders a dialog's start differently as it grows")
        end = max((j + 1 for j in range(len(prompt), len(through)) if through[j] in stops), default=len(through))
        labels[len(prompt) : end] = through[len(prompt) : end]
    return ids, labels


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass
class Example:
    ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:  # learned positions: a label on a token after the first
        return sum(label != IGNORE for label in self.labels[1:])


def prepare(
    dialogs: list[list[dict]], chat_format, max_seq_len: int, source: str, log: Callable[[str], None]
) -> list[Example]:
    """Encodes every row (errors name the row), truncating rows over `max_seq_len` and dropping rows
    that are left with nothing to learn."""
    examples, truncated, dropped = [], 0, 0
    for n, messages in enumerate(dialogs, 1):
        try:
            ids, labels = encode_example(chat_format, messages)
        except ValueError as e:
            raise DataError(f"{source}, row {n}: {e}") from None
        if not any(role_is_assistant(m) for m in messages):
            raise DataError(f"{source}, row {n}: no assistant message, so nothing to learn")
        if len(ids) > max_seq_len:
            ids, labels, truncated = ids[:max_seq_len], labels[:max_seq_len], truncated + 1
        example = Example(ids, labels)
        if example.n_targets == 0:
            dropped += 1
            continue
        examples.append(example)
    if truncated:
        log(
            f"llama3: warning: {truncated} of {len(dialogs)} rows of {source} are longer than {max_seq_len} tokens "
            f"(--max-seq-len) and were truncated; {dropped} of them kept no assistant token and were dropped"
        )
    if not examples:
        raise DataError(f"{source}: no row has an assistant token within {max_seq_len} tokens (--max-seq-len)")
    return examples


def role_is_assistant(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") == "assistant"


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of batches (row indices): shuffled, sorted by length within windows of BUCKET_BATCHES
    batches (little padding), then the batches shuffled. A function of (seed, epoch) only: resume recomputes it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def collate(examples: Sequence[Example], device: torch.device) -> tuple[Tensor, Tensor]:
    """(inputs, targets), both (B, L - 1): token t predicts label t + 1; right padding with id 0 and IGNORE."""
    L = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), L, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    return ids[:, :-1].to(device), labels[:, 1:].to(device)


__all__ = [
    "BUCKET_BATCHES",
    "IGNORE",
    "DataError",
    "Example",
    "collate",
    "encode_example",
    "length_grouped_batches",
    "prepare",
    "read_chat_rows",
    "role_is_assistant",
]
