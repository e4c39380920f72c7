"""What to generate and how to choose each token: one frozen `SamplingConfig`, one sampler.

`SamplingConfig` holds every control of a generation and checks itself once, when it is
made; its errors (`SamplingError`) name the field (`top_p must be in (0, 1], got 2`), and
the CLI and the server translate field names into their own words in one place each.
Every caller (`generate`, `complete`, `gpt2kit generate`, the evals, `gpt2kit serve`)
describes its request with it and the engine (`gpt2kit.generation.engine`) carries it per row.

Randomness: row r of a request draws from its own `torch.Generator` seeded with
`seed + r`, one uniform number per step (greedy rows too), so a row's tokens depend only on
(seed, r): never on the other rows in the batch, on when it joined, or on the caller.

>>> SamplingConfig(temperature=0.8, top_k=40, stop="\\n").stop
('\\n',)
>>> SamplingConfig(top_p=2)
Traceback (most recent call last):
...
gpt2kit.generation.config.SamplingError: top_p must be in (0, 1], got 2
"""

from __future__ import annotations

import dataclasses
import math
import operator
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gpt2kit.errors import ConfigError


class SamplingError(ConfigError):
    """A `SamplingConfig` field is invalid; `field` names it (callers map it to a flag or a wire name)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingConfig:
    """Every control of one generation. Fields at their neutral value change nothing.

    - `max_new_tokens`: tokens to generate at most (the context may cut it shorter).
    - `temperature`: 0 is greedy; < 1 peaked, > 1 flat. `top_k` (0 or None = off),
      `top_p` (nucleus, 1 = off), `min_p` (drop tokens below min_p x the top probability).
    - `repetition_penalty` (CTRL's, over prompt and output, > 1 discourages repeats),
      `presence_penalty` / `frequency_penalty` (OpenAI's, over the output, in [-2, 2]),
      `no_repeat_ngram_size` (never repeat an n-gram of the prompt or output),
      `logit_bias` ({token id: bias in [-100, 100]} added to the logits).
    - `stop`: strings that end the text (not included in it, unless
      `include_stop_str_in_output`); an empty string is an error (it would match at once).
    - `n`: samples per prompt; `seed`: row r samples with `seed + r` (None: fresh randomness).
    - `logprobs`: report each token's log-probability and the k most likely (0..20).
    - `min_tokens` (<= max_new_tokens): neither the eos (it is never drawn) nor a stop string
      (the text of the first min_tokens tokens is not searched) ends a row before it has
      this many tokens. `ignore_eos`: the eos is a token like any other and ends nothing.
    - The text rules (`gpt2kit.generation.textstream`): `include_stop_str_in_output`,
      `skip_special_tokens` (True: <|endoftext|> adds no text), `spaces_between_special_tokens`
      (accepted; a byte-level BPE inserts no spaces either way). vLLM's names and defaults.

    The order logits go through is fixed: logit_bias, repetition penalty, presence and
    frequency penalties, no-repeat n-grams (these edit the model's scores; greedy takes the
    argmax here), then temperature, top-k, top-p and min-p (transformers' order).

    >>> SamplingConfig(top_k=0).top_k is None, SamplingConfig(temperature=0).greedy
    (True, True)
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop: str | Sequence[str] = ()
    n: int = 1
    seed: int | None = None
    logprobs: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise SamplingError("max_new_tokens", f"must be an integer >= 0, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise SamplingError(
                "temperature", f"must be a number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise SamplingError("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        set_(self, "top_k", self.top_k or None)
        top_p = 1.0 if self.top_p is None else self.top_p
        if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
            raise SamplingError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        min_p = 0.0 if self.min_p is None else self.min_p
        if not _is_number(min_p) or not 0.0 <= min_p <= 1.0:
            raise SamplingError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        rep = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        if not _is_number(rep) or rep <= 0:
            raise SamplingError("repetition_penalty", f"must be a number > 0 (1 = off), got {rep!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            value = 0.0 if value is None else value
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise SamplingError(name, f"must be in [-2, 2] (0 = off), got {value!r}")
            set_(self, name, float(value))
        ngram = self.no_repeat_ngram_size
        if ngram is not None and (not _is_int(ngram) or ngram < 0):
            raise SamplingError("no_repeat_ngram_size", f"must be an integer >= 1 (0 = off), got {ngram!r}")
        set_(self, "top_p", float(top_p))
        set_(self, "min_p", float(min_p))
        set_(self, "repetition_penalty", float(rep))
        set_(self, "temperature", float(self.temperature))
        set_(self, "no_repeat_ngram_size", ngram or None)
        set_(self, "logit_bias", _check_logit_bias(self.logit_bias))
        set_(self, "stop", check_stop(self.stop))
        if not _is_int(self.n) or self.n < 1:
            raise SamplingError("n", f"must be an integer >= 1, got {self.n!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise SamplingError("seed", f"must be an integer or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise SamplingError("logprobs", f"must be an integer in [0, 20], got {self.logprobs!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise SamplingError(
                "min_tokens",
                f"must be an integer in [0, max_new_tokens={self.max_new_tokens}], got {self.min_tokens!r}",
            )
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(name, f"must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.spaces_between_special_tokens, bool):
            value = self.spaces_between_special_tokens
            raise SamplingError("spaces_between_special_tokens", f"must be true or false, got {value!r}")

    # --- derived views --------------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        """Temperature 0 or top-k 1: always the most likely token (after the penalties)."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def scoring(self) -> tuple:
        """The fields that decide how logits become a token; rows equal here are processed together."""
        return (
            self.temperature,
            self.top_k,
            self.top_p,
            self.min_p,
            self.repetition_penalty,
            self.presence_penalty,
            self.frequency_penalty,
            self.no_repeat_ngram_size,
            self.logit_bias,
        )

    @property
    def needs_seen(self) -> bool:
        """Needs each row's set of prompt and output tokens (the repetition penalty)."""
        return self.repetition_penalty != 1.0

    @property
    def needs_counts(self) -> bool:
        """Needs each row's output-token counts (presence and frequency penalties)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes: Any) -> SamplingConfig:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls, config: SamplingConfig | None = None, **options: Any) -> SamplingConfig:
        """`config` (or the defaults) with `options` applied; an unknown option is a SamplingError.

        This is how `generate(model, ids, max_new_tokens=20, top_k=40)` reads its keywords.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        for name in options:
            if name not in names:
                raise SamplingError(
                    name, f"is not a sampling option; the options are: {', '.join(sorted(names))}"
                )
        base = config if config is not None else cls()
        if not isinstance(base, cls):
            raise ConfigError(f"config must be a SamplingConfig, got {type(base).__name__}")
        return base.replace(**options) if options else base

    def check_vocab(self, vocab_size: int) -> None:
        """The one rule that needs the model: every `logit_bias` id is in [0, vocab_size)."""
        bad = next((t for t in self.logit_bias if t >= vocab_size), None)
        if bad is not None:
            raise SamplingError(
                "logit_bias", f"token id {bad} is outside the model's vocabulary [0, {vocab_size})"
            )

    def row_seed(self, row: int) -> int | None:
        """The seed of row `row` of the request: `seed + row` (None: fresh randomness)."""
        return None if self.seed is None else self.seed + row


def _check_logit_bias(bias: object) -> Mapping[int, float]:
    if bias is None:
        return _FrozenDict()
    if not isinstance(bias, Mapping):
        raise SamplingError("logit_bias", f"must map token ids to numbers, got {type(bias).__name__}")
    out = {}
    for key, value in bias.items():
        try:
            if isinstance(key, bool):
                raise TypeError
            token = int(key) if isinstance(key, str) else operator.index(key)
        except (TypeError, ValueError):
            raise SamplingError("logit_bias", f"keys must be token ids, got {key!r}") from None
        if token < 0:
            raise SamplingError("logit_bias", f"keys must be token ids >= 0, got {key!r}")
        if not _is_number(value) or not -100.0 <= value <= 100.0:
            raise SamplingError(
                "logit_bias", f"values must be numbers in [-100, 100], got {value!r} for {key!r}"
            )
        out[token] = float(value)
    return _FrozenDict(sorted(out.items()))


def check_stop(stop: object) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings (a string, a list of them, or None), or SamplingError."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, Sequence):
        raise SamplingError("stop", f"must be a string or a list of strings, got {type(stop).__name__}")
    out = tuple(stop)
    if any(not isinstance(s, str) for s in out):
        raise SamplingError("stop", f"must be a string or a list of strings, got {list(out)!r}")
    if any(not s for s in out):
        raise SamplingError("stop", "'' would stop before the first token; give the text to stop before")
    return out


class _FrozenDict(dict):
    """A read-only dict that hashes, so a frozen config stays hashable and comparable."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))

    def _readonly(self, *args: object, **kwargs: object) -> None:
        raise TypeError("SamplingConfig.logit_bias is read-only; use config.replace(logit_bias=...)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(dict(self))


# --- the sampler: one for everyone --------------------------------------------------------


def row_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """The generator of one row: seeded with `seed` (mod 2**64), or at random when None."""
    value = secrets.randbits(63) if seed is None else seed % 2**64
    return torch.Generator(device=device).manual_seed(value)


def uniforms(generators: Sequence[torch.Generator], device: torch.device | str) -> Tensor:
    """One uniform number in [0, 1) per row (B,), each from the row's own generator."""
    return torch.cat([torch.rand(1, generator=g, device=device) for g in generators])


def draw(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling: per row the first token whose cumulative probability exceeds u.

    `probs` (B, V) need not be normalised (zeros are never drawn); `u` (B,) in [0, 1). One
    number per row per step, not one per vocabulary entry: at 50257 entries a per-entry
    draw (the exponential race) costs as much as a small model's forward pass.

    >>> draw(torch.tensor([[0.0, 0.5, 0.5]]), torch.tensor([0.25]))
    tensor([1])
    """
    cdf = probs.float().cumsum(dim=-1)  # (B, V)
    # Scaled by the total, so float round-off in the cumsum can never push u past the end.
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True)[:, 0]
    return drawn.clamp(max=probs.shape[-1] - 1)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits in each row (ties at the k-th value are kept), -inf the rest."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    # Drop a token when the tokens before it already reach p; the top token always stays.
    drop_sorted = before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, p: float) -> Tensor:
    """Drop tokens less likely than `p` times the most likely one (transformers' min-p)."""
    probs = logits.softmax(dim=-1)
    threshold = p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))
