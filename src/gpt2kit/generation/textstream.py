"""Tokens to text: the one detokenizer under `complete`, `gpt2kit generate` and `gpt2kit serve`.

Three layers, each used by the next:

- `TextStream` takes one token's bytes at a time and releases only text that is final:
  never half of a UTF-8 character (GPT-2's byte-level tokens can split one), and never the
  start of a stop string that the next tokens might complete. When a stop string appears,
  the text before it (with `include_stop`: through it) is released and the stream stops.
- `Detokenizer` takes token ids: it looks their bytes up and applies the text rules of a
  `SamplingConfig` (`skip_special_tokens`, `include_stop_str_in_output`, `min_tokens`).
- `RowText` takes one engine row's events: it keeps the row's token ids, log-probabilities
  and text offsets, ends the row at a stop string, and gives the finish reason.

The end-of-text token (policy, the same for the library, the CLI and the server, and as in
vLLM): the <|endoftext|> that ends a row is one of the row's tokens. It is in `token_ids`,
it is counted in the server's `usage.completion_tokens`, and its log-probability is
reported like any other token's (its text offset is the end of the text). It adds no text:
special tokens are skipped (`skip_special_tokens=True`, OpenAI's and vLLM's default). With
`skip_special_tokens=False` its text, "<|endoftext|>", is part of the completion.

`spaces_between_special_tokens` is accepted and changes nothing here: a byte-level BPE
writes every space inside its tokens, and its special tokens are whole vocabulary entries,
so no space is ever inserted between a special token and the text around it (as
transformers and vLLM decode GPT-2).

>>> s = TextStream(stop=["\\n\\n"])
>>> s.push(b"Hello\\n"), s.push(b"\\nWorld"), s.stopped
('Hello', '', True)
>>> finish_reason("cancelled")
'stop'
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from typing import Literal

from gpt2kit.generation.config import SamplingConfig, check_stop
from gpt2kit.generation.engine import FinishEvent, FinishReason, Row, TokenEvent
from gpt2kit.tokenizer.tokenizer import Tokenizer


def finish_reason(reason: FinishReason) -> Literal["stop", "length"]:
    """The engine's reason as users see it: "length", or "stop" (eos, a stop string, or a row
    cancelled because its stop string was found or its client left), as in OpenAI's API."""
    return "length" if reason == "length" else "stop"


class TextStream:
    """Incremental UTF-8 decoder for one row with stop strings (see the module docstring)."""

    def __init__(self, *, stop: str | Sequence[str] | None = None, include_stop: bool = False) -> None:
        self.stop = check_stop(stop)
        self.include_stop = include_stop
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded text not yet released: it may start a stop string
        self.text = ""  # everything released so far
        self.stopped = False
        self.tokens = 0  # tokens pushed until the stream stopped (the one completing a stop string counts)

    def push(self, data: bytes, *, search: bool = True) -> str:
        """Add one token's bytes; return the text that is now final ('' if none).

        `search=False`: this token's text can't start a stop string (`min_tokens`), so it is
        released at once and never searched."""
        if self.stopped:
            return ""
        self.tokens += 1
        self._pending += self._decoder.decode(data)
        if not search:
            out, self._pending = self._pending, ""
            self.text += out
            return out
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
        # The stop string that is complete first: the earliest, then the shortest.
        hits = [(i, i + len(s)) for i, s in ((text.find(s), s) for s in self.stop) if i >= 0]
        if hits:
            start, end = min(hits)
            out = text[: end if self.include_stop else start]
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


