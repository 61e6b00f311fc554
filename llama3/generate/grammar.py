"""Grammar-constrained decoding: each step, the tokens that cannot continue a valid answer are masked out of the
logits before sampling, so the answer always matches a JSON schema (or stops at the token budget).

The grammar engine is xgrammar (Dong et al. 2024, "XGrammar: Flexible and Efficient Structured Generation
Engine for Large Language Models"; the `json` extra): it compiles a JSON schema against the vocabulary once
(cached per schema) and then fills a bitmask of the allowed tokens per step. Why xgrammar and not llguidance:
`benchmarks/bench_structured.py` measures both on the 49,152- and 128,256-token vocabularies (docs/serving.md).

The vocabulary is handed over as each token's raw bytes; special tokens as empty strings, which xgrammar
treats as special and never allows inside the grammar. The stop tokens of the request are the only tokens
allowed once the value is complete, so a constrained answer ends with a stop token right after its last
character.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llama3.checks import ParamError
from llama3.text.tokenizer import Tokenizer

if TYPE_CHECKING:
    from torch import Tensor

JsonSchema = Mapping[str, Any] | str | bool

ANY_OBJECT: dict[str, Any] = {"type": "object"}  # OpenAI's `json_object`: any JSON object


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ImportError("structured output needs xgrammar: pip install 'llama3[json]'") from e
    return xgrammar


class Grammars:
    """Compiles JSON schemas for one tokenizer (and the model's vocabulary size), with a cache of compiled
    grammars; `grammars_for` keeps one per tokenizer."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        xgr = _xgrammar()
        specials = set(tokenizer.special_tokens.values())
        vocab = [b"" if i in specials else _token_bytes(tokenizer, i) for i in range(tokenizer.n_words)]
        vocab += [b""] * (vocab_size - len(vocab))  # the model's padding rows: never allowed
        stops = list(tokenizer.stop_tokens) or [max(tokenizer.eos_id, 0)]
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stops)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        self.vocab_size = vocab_size
        self._lock = threading.Lock()  # compiles from the server's event loop threads and the library

    def json(self, schema: JsonSchema | None = None):
        """The compiled grammar of JSON text valid against `schema` (None: any JSON object), with no whitespace
        between tokens (a model cannot then pad forever with spaces). ParamError names a schema xgrammar refuses."""
        text = check_json_schema(ANY_OBJECT if schema is None else schema)
        with self._lock:
            try:
                return self.compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
            except (RuntimeError, ValueError) as e:
                raise ParamError("json_schema", f"cannot be compiled into a grammar: {_first_line(e)}") from None

    def sequence(self, parts: Sequence[str | Mapping[str, Any]]):
        """The compiled grammar of the literal strings and JSON values (a dict: its schema) of `parts` in order,
        or of one of several such sequences if `parts` is a list of lists (a tool call among several tools)."""
        xgr = _xgrammar()
        choices = parts if parts and isinstance(parts[0], list) else [parts]

        def one(seq):
            pieces = [
                xgr.Grammar.from_ebnf(f"root ::= {json.dumps(p)}")
                if isinstance(p, str)
                else xgr.Grammar.from_json_schema(check_json_schema(p), any_whitespace=False, strict_mode=True)
                for p in seq
                if p != ""
            ]
            return pieces[0] if len(pieces) == 1 else xgr.Grammar.concat(*pieces)

        with self._lock:
            try:
                grammars = [one(seq) for seq in choices]
                grammar = grammars[0] if len(grammars) == 1 else xgr.Grammar.union(*grammars)
                return self.compiler.compile_grammar(grammar)
            except (RuntimeError, ValueError) as e:
                msg = f"a parameters schema cannot be compiled into a grammar: {_first_line(e)}"
                raise ParamError("tools", msg) from None


