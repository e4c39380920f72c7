"""Autoregressive decoding with a static KV cache: prefill once, then one position per token.

`stream_tokens` yields each step's tokens as they are chosen; `generate` collects them into
the transformers-style `[batch, prompt + new]` tensor; `stream_text` yields text pieces
that never split a UTF-8 character.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from gpt2kit.errors import ConfigError
from gpt2kit.model import GPT2, KVCache
from gpt2kit.sampling import check_sampling, make_generators, sample
from gpt2kit.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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
    n_ctx = config.n_positions
    if (n_ctx - 1 < T and max_new_tokens > 0) or n_ctx < T:
        keep = n_ctx - 1 if max_new_tokens > 0 else n_ctx
        log.warning("prompt has %d tokens; keeping the last %d to fit the context of %d", T, keep, n_ctx)
        input_ids = input_ids[:, -keep:]
        attention_mask = attention_mask[:, -keep:] if attention_mask is not None else None
        T = keep
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ConfigError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {(B, T)}")
        if bool(attention_mask.all()):
            attention_mask = None
    return input_ids, attention_mask, min(max_new_tokens, n_ctx - T)


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
) -> Iterator[Tensor]:
    """Yield the next token of every row (B,) per step. Rows that ended get `eos_token_id`.

    Stops after `max_new_tokens`, at the context limit, or when every row has produced
    `eos_token_id` (the model's <|endoftext|> by default; pass -1 to never stop early).
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    device = model.wte.weight.device
    input_ids, attention_mask, max_new = prepare_prompt(model, input_ids, attention_mask, max_new_tokens)
    if max_new == 0:
        return
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    B, T = input_ids.shape
    generators = make_generators(seed, B, device)
    cache = KVCache.allocate(model.config, B, T + max_new, device=device, dtype=model.wte.weight.dtype)
    input_ids = input_ids.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else None
    logits = model(input_ids, attention_mask=mask, kv_cache=cache, last_only=True).logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new):
        token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generators=generators)
        token = token.masked_fill(done, eos) if eos >= 0 else token
        yield token
        if eos >= 0:
            done |= token == eos
            if bool(done.all()):
                return
        if step + 1 < max_new:
            logits = model(token[:, None], kv_cache=cache, last_only=True).logits[:, -1]


def generate(
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
) -> Tensor:
    """Continue each row of `input_ids` [B, T]; returns [B, T + new] ids, prompt included.

    `temperature=0` (or `top_k=1`) is greedy. Rows that end early are padded with
    `eos_token_id`, as `transformers` does for GPT-2.

    >>> out = generate(model, torch.tensor([[15496]]), max_new_tokens=8, seed=0)  # doctest: +SKIP
    """
    prompt, _, _ = prepare_prompt(model, input_ids, attention_mask, max_new_tokens)
    steps = list(
        stream_tokens(
            model,
            input_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            attention_mask=attention_mask,
            eos_token_id=eos_token_id,
        )
    )
    new = torch.stack(steps, dim=1).cpu() if steps else prompt.new_zeros((prompt.shape[0], 0))
    return torch.cat([prompt.cpu(), new], dim=1)


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
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, never splitting a UTF-8 character.

    The text stops before <|endoftext|>. `"".join(stream_text(...))` is the whole
    continuation. `on_token` is called with every generated id (e.g. to count them).
    """
    ids = tokenizer.encode(prompt) if prompt else []
    input_ids = torch.tensor([ids], dtype=torch.long).reshape(1, len(ids))
    eos = tokenizer.eot_token if tokenizer.special_tokens else model.config.eos_token_id
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in stream_tokens(
        model,
        input_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_token_id=eos,
    ):
        t = int(token[0])
        if on_token is not None:
            on_token(t)
        if t == eos:
            break
        piece = decoder.decode(tokenizer.decode_bytes([t]))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
