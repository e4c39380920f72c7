"""`complete`: text in, completions out, whole or streamed; the text-level public entry to the engine.

Every completion has its text (cut before the first stop string, which never appears in
it, and never split inside a UTF-8 character), its token ids, why it ended and, when
asked, each token's log-probability and the top alternatives. All prompts and samples
decode together in the engine; completion r (prompt i, sample j: r = i * n + j) samples
with `seed + r`, exactly as `gpt2kit serve` does for the same request.

>>> done = complete(model, tok, ["Hello", "Once upon"], max_new_tokens=16, n=2, stop=["\\n"], seed=0)  # doctest: +SKIP
>>> done[0].text, done[0].finish_reason  # doctest: +SKIP
(' world, ...', 'length')
>>> for chunk in complete(model, tok, "Hello", max_new_tokens=16, stream=True):  # doctest: +SKIP
...     print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from gpt2kit.errors import ConfigError
from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.engine import Engine, FinishEvent, Row, TokenEvent
from gpt2kit.generation.generate import start
from gpt2kit.generation.prompts import eos_id, fit_prompt, token_ids
from gpt2kit.generation.textstream import RowText
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.tokenizer.tokenizer import Tokenizer

Prompts = str | Sequence[str] | Sequence[Sequence[int]]


@dataclass
class Completion:
    """One sample for one prompt. `finish_reason`: "stop" (eos or a stop string) or "length".

    `token_ids` are the tokens the text came from (up to and including the one that
    completed a stop string or the eos). With `logprobs=k`, `token_logprobs[t]` is the
    log-probability of `token_ids[t]` and `top_logprobs[t]` maps the k most likely
    tokens' ids to theirs, under the model's own distribution.
    """

    prompt_index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    token_logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class CompletionChunk:
    """A piece of completion `index` (prompt i's sample j is i * n + j) while it streams.

    `text` is new final text ('' when a token only started a UTF-8 character or a possible
    stop string), `token_ids` the tokens it came from; the completion's last chunk has
    its `finish_reason`.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@overload
def complete(
    model: GPT2,
    tokenizer: Tokenizer,
    prompts: Prompts,
    config: SamplingConfig | None = None,
    *,
    stream: Literal[False] = False,
    allowed_special: Literal["all"] | AbstractSet[str] = ...,
    compile: bool | None = None,
    batch_size: int | None = None,
    deterministic: bool = False,
    **options: Any,
) -> list[Completion]: ...
@overload
def complete(
    model: GPT2,
    tokenizer: Tokenizer,
    prompts: Prompts,
    config: SamplingConfig | None = None,
    *,
    stream: Literal[True],
    allowed_special: Literal["all"] | AbstractSet[str] = ...,
    compile: bool | None = None,
    batch_size: int | None = None,
    deterministic: bool = False,
    **options: Any,
) -> Iterator[CompletionChunk]: ...


def complete(
    model: GPT2,
    tokenizer: Tokenizer,
    prompts: Prompts,
    config: SamplingConfig | None = None,
    *,
    stream: bool = False,
    allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
    compile: bool | None = None,
    batch_size: int | None = None,
    deterministic: bool = False,
    **options: Any,
) -> list[Completion] | Iterator[CompletionChunk]:
    """Complete every prompt `config.n` times: `len(prompts) * n` completions, prompt by prompt.

    A prompt is text, or token ids (already encoded; used as they are). How to sample is a
    `SamplingConfig`, or its fields as keywords (`max_new_tokens=16, stop=["\\n"], seed=0`).
    `stream=True` returns an iterator of `CompletionChunk`s as the tokens come (the settings
    are checked before it is returned). `allowed_special="all"` encodes special tokens
    written in a prompt (`<|endoftext|>`) as themselves; by default they are an error, as in
    `Tokenizer.encode`. `compile` as in `generate`; `batch_size` caps the rows decoded
    together (the engine's slots; default: all rows, at most 64). `deterministic=True`: each
    completion's tokens are the same bits whatever else decodes beside it (as in `generate`).
    """
    config = SamplingConfig.build(config, **options)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ConfigError("prompts must be a string, or a non-empty list of strings or token-id lists")
    ids = [
        fit_prompt(
            model,
            tokenizer.encode(p, allowed_special=allowed_special) if isinstance(p, str) else token_ids(p),
            config.max_new_tokens,
            tokenizer=tokenizer,
        )
        for p in prompts
    ]
    engine, rows = start(
        model,
        ids,
        config,
        eos_token_id=eos_id(model, tokenizer),
        compile=compile,
        slots=batch_size,
        deterministic=deterministic,
    )
    texts = _Texts(tokenizer, rows, config)
    chunks = texts.chunks(engine)
    if stream:
        return chunks
    for _ in chunks:
        pass
    return texts.completions


class _Texts:
    """Each row's text as its events come (`RowText`: stop strings, UTF-8, the eos policy)."""

    def __init__(self, tokenizer: Tokenizer, rows: list[Row], config: SamplingConfig) -> None:
        self.config = config
        self.rows = [RowText(tokenizer, config) for _ in rows]
        self.sent = [0] * len(rows)  # tokens already in a chunk

    @property
    def completions(self) -> list[Completion]:
        want, top = self.config.logprobs is not None, bool(self.config.logprobs)
        return [
            Completion(
                r // self.config.n,
                row.text,
                row.token_ids,
                row.finish_reason or "",
                row.logprobs if want else None,  # type: ignore[arg-type]
                [dict(t or []) for t in row.tops] if top else None,
            )
            for r, row in enumerate(self.rows)
        ]

    def chunks(self, engine: Engine) -> Iterator[CompletionChunk]:
        for event in engine.events():
            if not isinstance(event, (TokenEvent, FinishEvent)):
                continue
            r = event.row.tag
            assert isinstance(r, int)
            row = self.rows[r]
            piece = row.take(event)
            if piece is None or not (piece or row.done):
                continue  # past the end, or a token that only started a character or a stop string
            yield CompletionChunk(r, piece, row.token_ids[self.sent[r] :], row.finish_reason)
            self.sent[r] = len(row.token_ids)
