"""`generate`: continue token-id prompts; the id-level public entry to the engine.

Prompts of any lengths decode together in the engine (`gpt2kit.generation.engine`), each row at its
own position, so a prompt gets exactly the tokens it gets alone. Row r of the batch (after
`n` copies of each prompt, prompt i's copy j is row i * n + j) samples with `seed + r`, so
`generate(m, [p0, p1], seed=s)[1]` equals `generate(m, [p1], seed=s + 1)[0]`, and the same
seed gives the same tokens through `complete` and `gpt2kit serve`.

>>> out = generate(model, torch.tensor([[15496]]), max_new_tokens=8, seed=0)  # doctest: +SKIP
>>> outs = generate(model, [[15496, 995], [40]], max_new_tokens=8, temperature=0)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import torch
from torch import Tensor

from gpt2kit.errors import ConfigError
from gpt2kit.generation.beam import beam_search
from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.engine import Engine, Row, step_for
from gpt2kit.generation.prompts import eos_id, fit_prompt, left_pad, pad_id, prompt_list, token_ids, unpad
from gpt2kit.model.gpt2 import GPT2

Prompts = Tensor | Sequence[Sequence[int]]

# Rows decoded together at most by `generate`/`complete`; more rows wait for a free slot.
MAX_SLOTS = 64


@overload
def generate(
    model: GPT2, input_ids: Tensor, config: SamplingConfig | None = None, **options: Any
) -> Tensor: ...
@overload
def generate(
    model: GPT2, input_ids: Sequence[Sequence[int]], config: SamplingConfig | None = None, **options: Any
) -> list[list[int]]: ...


def generate(
    model: GPT2,
    input_ids: Prompts,
    config: SamplingConfig | None = None,
    *,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    compile: bool | None = None,
    deterministic: bool = False,
    **options: Any,
) -> Tensor | list[list[int]]:
    """Continue each prompt; returns the prompt plus its new tokens.

    How to sample is a `SamplingConfig` (`config`), or its fields as keywords
    (`max_new_tokens=40, top_k=40, seed=0`), which override the config's. Its `stop` and
    `logprobs` are for text: use `complete`.

    `input_ids` a [B, T] tensor -> a [B * n, T + new] tensor; rows that end early are
    padded with `eos_token_id`, as `transformers` does for GPT-2; its `attention_mask`, if
    any, must be left padding (0s then 1s per row). A list of token-id lists (any lengths;
    Python or numpy integers, or 1-D tensors/arrays) -> a list of B * n id lists, each
    ending at its <|endoftext|> (included) or at `max_new_tokens`. An empty prompt starts
    from <|endoftext|>; a prompt longer than the context keeps its last tokens (a warning).
    `eos_token_id` ends a row: None is the model config's (`generation.prompts.eos_id`), -1
    never ends one (padding is then 0). `num_beams > 1` is beam search as `transformers` does it (`gpt2kit.generation.beam`).
    `compile`: None (the default) decodes with the compiled step saved for this model if
    there is one, else eagerly; True also builds it when none is saved (minutes, once per
    model, dtype and machine); False decodes eagerly. A compiled step is used only after it
    passes its check against the eager model; when one can't be had, a warning says why and
    decoding is eager (`generation.engine.step_for`).
    `deterministic=True`: a row's tokens are the same bits whichever prompts decode beside
    it (alone, in a batch, in any slot); slower (`gpt2kit.generation.engine`, docs/generation.md).
    Without it, each prompt's prefill is already its own, but a decode step's last bits may
    depend on how many rows run.
    """
    config = SamplingConfig.build(config, **options)
    if config.stop or config.logprobs is not None:
        raise ConfigError("stop and logprobs work on text: use complete(model, tokenizer, ...) for them")
    eos = eos_id(model) if eos_token_id is None else eos_token_id
    prompts = [fit_prompt(model, p, config.max_new_tokens) for p in _prompts(input_ids, attention_mask)]
    if num_beams != 1:
        if config.n > 1:
            raise ConfigError("n > 1 samples with beam search is not supported; use one or the other")
        if config.min_tokens or config.ignore_eos:
            raise ConfigError("min_tokens and ignore_eos work with sampling and greedy search, not beams")
        beams = {"num_beams": num_beams, "length_penalty": length_penalty, "early_stopping": early_stopping}
        new = _beam_tokens(
            model, prompts, config, eos=eos, compile=compile, deterministic=deterministic, **beams
        )
    else:
        rows = run(model, prompts, config, eos_token_id=eos, compile=compile, deterministic=deterministic)
        new = [row.tokens for row in rows]
    if not isinstance(input_ids, Tensor):
        return [prompts[r // config.n] + tokens for r, tokens in enumerate(new)]
    return _as_tensor(input_ids, prompts, new, eos=eos, n=config.n)


def _prompts(input_ids: Prompts, attention_mask: Tensor | None) -> list[list[int]]:
    """The prompts as token-id lists: a tensor's rows less their left padding, or the lists checked."""
    if isinstance(input_ids, Tensor):
        return unpad(input_ids, attention_mask)
    if attention_mask is not None:
        raise ConfigError("attention_mask is only for tensor input; a list of prompts is padded for you")
    return [token_ids(p) for p in prompt_list(input_ids)]


