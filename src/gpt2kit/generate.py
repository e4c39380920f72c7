"""Autoregressive decoding with a static KV cache: prefill once, then one position per token.

`decode_steps` is the engine: it left-pads prompts of different lengths (attention mask +
position ids counted over real tokens, so every row gives what it gives alone), runs the
logits-processor pipeline, samples each row from its own generator, and drops finished
rows from the batch once half of them are done. On top of it:

- `stream_tokens` yields each step's tokens (B,);
- `generate` returns `[B, T + new]` ids for a tensor, or a list of id lists for a list of
  prompts (beam search with `num_beams > 1`);
- `stream_text` yields text pieces that never split a UTF-8 character nor leak a stop string.

Seeds: row r of the batch (after `n` copies of each prompt, prompt i's copy j is row
i * n + j) samples with `seed + r`, so `generate(m, [p0, p1], seed=s)[1]` equals
`generate(m, [p1], seed=s + 1)[0]`. A list of seeds gives one per row.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Literal, NamedTuple, overload

import torch
from torch import Tensor

from gpt2kit.beam import check_length_penalty
from gpt2kit.compiled import compiled_step
from gpt2kit.errors import ConfigError
from gpt2kit.model import GPT2, KVCache, use_decode_layout
from gpt2kit.processors import History, LogitsPipeline, build_pipeline
from gpt2kit.sampling import make_generators
from gpt2kit.stopping import TextStream
from gpt2kit.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Prompts = Tensor | Sequence[Sequence[int]]


class Step(NamedTuple):
    """One decoding step. `token` (B,): each row's next token (finished rows repeat eos).

    With `logprobs=k`: `logprob` (B,) of the chosen token and the k most likely tokens
    `top_ids`/`top_logprobs` (B, k), all under the model's own distribution (before
    temperature and filters), as the OpenAI API reports them.
    """

    token: Tensor
    logprob: Tensor | None = None
    top_ids: Tensor | None = None
    top_logprobs: Tensor | None = None


def prepare_prompt(
    model: GPT2, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int
) -> tuple[Tensor, Tensor | None, int]:
    """Check shapes, start empty prompts from <|endoftext|>, cut over-long ones from the left.

    Returns the prompt ids, its mask and how many new tokens fit in the context.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ConfigError("input_ids must be a [batch, T] tensor of token ids")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be an integer >= 0, got {max_new_tokens!r}")
    config = model.config
    B, T = input_ids.shape
    if B == 0:
        raise ConfigError("input_ids has an empty batch")
    if T == 0:
        input_ids = torch.full((B, 1), config.eos_token_id, dtype=torch.long)
        attention_mask = None
        T = 1
    if input_ids.min() < 0 or input_ids.max() >= config.vocab_size:
        raise ConfigError(f"token ids must be in [0, {config.vocab_size}), the model's vocabulary")
    if attention_mask is not None:
        check_left_padded(attention_mask, (B, T))
    n_ctx = config.n_positions
    if (n_ctx - 1 < T and max_new_tokens > 0) or n_ctx < T:
        keep = n_ctx - 1 if max_new_tokens > 0 else n_ctx
        log.warning("prompt has %d tokens; keeping the last %d to fit the context of %d", T, keep, n_ctx)
        input_ids = input_ids[:, -keep:]
        attention_mask = attention_mask[:, -keep:] if attention_mask is not None else None
        T = keep
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    return input_ids, attention_mask, min(max_new_tokens, n_ctx - T)


def check_left_padded(attention_mask: Tensor, shape: tuple[int, int]) -> None:
    """Raise ConfigError unless every row of the mask is 0s (padding) then 1s (the prompt).

    Decoding appends each new token at the end of its row, so padding on the right (or a
    hole) would sit between the prompt and its continuation and change the tokens.
    """
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
        raise ConfigError(f"attention_mask must be a tensor shaped like input_ids {shape}, got {got}")
    m = attention_mask.to(torch.int64)
    if bool(((m != 0) & (m != 1)).any()):
        raise ConfigError("attention_mask must hold only 0 (padding) and 1 (token)")
    empty = m.sum(dim=1) == 0
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise ConfigError(f"attention_mask row {row} is all 0s; give every row at least one token")
    right = (m[:, 1:] < m[:, :-1]).any(dim=1)
    if bool(right.any()):
        row = int(right.nonzero()[0, 0])
        raise ConfigError(
            f"attention_mask row {row} has a 0 after a 1 (right padding or a hole), but generation "
            "needs left padding (0s, then 1s); left-pad the batch or pass a list of token-id lists"
        )