def _token_bytes(tokenizer: Tokenizer, i: int) -> bytes:
    try:
        return tokenizer.token_bytes(i)
    except Exception:  # a hole in the vocabulary: no token, never allowed
        return b""


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def check_json_schema(schema: JsonSchema) -> str:
    """The schema as JSON text, checked to be a JSON Schema (a dict or a boolean, or its JSON text); ParamError
    names what is wrong."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ParamError("json_schema", f"is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
    if not isinstance(schema, (Mapping, bool)):
        raise ParamError("json_schema", f"must be a JSON object (a JSON Schema), got {type(schema).__name__}")
    try:
        import jsonschema

        jsonschema.validators.validator_for(schema).check_schema(schema)
    except ImportError:  # the check is a courtesy; xgrammar refuses what it cannot compile anyway
        pass
    except Exception as e:  # jsonschema.SchemaError: the first problem, where it is
        where = "/".join(str(p) for p in getattr(e, "path", ())) or "the top level"
        raise ParamError("json_schema", f"is not a valid JSON Schema at {where}: {getattr(e, 'message', e)}") from None
    return json.dumps(schema)


_GRAMMARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GRAMMARS_LOCK = threading.Lock()


def grammars_for(tokenizer: Tokenizer, vocab_size: int) -> Grammars:
    """The `Grammars` of a tokenizer, made once (building the vocabulary's index takes about a second)."""
    with _GRAMMARS_LOCK:
        by_size = _GRAMMARS.setdefault(tokenizer, {})
        if vocab_size not in by_size:
            by_size[vocab_size] = Grammars(tokenizer, vocab_size)
        return by_size[vocab_size]


class Constraint:
    """One sequence's place in a compiled grammar: `mask_` its next logits, then `accept` the token drawn.

    `stop_tokens` are the tokens that may end the sequence once the grammar is complete (and only then).
    """

    def __init__(self, compiled, stop_tokens: Sequence[int]):
        xgr = _xgrammar()
        if not stop_tokens:
            raise ValueError("constrained decoding needs at least one stop token to end the value with")
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_tokens))
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)

    def mask_(self, logits: Tensor) -> Tensor:
        """Sets, in place, the logits (V,) of the tokens the grammar does not allow next to -inf."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        # xgrammar's kernels read the logits as contiguous memory: a strided row (the CPU's column-major output
        # projection gives one) is masked through a contiguous copy
        row = logits.view(1, -1) if logits.is_contiguous() else logits.reshape(1, -1).contiguous()
        bitmask = self.bitmask.to(logits.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(row, bitmask, vocab_size=min(self.vocab_size, row.shape[-1]))
        if row.data_ptr() != logits.data_ptr():
            logits.copy_(row[0])
        return logits

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(int(token)):  # only if the mask was not applied: a bug, not bad input
            raise RuntimeError(f"token {token} does not continue the grammar")

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()


def mask_logits(logits: Tensor, constraints: Sequence[Constraint | None]) -> Tensor:
    """logits (B, V) as float32, each row with a constraint masked (a copy: the model's output is not touched)."""
    import torch

    logits = logits.float().clone(memory_format=torch.contiguous_format)
    for b, c in enumerate(constraints):
        if c is not None:
            c.mask_(logits[b])
    return logits


def constrained_stream(
    llm, prompts: list[list[int]], max_new_tokens: int, params, stops: list[int], seed: int | None, json_schema
) -> Iterator[list[int | None]]:
    """`Llama.generate_stream`'s steps with every row held to `json_schema`: an eager prefill and decode loop
    (each step's mask is known only after the last token is read on the host), sampling as `sample` does."""
    import torch

    from llama3.generate.sampling import sample, seen_mask

    grammar = grammars_for(llm.tokenizer, llm.model.args.vocab_size).json(json_schema)
    constraints = [Constraint(grammar, stops) for _ in prompts]
    B, lengths = len(prompts), [len(p) for p in prompts]
    finished = [False] * B
    t0, first, n = time.perf_counter(), None, 0
    try:
        if max_new_tokens == 0:
            return
        L = max(lengths)
        llm._ensure_cache(B, L + max_new_tokens)
        llm._generator.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
        tokens = torch.zeros(B, L, dtype=torch.long)
        for row, p in enumerate(prompts):
            tokens[row, : len(p)] = torch.tensor(p)
        pos = torch.tensor(lengths, device=llm.device)
        logits = llm.model(tokens.to(llm.device), torch.arange(L, device=llm.device), logits_pos=pos - 1, kv_len=L)
        vocab = llm.model.args.vocab_size
        seen = seen_mask(prompts, vocab, llm.device) if params.repetition_penalty != 1 else None
        # the presence/frequency penalties count the tokens generated so far (the prompt's do not count)
        penalties = params.presence_penalty != 0 or params.frequency_penalty != 0
        counts = torch.zeros(B, vocab, device=llm.device) if penalties else None
        for n in range(1, max_new_tokens + 1):
            next_tok = sample(mask_logits(logits[:, -1], constraints), params, llm._generator, seen, counts)
            out: list[int | None] = []
            for b, token in enumerate(next_tok.tolist()):
                if not finished[b] and token not in stops:
                    constraints[b].accept(token)
                finished[b] = finished[b] or token in stops
                out.append(None if finished[b] else token)
            first = first or time.perf_counter()
            yield out
            if all(finished) or n == max_new_tokens:
                break
            if seen is not None:
                seen.scatter_(1, next_tok[:, None], True)
            if counts is not None:
                counts[torch.arange(B, device=llm.device), next_tok] += 1
            logits = llm.model(next_tok[:, None], pos[:, None], kv_len=L + n)
            pos = pos + 1
    finally:
        elapsed = time.perf_counter() - t0
        ttft = (first or time.perf_counter()) - t0
        llm.last_stats = {
            "time_to_first_token_s": ttft,
            "decode_steps": n,
            "seconds": elapsed,
            "tokens_per_second": (n - 1) / max(elapsed - ttft, 1e-9) if n > 1 else 0.0,
            "finish_reasons": ["stop" if f else "length" for f in finished],
        }
