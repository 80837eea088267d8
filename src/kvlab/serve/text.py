"""Token ids to streamed text, with OpenAI's stop strings.

Two things keep a streamed text from being the plain decoding of each new token: a character may
span several tokens (byte-level BPE), so text ending in an incomplete character (U+FFFD) waits for
the next token; and a stop string may span several tokens, so the last ``len(longest stop) − 1``
characters wait until they cannot be the start of one. The stop string itself is never sent, as in
OpenAI's API.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """The text of a growing list of token ids, released as it becomes final."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0                      # characters released so far
        self.text = ""                     # the final text once stopped or flushed
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text it releases (``stopped`` turns True on a stop string)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):        # an incomplete character: wait for its next byte
            return ""
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self.text = text[:cut]
            return self._release(self.text)
        return self._release(text[:max(self.sent, len(text) - self.hold)])

    def flush(self) -> str:
        """The end of the generation: release what was held back."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(self.text)

    def _first_stop(self, text: str) -> int | None:
        # Only a match that ends in the unreleased tail is new; earlier text was checked already.
        starts = [text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop]
        starts = [i for i in starts if i >= 0]
        return min(starts) if starts else None

    def _release(self, upto: str) -> str:
        new = upto[self.sent:]
        self.sent = max(self.sent, len(upto))
        return new
