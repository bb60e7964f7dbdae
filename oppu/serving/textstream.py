"""One choice's text as tokens arrive: incremental detokenization and OpenAI ``stop`` strings.

Each token's text is the difference between decoding a short window of the latest tokens with and
without it (the window starts a token or so earlier, so a tokenizer that drops the leading space of a
sequence's first word still gives the space between words); a token that ends inside a multi-byte
character waits for the next. So the cost per token does not grow with the output's length. Text
that could still turn out to be the start of a stop string is held back, so a stream never sends
text that a later stop match would have cut. On a match the output ends just
before it and the choice finishes with ``finish_reason`` "stop".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Released:
    """What may be sent now: new text, the per-token entries (logprobs) it covers, and whether a stop matched."""

    text: str = ""
    tokens: list[Any] = field(default_factory=list)
    stopped: bool = False


class ChoiceText:
    """Accumulates one choice's token ids; ``add`` returns what became safe to send."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str] = ()):
        self.decode = decode
        self.stops = [stop for stop in stops if stop]
        self.token_ids: list[int] = []
        self.entries: list[Any] = []
        self.ends: list[int] = []  # where each token's text ends in the decoded continuation
        self.text = ""  # the decoded continuation so far
        self.sent = 0  # characters of ``text`` already released
        self.released_tokens = 0
        self.stopped = False
        self._prefix = 0  # window start: decoded text before _read is already in ``text``
        self._read = 0

    def add(self, token_id: int, entry: Any = None) -> Released:
        if self.stopped:
            return Released(stopped=True)
        self.token_ids.append(token_id)
        self.entries.append(entry)
        seen = self.decode(self.token_ids[self._prefix:self._read])
        window = self.decode(self.token_ids[self._prefix:])
        if len(window) > len(seen) and not window.endswith("\ufffd"):
            self.text += window[len(seen):]
            self._prefix, self._read = self._read, len(self.token_ids)
        self.ends.append(len(self.text))
        match = self._first_stop()
        if match is not None:
            self.stopped = True
            self.text = self.text[:match]
            return self._release(match)
        return self._release(len(self.text) - self._holdback())

    def finish(self) -> Released:
        """At the end of generation everything left is released (with a stop matched: up to the match)."""
        if not self.stopped and self._read < len(self.token_ids):  # bytes that never completed a character
            seen = self.decode(self.token_ids[self._prefix:self._read])
            self.text += self.decode(self.token_ids[self._prefix:])[len(seen):]
        out = self._release(len(self.text))
        if not self.stopped:
            out.tokens.extend(self.entries[self.released_tokens:])
            self.released_tokens = len(self.entries)
        return out

    @property
    def final_text(self) -> str:
        return self.text[:self.sent]

    def _first_stop(self) -> int | None:
        # A new match can only involve text not yet released (released text held no stop prefix).
        start = max(0, self.sent - max((len(stop) for stop in self.stops), default=0))
        found = [at for at in (self.text.find(stop, start) for stop in self.stops) if at >= 0]
        return min(found) if found else None

    def _holdback(self) -> int:
        """Characters at the end that may begin a stop string."""
        text = self.text
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _release(self, upto: int) -> Released:
        upto = max(upto, self.sent)
        out = Released(text=self.text[self.sent:upto], stopped=self.stopped)
        self.sent = upto
        while self.released_tokens < len(self.ends) and self.ends[self.released_tokens] <= upto:
            out.tokens.append(self.entries[self.released_tokens])
            self.released_tokens += 1
        return out
