"""Turning one row's tokens into text safely: whole UTF-8 characters, stop strings never leaked.

`TextStream` takes token bytes one token at a time and releases only text that is final:
never half of a UTF-8 character (GPT-2 tokens can split one), and never the start of a
stop string that the next tokens might complete. When a stop string appears, the text
before it is released and the stream reports that it stopped.

>>> s = TextStream(stop=["\\n\\n"])
>>> s.push(b"Hello\\n"), s.push(b"\\nWorld"), s.stopped
('Hello', '', True)
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from gpt2kit.generation.config import check_stop


class TextStream:
    """Incremental decoder for one row with stop strings (see the module docstring)."""

    def __init__(self, *, stop: str | Sequence[str] | None = None) -> None:
        self.stop = check_stop(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded text not yet released: it may start a stop string
        self.text = ""  # everything released so far
        self.stopped = False
        self.tokens = 0  # tokens pushed until the stream stopped (the one completing a stop string counts)

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that is now final ('' if none)."""
        if self.stopped:
            return ""
        self.tokens += 1
        self._pending += self._decoder.decode(data)
        return self._release(final=False)

    @property
    def decoded(self) -> int:
        """Characters decoded so far, released or held back (where the next token's text starts)."""
        return len(self.text) + len(self._pending)

    def finish(self) -> str:
        """End of generation: flush what was held back (an unfinished stop string is plain text)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        text = self._pending
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            out = text[: min(hits)]
            self.stopped = True
            self._pending = ""
        elif final:
            out, self._pending = text, ""
        else:
            keep = held_back(text, self.stop)
            out, self._pending = text[: len(text) - keep], text[len(text) - keep :]
        self.text += out
        return out


def held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string
    (text that must wait: the next piece may complete the stop string)."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
