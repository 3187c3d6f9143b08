"""Incremental detokenization with stop-string handling.

Text is emitted only once it is stable: never a partial UTF-8 character (decoded as U+FFFD), and
never a tail that could still grow into a stop string. The concatenation of all deltas equals the
final text, which never contains the stop string.

Without stop strings nothing needs the text token by token, so tokens are only queued and decoded
when text is asked for (`text`, `take_delta`): once per step for a stream, once per request for
offline generation, instead of two `decode` calls per generated token.
"""

from __future__ import annotations

from engine.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self._tok = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self._ids: list[int] = []
        self._prefix_offset = 0  # first id of the window re-decoded for context
        self._read_offset = 0  # ids before this are already in `text`
        self._text = ""  # stable text so far (truncated at a stop string)
        self._emitted = 0  # characters of `text` already handed out
        self.stopped_by: str | None = None

    @property
    def text(self) -> str:
        self._flush()
        return self._text

    def add_token(self, token_id: int) -> str | None:
        """Add one token; returns the matched stop string if the text now contains one."""
        if self.stopped_by is not None:
            return self.stopped_by
        self._ids.append(token_id)
        if not self._stop:
            return None  # decoded lazily
        return self._flush()

    def _flush(self) -> str | None:
        """Decode queued tokens into text; returns a stop string found in the new text."""
        if self.stopped_by is not None or self._read_offset == len(self._ids):
            return None
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        # Take every queued token, or back off over a trailing incomplete character (a UTF-8
        # character spans at most 4 byte tokens) so the text before it is not held back too.
        end = len(self._ids)
        while True:
            full_text = self._tok.decode(self._ids[self._prefix_offset : end])
            if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
                break
            end -= 1
            if end <= self._read_offset or len(self._ids) - end > 4:
                return None  # incomplete character (or tokens that decode to nothing yet)
        new_text = full_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, end
        old_len = len(self._text)
        self._text += new_text
        return self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> str | None:
        for s in self._stop:
            start = max(0, old_len - len(s) + 1)
            idx = self._text.find(s, start)
            if idx != -1:
                self._text = self._text[:idx]
                self.stopped_by = s
                return s
        return None

    def _holdback(self) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:n]):
                    best = n
                    break
        return best

    def take_delta(self, finished: bool) -> str:
        """New text since the last call; on finish, everything left."""
        self._flush()
        end = len(self._text) if finished else len(self._text) - self._holdback()
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta
