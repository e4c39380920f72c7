"""Prompts as the engine takes them: token-id lists, fitted to the context, padded when a tensor is wanted.

One place for each rule: an empty prompt starts from <|endoftext|>; an over-long one keeps
its last tokens; a [B, T] tensor's attention mask must be left padding; which id ends a
text continuation.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from gpt2kit.errors import ConfigError
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def fit_prompt(model: GPT2, prompt: list[int], max_new_tokens: int) -> list[int]:
    """An empty prompt starts from <|endoftext|>; an over-long one keeps its last tokens."""
    config = model.config
    if not prompt:
        return [config.eos_token_id]
    n_ctx = config.n_positions
    keep = n_ctx - 1 if max_new_tokens > 0 else n_ctx
    if len(prompt) > keep:
        log.warning(
            "prompt has %d tokens; keeping the last %d to fit the context of %d", len(prompt), keep, n_ctx
        )
        return prompt[-keep:]
    return prompt


def left_pad(prompts: Sequence[list[int]], pad: int) -> tuple[Tensor, Tensor | None]:
    """Token-id lists as one left-padded [B, T] tensor and its mask (None when no row is padded)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad if pad >= 0 else 0, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p) :] = 1
    return ids, (None if bool(mask.all()) else mask)


def prompt_list(prompts: object) -> list[object]:
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or len(prompts) == 0:  # type: ignore[arg-type]
        raise ConfigError("prompts must be a non-empty list of token-id lists (or a [batch, T] tensor)")
    return list(prompts)  # type: ignore[call-overload]


def unpad(input_ids: Tensor, attention_mask: Tensor | None) -> list[list[int]]:
    """The rows of a [B, T] tensor as lists, left padding removed."""
    if input_ids.dim() != 2:
        raise ConfigError("input_ids must be a [batch, T] tensor of token ids")
    B, T = input_ids.shape
    if B == 0:
        raise ConfigError("input_ids has an empty batch")
    rows = input_ids.tolist()
    if attention_mask is None:
        return rows
    check_left_padded(attention_mask, (B, T))
    pads = (attention_mask == 0).sum(dim=1).tolist()
    return [row[pad:] for row, pad in zip(rows, pads, strict=True)]


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