class Detokenizer:
    """One row's token ids -> final text, with a `SamplingConfig`'s text rules.

    - `skip_special_tokens` (default True): special tokens (<|endoftext|>) add no text.
    - `include_stop_str_in_output`: the stop string that ended the text stays in it.
    - `min_tokens`: the text of the first `min_tokens` tokens is never searched for stop
      strings, so a stop string can end the text at token min_tokens + 1 at the earliest.

    >>> d = Detokenizer(Tokenizer.gpt2(), stop=["!"])  # doctest: +SKIP
    >>> d.push(15496), d.push(0), d.stopped  # doctest: +SKIP
    ('Hello', '', True)
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        stop: str | Sequence[str] | None = None,
        min_tokens: int = 0,
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stream = TextStream(stop=stop, include_stop=include_stop_str_in_output)
        self.min_tokens = min_tokens
        self.skip = frozenset(tokenizer.special_tokens.values()) if skip_special_tokens else frozenset()

    @classmethod
    def for_config(cls, tokenizer: Tokenizer, config: SamplingConfig) -> Detokenizer:
        return cls(
            tokenizer,
            stop=config.stop,
            min_tokens=config.min_tokens,
            include_stop_str_in_output=config.include_stop_str_in_output,
            skip_special_tokens=config.skip_special_tokens,
        )

    def push(self, token: int) -> str:
        """Add one token; return the text that is now final ('' if none)."""
        data = b"" if token in self.skip else self.tokenizer.decode_bytes([token])
        return self.stream.push(data, search=self.stream.tokens >= self.min_tokens)

    def finish(self) -> str:
        """End of the tokens: release what was held back."""
        return self.stream.finish()

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def stopped(self) -> bool:
        return self.stream.stopped

    @property
    def tokens(self) -> int:
        """Tokens taken: all of them, or up to the one that completed the stop string."""
        return self.stream.tokens

    @property
    def decoded(self) -> int:
        """Where the next token's text starts, in characters."""
        return self.stream.decoded


def decode(tokenizer: Tokenizer, ids: Sequence[int], config: SamplingConfig | None = None) -> str:
    """Whole token ids as the text a completion with `config` shows (stop strings cut it)."""
    d = Detokenizer.for_config(tokenizer, config or SamplingConfig())
    for t in ids:
        d.push(t)
    d.finish()
    return d.text


def decode_with_offsets(tokenizer: Tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """A prompt's text, special tokens written out, and where each token's text starts."""
    d = Detokenizer(tokenizer, skip_special_tokens=False)
    offsets = []
    for t in ids:
        offsets.append(d.decoded)
        d.push(t)
    d.finish()
    return d.text, offsets


class RowText:
    """One engine row's completion, built from its events (the row ends at its stop string).

    `token_ids`, `logprobs`, `tops` and `offsets` (where each token's text starts) hold the
    tokens the text came from: up to the one that completed a stop string, or the eos.
    """

    def __init__(self, tokenizer: Tokenizer, config: SamplingConfig) -> None:
        self.detokenizer = Detokenizer.for_config(tokenizer, config)
        self.token_ids: list[int] = []
        self.logprobs: list[float | None] = []
        self.tops: list[list[tuple[int, float]] | None] = []
        self.offsets: list[int] = []
        self.finish_reason: Literal["stop", "length"] | None = None

    @property
    def text(self) -> str:
        return self.detokenizer.text

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take(
        self, event: TokenEvent | FinishEvent, *, cancel: Callable[[Row], None] | None = None
    ) -> str | None:
        """Apply one event; return the text it made final, or None when the row had already
        ended (the tokens after a stop string, the engine's FinishEvent that follows it).
        A stop string cancels the row through `cancel(row)` (the server's worker: a message to
        its engine thread), else `row.cancel()` (the caller runs the engine itself)."""
        if self.done:
            return None
        if isinstance(event, FinishEvent):
            self.finish_reason = finish_reason(event.reason)
            return self.detokenizer.finish()
        self.token_ids.append(event.token)
        self.logprobs.append(event.logprob)
        self.tops.append(event.top)
        self.offsets.append(self.detokenizer.decoded)
        piece = self.detokenizer.push(event.token)
        if self.detokenizer.stopped:
            (cancel or Row.cancel)(event.row)  # no need to compute further tokens
            self.finish_reason = "stop"
        return piece