def _beam_tokens(
    model: GPT2,
    prompts: list[list[int]],
    config: SamplingConfig,
    *,
    eos: int,
    compile: bool | None,
    deterministic: bool,
    **beams: Any,
) -> list[list[int]]:
    """Each prompt's new tokens from beam search (`beams`: num_beams, length_penalty, early_stopping)."""
    ids, mask = left_pad(prompts, eos)
    out = beam_search(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos,
        repetition_penalty=config.repetition_penalty,
        no_repeat_ngram_size=config.no_repeat_ngram_size,
        compile=compile,
        deterministic=deterministic,
        **beams,
    )
    return [row[ids.shape[1] :] for row in out.tolist()]


def _as_tensor(
    input_ids: Tensor, prompts: list[list[int]], new: list[list[int]], *, eos: int, n: int
) -> Tensor:
    """[B * n, W + new]: the input as given (its padding ids kept), less what was cut to fit the
    context, then each row's new tokens; shorter rows padded with `pad_id(eos)`."""
    W, T = max(len(p) for p in prompts), input_ids.shape[1]
    head = input_ids[:, T - W :].cpu() if W <= T else left_pad(prompts, eos)[0]
    width = max((len(t) for t in new), default=0)
    out = torch.full((len(new), W + width), pad_id(eos), dtype=torch.long)
    out[:, :W] = head.repeat_interleave(n, dim=0)
    for r, tokens in enumerate(new):
        out[r, W : W + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


def run(
    model: GPT2,
    prompts: Sequence[list[int]],
    config: SamplingConfig,
    *,
    eos_token_id: int,
    compile: bool | None = None,
    deterministic: bool = False,
) -> list[Row]:
    """Decode `n` rows per prompt to the end; returns the rows (prompt i's sample j at i * n + j)."""
    engine, rows = start(
        model, prompts, config, eos_token_id=eos_token_id, compile=compile, deterministic=deterministic
    )
    for _ in engine.events():
        pass
    return rows


def start(
    model: GPT2,
    prompts: Sequence[list[int]],
    config: SamplingConfig,
    *,
    eos_token_id: int,
    compile: bool | None = None,
    slots: int | None = None,
    deterministic: bool = False,
) -> tuple[Engine, list[Row]]:
    """An engine sized for these prompts with their rows queued (row r = i * n + j, seed + r);
    `slots` rows at most decode together (default: every row, at most MAX_SLOTS);
    `deterministic` as in `generate`."""
    count = len(prompts) * config.n
    if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool) or slots < 1):
        raise ConfigError(f"batch_size must be an integer >= 1, got {slots!r}")
    slots = min(count, slots or MAX_SLOTS)
    max_len = min(model.config.n_positions, max(len(p) for p in prompts) + config.max_new_tokens)
    engine = Engine(
        model,
        slots=slots,
        max_len=max_len,
        eos_token_id=eos_token_id,
        step=step_for(model, slots=slots, max_len=max_len, compile=compile, deterministic=deterministic),
        deterministic=deterministic,
    )
    rows = [
        engine.add(p, config, seed=config.row_seed(i * config.n + j), tag=i * config.n + j)
        for i, p in enumerate(prompts)
        for j in range(config.n)
    ]
    return engine, rows
