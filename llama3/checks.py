from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file that does not describe a Llama model we can build."""


def read_json_object(path: Path, error: type[ValueError] = ConfigError, missing_ok: bool = False) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, params.json, an index...); any other content is
    reported as `error`, naming the file. With `missing_ok`, a missing file reads as {}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise error(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not a text (UTF-8 JSON) file") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data


def parse_jsonl(lines: Iterable[str], source: Any, error: type[ValueError] = ValueError) -> list[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSONL text; a line that is not JSON is an `error`
    naming `source` and the line."""
    values = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise error(f"{source}, line {number}: not JSON ({e.msg} at column {e.colno})") from None
    return values


def _is_int(value: Any, low: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ParamError(ValueError):
    """A generation setting out of its range. `param` is its name (the CLI reports the flag of that name)."""

    def __init__(self, param: str, problem: str):
        super().__init__(f"{param} {problem}")
        self.param, self.problem = param, problem


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing files, missing/unexpected tensors, wrong shapes."""


def token_ids(ids: Sequence, vocab: int, what: str) -> list[int]:
    """`ids` as a list of ints (numpy and 0-d tensor integers too), each checked to be in the vocabulary."""

    def as_int(t) -> int | None:
        try:
            return None if isinstance(t, bool) else operator.index(t)
        except TypeError:
            return None

    out = [as_int(t) for t in ids]
    not_ints = [t for t, i in zip(ids, out, strict=True) if i is None]
    if not_ints:
        raise ValueError(f"{what} has token ids that are not integers: {not_ints[:5]}")
    outside = [t for t in out if not 0 <= t < vocab]
    if outside:
        raise ValueError(f"{what} has token ids outside [0, {vocab}): {outside[:5]}")
    return out
