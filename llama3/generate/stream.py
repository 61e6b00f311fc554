from __future__ import annotations

from collections.abc import Sequence

from llama3.text.tokenizer import Tokenizer


class TextStream:
    """One row's new tokens as text, UTF-8 safe, ending before the first of the `stop` strings.

    Text that could still become a stop string is held back until it cannot: the pieces `push`
    returns never include any part of a stop string, and they concatenate to the decoded text cut
    at the first stop string (or to all of it, with `flush`).
    """

    def __init__(self, tokenizer: Tokenizer, stop: str | Sequence[str] | None = None):
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        self.stop, self.held, self.stopped = stop, "", False
        self._decoder = tokenizer.stream_decoder()

    def push(self, token: int) -> str:
        return "" if self.stopped else self._release(self._decoder.push(token), final=False)

    def flush(self) -> str:
        return "" if self.stopped else self._release(self._decoder.flush(), final=True)

    def _release(self, text: str, final: bool) -> str:
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        # hold back the longest tail that is the beginning of a stop string
        keep = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]
