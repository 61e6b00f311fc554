from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llama3.checks import ParamError, _is_int, _is_real


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn from the logits; checked when made (also the key of a captured decode step)."""

    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.9  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int | None = None  # keep the k most likely tokens; None: all

    def __post_init__(self) -> None:
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ParamError("temperature", f"must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ParamError("top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and not _is_int(self.top_k, low=1):
            raise ParamError("top_k", f"must be an integer >= 1 (or None for no limit), got {self.top_k!r}")


def check_seed(seed: Any) -> None:
    if seed is not None and not (_is_int(seed, low=0) and seed < 2**64):
        raise ParamError("seed", f"must be an integer in [0, 2**64), got {seed!r}")


def check_max_new_tokens(n: Any) -> None:
    if not _is_int(n, low=0):
        raise ParamError("max_new_tokens", f"must be an integer >= 0, got {n!r}")
