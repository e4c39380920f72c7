"""Text in, completions out: `n` samples per prompt, stop strings, log-probabilities.

The rich counterpart of `generate`: prompts are strings, every completion is a
`Completion` with its text (cut before the first stop string, which never appears in it),
its token ids, why it ended, and, when asked, each token's log-probability and the top
alternatives. All prompts and samples decode together in one left-padded batch; a
completion's row r (prompt i, sample j: r = i * n + j) samples with `seed + r`.

>>> done = complete(model, tok, ["Hello", "Once upon"], max_new_tokens=16, n=2, stop=["\\n"], seed=0)  # doctest: +SKIP
>>> done[0].text, done[0].finish_reason  # doctest: +SKIP
(' world, ...', 'length')
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Literal

from gpt2kit.errors import ConfigError
from gpt2kit.generate import decode_steps, eos_id, pad_prompts
from gpt2kit.model import GPT2
from gpt2kit.processors import build_pipeline
from gpt2kit.stopping import TextStream, check_stop
from gpt2kit.tokenizer import Tokenizer


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


def complete(
    model: GPT2,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int,
    n: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    logprobs: int | None = None,
    allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
) -> list[Completion]:
    """Complete every prompt `n` times; returns `len(prompts) * n` completions, prompt by prompt.

    `allowed_special="all"` encodes special tokens written in a prompt (`<|endoftext|>`) as
    themselves; by default they are an error, as in `Tokenizer.encode`.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"n must be an integer >= 1, got {n!r}")
    stops = check_stop(stop)
    pipeline = build_pipeline(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    rows = [
        tokenizer.encode(p, allowed_special=allowed_special) if p else [] for p in prompts for _ in range(n)
    ]
    ids, mask = pad_prompts(model, rows)
    eos = eos_id(model, tokenizer)
    streams = [TextStream(stop=stops) for _ in rows]
    out = [
        Completion(i // n, "", [], "length", [] if logprobs is not None else None) for i in range(len(rows))
    ]
    if logprobs:
        for c in out:
            c.top_logprobs = []
    live = set(range(len(rows)))
    for step in decode_steps(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        pipeline=pipeline,
        seed=seed,
        attention_mask=mask,
        eos_token_id=eos,
        logprobs=logprobs,
    ):
        tokens = step.token.tolist()
        lps = step.logprob.tolist() if step.logprob is not None else None
        tops = (step.top_ids.tolist(), step.top_logprobs.tolist()) if step.top_ids is not None else None
        for r in sorted(live):
            c, t = out[r], tokens[r]
            c.token_ids.append(t)
            if lps is not None:
                c.token_logprobs.append(lps[r])
            if tops is not None:
                c.top_logprobs.append(dict(zip(tops[0][r], tops[1][r], strict=True)))
            if t == eos:
                c.finish_reason = "stop"
                live.discard(r)
                continue
            streams[r].push(tokenizer.decode_bytes([t]))
            if streams[r].stopped:
                c.finish_reason = "stop"
                live.discard(r)
        if not live:
            break
    for r, c in enumerate(out):
        streams[r].finish()
        c.text = streams[r].text
    return out
