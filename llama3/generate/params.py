from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from llama3.checks import ParamError, _is_int, _is_real


def knob(default: Any, flag: str, help: str, extension: bool = False, cli: dict | None = None) -> Any:
    """A `SamplingParams` field with what the CLI (`flag`, `help`, `cli`: further `add_argument` keywords) and the
    server (`extension`: a request field beyond OpenAI's API, named as vLLM names it) need to expose it; both read
    these from the dataclass."""
    return field(default=default, metadata={"flag": flag, "help": help, "extension": extension, "cli": cli or {}})


LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]


def bias_pair(text: str) -> tuple[int, float]:
    """'ID=BIAS' (the CLI's --logit-bias) -> (token id, bias); ValueError says what is wrong."""
    token, sep, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise ValueError(f"expected TOKEN_ID=BIAS (e.g. 128009=-100), got {text!r}") from None


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """A mapping {token id: bias} (JSON's string keys too) or (id, bias) pairs -> sorted (id, bias) pairs, checked."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise ParamError("logit_bias", f"must map token ids to biases, got {value!r}") from None
    out = {}
    for token, bias in pairs:
        if isinstance(token, str) and token.strip().lstrip("-").isdigit():
            token = int(token)  # JSON object keys are strings
        if not _is_int(token, low=0):
            raise ParamError("logit_bias", f"keys must be token ids (integers >= 0), got {token!r}")
        if not _is_real(bias) or not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
            raise ParamError("logit_bias", f"biases must be numbers in [-100, 100], got {bias!r} for token {token}")
        out[int(token)] = float(bias)
    return tuple(sorted(out.items()))


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
    presence_penalty: float = knob(
        0.0,
        "--presence-penalty",
        "subtract this from the logit of every token already in the answer (OpenAI's definition, -2 to 2); 0 is off",
    )
    frequency_penalty: float = knob(
        0.0,
        "--frequency-penalty",
        "subtract this times its count in the answer from each token's logit (OpenAI's definition, -2 to 2); 0 is off",
    )
    # {token id: bias}, kept as sorted (id, bias) pairs: the params are hashable (the key of a captured step)
    logit_bias: tuple[tuple[int, float], ...] = knob(
        (),
        "--logit-bias",
        "add BIAS (-100 to 100) to the logit of token ID before sampling (OpenAI's logit_bias; repeatable)",
        cli={"type": bias_pair, "action": "append", "default": None, "metavar": "ID=BIAS"},
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not -2 <= value <= 2:
                raise ParamError(name, f"must be a number in [-2, 2] (0 is off), got {value!r}")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))  # frozen: set once, here

    @property
    def stateless(self) -> bool:
        """Whether the next token depends on the logits alone, not on the tokens read or written so far."""
        return self.repetition_penalty == 1 and self.presence_penalty == 0 and self.frequency_penalty == 0


KNOBS = tuple(f.name for f in fields(SamplingParams))  # the keyword arguments that make a SamplingParams


def check_seed(seed: Any) -> None:
    if seed is not None and not (_is_int(seed, low=0) and seed < 2**64):
        raise ParamError("seed", f"must be an integer in [0, 2**64), got {seed!r}")


def check_max_new_tokens(n: Any) -> None:
    if not _is_int(n, low=0):
        raise ParamError("max_new_tokens", f"must be an integer >= 0, got {n!r}")
