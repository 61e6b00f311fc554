from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from llama3.checks import ParamError, _is_int, _is_real


def knob(default: Any, flag: str, help: str, extension: bool = False) -> Any:
    """A `SamplingParams` field with what the CLI (`flag`, `help`) and the server (`extension`: a request
    field beyond OpenAI's API, named as vLLM names it) need to expose it; both read these from the dataclass."""
    return field(default=default, metadata={"flag": flag, "help": help, "extension": extension})


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn from the logits; checked when made (also the key of a captured decode step).

    One object from the CLI, the server and the library down to the sampler (`llama3.generate.sampling`):
    a new knob is a field here (checked in `__post_init__`) and its step in `sampling.process_logits`.
    """

    temperature: float = knob(0.6, "--temperature/-t", "0 is greedy")
    top_p: float = knob(0.9, "--top-p", "nucleus sampling: keep the likeliest tokens up to this mass")
    top_k: int | None = knob(None, "--top-k", "keep only the K most likely tokens (default: all)", extension=True)
    min_p: float = knob(0.0, "--min-p", "keep tokens at least this fraction as likely as the likeliest; 0 is off", True)
    repetition_penalty: float = knob(
        1.0,
        "--repetition-penalty",
        "divide the logits of tokens already in the prompt or the answer by this (multiply the negative ones), "
        "as transformers does; 1 is off",
        extension=True,
    )

    def __post_init__(self) -> None:
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ParamError("temperature", f"must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ParamError("top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and not _is_int(self.top_k, low=1):
            raise ParamError("top_k", f"must be an integer >= 1 (unset: keep all tokens), got {self.top_k!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ParamError("min_p", f"must be a number in [0, 1] (0 is off), got {self.min_p!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            msg = f"must be a finite number > 0 (1 is off), got {self.repetition_penalty!r}"
            raise ParamError("repetition_penalty", msg)


KNOBS = tuple(f.name for f in fields(SamplingParams))  # the keyword arguments that make a SamplingParams


def check_seed(seed: Any) -> None:
    if seed is not None and not (_is_int(seed, low=0) and seed < 2**64):
        raise ParamError("seed", f"must be an integer in [0, 2**64), got {seed!r}")


def check_max_new_tokens(n: Any) -> None:
    if not _is_int(n, low=0):
        raise ParamError("max_new_tokens", f"must be an integer >= 0, got {n!r}")