def pad_prompts(model: GPT2, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor | None]:
    """Left-pad token-id lists into (ids (B, T), attention mask or None); empty -> <|endoftext|>."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ConfigError("prompts must be a non-empty list of token-id lists (or a [batch, T] tensor)")
    eos = model.config.eos_token_id
    rows = [token_ids(p) or [eos] for p in prompts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), eos, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r) :] = 1
    return ids, (None if bool(mask.all()) else mask)


def eos_id(model: GPT2, tokenizer: Tokenizer) -> int:
    """The id that ends a text continuation: the tokenizer's <|endoftext|>, or the model's
    eos id for a tokenizer without special tokens."""
    return tokenizer.eot_token if tokenizer.special_tokens else model.config.eos_token_id


def token_ids(prompt: object) -> list[int]:
    """One prompt as a list of Python ints. Any integers are fine (numpy's, a 1-D tensor or
    array); bools and floats are refused: they are almost always a mask or a computed value."""
    if isinstance(prompt, Tensor):
        prompt = prompt.tolist()
    try:
        if not isinstance(prompt, (str, bytes)):
            return [_int_id(t) for t in prompt]  # type: ignore[attr-defined]
    except TypeError:
        pass
    raise ConfigError("each prompt must be a list of integer token ids; encode text with the tokenizer first")


def _int_id(t: object) -> int:
    if isinstance(t, bool):  # operator.index accepts True; numpy's bool it already refuses
        raise TypeError
    return operator.index(t)  # type: ignore[arg-type]


@torch.inference_mode()
def decode_steps(
    model: GPT2,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    pipeline: LogitsPipeline,
    seed: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
    logprobs: int | None = None,
    compile: bool = False,
) -> Iterator[Step]:
    """Yield one `Step` per new token for a [B, T] batch (see the module docstring).

    Stops after `max_new_tokens`, at the context limit, or when every row has produced
    `eos_token_id` (the model's <|endoftext|> by default; -1 never stops early).
    `compile=True` runs each step as a compiled step (`gpt2kit.compiled`), built once per
    model and machine (minutes) and loaded from the step cache after; finished rows are
    then kept.
    """
    device = model.wte.weight.device
    if device.type == "cpu":
        use_decode_layout(model)  # bit-identical, ~1.5x faster matrix-vector products on CPU
    input_ids, attention_mask, max_new = prepare_prompt(model, input_ids, attention_mask, max_new_tokens)
    if max_new == 0:
        return
    if logprobs is not None and (not isinstance(logprobs, int) or not 0 <= logprobs <= 20):
        raise ConfigError(f"logprobs must be an integer in [0, 20], got {logprobs!r}")
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    B, T = input_ids.shape
    generators = make_generators(seed, B, device)
    cache = KVCache.allocate(model.config, B, T + max_new, device=device, dtype=model.wte.weight.dtype)
    decoder = compiled_step(model, slots=B, max_len=T + max_new, build=True) if compile else None
    input_ids = input_ids.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else None
    history = None
    if pipeline.needs_history:
        history = History(
            torch.zeros(B, T + max_new, dtype=torch.long, device=device),
            torch.zeros(B, T + max_new, dtype=torch.bool, device=device),
        )
        history.ids[:, :T] = input_ids
        history.valid[:, :T] = mask.bool() if mask is not None else True
    if decoder is None:
        logits = model(input_ids, attention_mask=mask, kv_cache=cache, last_only=True).logits[:, -1]
    else:  # rows from position 0 (right-padded), each then at its own position
        positions, logits = _prefill_rows(model, input_ids, mask, cache)
    active = torch.arange(B, device=device)  # original row of each cache row
    active_rows = list(range(B))
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per original row
    for step in range(max_new):
        L = T + step
        hist = History(history.ids[active, :L], history.valid[active, :L]) if history is not None else None
        gens = [generators[r] for r in active_rows] if generators is not None else None
        token = pipeline.pick(logits, hist, gens)
        if eos >= 0:
            token = token.masked_fill(done[active], eos)
        out = Step(_scatter(token, active, B, eos))
        if logprobs is not None:
            raw = logits.float().log_softmax(dim=-1)
            top = raw.topk(logprobs, dim=-1) if logprobs > 0 else None
            out = Step(
                out.token,
                _scatter(raw.gather(1, token[:, None])[:, 0], active, B, 0.0),
                _scatter(top.indices, active, B, eos) if top is not None else None,
                _scatter(top.values, active, B, 0.0) if top is not None else None,
            )
        yield out
        if history is not None:
            history.ids[active, L] = token
            history.valid[active, L] = True
        if eos >= 0:
            done[active] |= token == eos
            finished = done[active]
            n_done = int(finished.sum())
            if n_done == len(active_rows):
                return
            # Finished rows still cost a forward pass; drop them once half the batch is done
            # (the cache copy is then amortised over the steps it saves). A compiled step
            # has a static batch, so there they stay.
            if decoder is None and n_done and 2 * n_done >= len(active_rows):
                keep = (~finished).nonzero()[:, 0]
                cache.select_rows(keep)
                active = active[keep]
                active_rows = active.tolist()
                token = token[keep]
        if step + 1 < max_new:
            if decoder is not None:
                logits = decoder(token[:, None], positions, cache.k, cache.v)
                positions += 1
            else:
                logits = model(token[:, None], kv_cache=cache, last_only=True).logits[:, -1]


def _prefill_rows(
    model: GPT2, input_ids: Tensor, mask: Tensor | None, cache: KVCache
) -> tuple[Tensor, Tensor]:
    """Prefill left-padded prompts with each row's tokens moved to position 0 (the decode
    step's layout); returns each row's next position and its next-token logits."""
    B, T = input_ids.shape
    lengths = mask.sum(dim=1) if mask is not None else torch.full((B,), T, device=input_ids.device)
    shift = (torch.arange(T, device=input_ids.device) + (T - lengths)[:, None]) % T  # (B, T)
    h = model.prefill(input_ids.gather(1, shift), cache.k, cache.v)  # (B, T, C)
    return lengths, model.logits(h[torch.arange(B, device=h.device), lengths - 1])


def _scatter(values: Tensor, active: Tensor, B: int, fill: float) -> Tensor:
    """Place the active rows' values at their original rows of a (B, ...) tensor."""
    if values.shape[0] == B:
        return values
    out = torch.full((B, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    out[active] = values
    return out


@torch.inference_mode()
def stream_tokens(
    model: GPT2,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Yield the next token of every row (B,) per step. Rows that ended get `eos_token_id`.

    Stops after `max_new_tokens`, at the context limit, or when every row has produced
    `eos_token_id` (the model's <|endoftext|> by default; pass -1 to never stop early).
    """
    pipeline = build_pipeline(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    for step in decode_steps(
        model,
        input_ids,
        max_new_tokens=max_new_tokens,
        pipeline=pipeline,
        seed=seed,
        attention_mask=attention_mask,
        eos_token_id=eos_token_id,
        compile=compile,
    ):
        yield step.token


@overload
def generate(model: GPT2, input_ids: Tensor, **kwargs) -> Tensor: ...
@overload
def generate(model: GPT2, input_ids: Sequence[Sequence[int]], **kwargs) -> list[list[int]]: ...


def generate(
    model: GPT2,
    input_ids: Prompts,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    n: int = 1,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    compile: bool = False,
) -> Tensor | list[list[int]]:
    """Continue each prompt; returns the prompt plus its new tokens.

    `input_ids` a [B, T] tensor -> a [B * n, T + new] tensor; rows that end early are
    padded with `eos_token_id`, as `transformers` does for GPT-2; its `attention_mask`, if
    any, must be left padding (0s then 1s per row). A list of token-id lists (any lengths;
    Python or numpy integers, or 1-D tensors/arrays) -> a list of B * n id lists, each
    ending at its <|endoftext|> (included) or at `max_new_tokens`. `top_k=0` (or None)
    means no top-k filtering, as in `transformers`. `temperature=0` (or `top_k=1`) is greedy;
    `num_beams > 1` is beam search as `transformers` does it (see `gpt2kit.beam`).
    `compile=True` compiles the decode step (`gpt2kit.compiled`): worth it for long runs.

    >>> out = generate(model, torch.tensor([[15496]]), max_new_tokens=8, seed=0)  # doctest: +SKIP
    >>> outs = generate(model, [[15496, 995], [40]], max_new_tokens=8, temperature=0)  # doctest: +SKIP
    """
    as_list = not isinstance(input_ids, Tensor)
    if as_list:
        if attention_mask is not None:
            raise ConfigError("attention_mask is only for tensor input; a list of prompts is padded for you")
        input_ids, attention_mask = pad_prompts(model, input_ids)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ConfigError(f"--num-beams must be an integer >= 1, got {num_beams!r}")
    check_length_penalty(length_penalty)
    if n > 1 and num_beams > 1:
        raise ConfigError("n > 1 samples with beam search is not supported; use one or the other")
    if compile and num_beams > 1:
        raise ConfigError("compiled decoding is for sampling and greedy search; drop compile for beam search")
    # Prepared once here (empty -> <|endoftext|>, cut to the context, with its one warning);
    # the decoders below then get a prompt that needs no further change.
    prompt, mask, _ = prepare_prompt(model, input_ids, attention_mask, max_new_tokens)
    if n > 1:
        prompt = prompt.repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0) if mask is not None else None
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    if num_beams > 1:
        from gpt2kit.beam import beam_search

        out = beam_search(
            model,
            prompt,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            eos_token_id=eos,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
    else:
        pipeline = build_pipeline(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        steps = [
            s.token
            for s in decode_steps(
                model,
                prompt,
                max_new_tokens=max_new_tokens,
                pipeline=pipeline,
                seed=seed,
                attention_mask=mask,
                eos_token_id=eos_token_id,
                compile=compile,
            )
        ]
        new = torch.stack(steps, dim=1).cpu() if steps else prompt.new_zeros((prompt.shape[0], 0))
        out = torch.cat([prompt.cpu(), new], dim=1)
    if not as_list:
        return out
    return unpad(out, mask, prompt.shape[1], eos)


def unpad(out: Tensor, mask: Tensor | None, T: int, eos: int) -> list[list[int]]:
    """Rows of a left-padded [B, T + new] result as lists: padding removed, cut after eos."""
    rows = []
    for i, row in enumerate(out.tolist()):
        start = 0 if mask is None else int((mask[i] == 0).sum())
        new = row[T:]
        if eos >= 0 and eos in new:
            new = new[: new.index(eos) + 1]
        rows.append(row[start:T] + new)
    return rows


def stream_text(
    model: GPT2,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_token: Callable[[int], None] | None = None,
    stop: str | Sequence[str] | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    compile: bool = False,
    allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, never splitting a UTF-8 character.

    The text stops before <|endoftext|> or before the first `stop` string (which is never
    yielded, not even in part). `"".join(stream_text(...))` is the whole continuation.
    `on_token` is called with every generated id (e.g. to count them). `allowed_special="all"`
    encodes special tokens written in the prompt (`<|endoftext|>`) as themselves.
    """
    ids = tokenizer.encode(prompt, allowed_special=allowed_special) if prompt else []
    input_ids = torch.tensor([ids], dtype=torch.long).reshape(1, len(ids))
    eos = eos_id(model, tokenizer)
    text = TextStream(stop=stop)
    for token in stream_tokens(
        model,
        input_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_token_id=eos,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        compile=compile,
    ):
        t = int(token[0])
        if on_token is not None:
            on_token(t)
        if t == eos:
            break
        piece = text.push(tokenizer.decode_bytes([t]))
        if piece:
            yield piece
        if text.stopped:
            return
    tail = text.finish()
    if tail:
        yield tail
