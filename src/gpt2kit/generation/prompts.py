"""Prompts as the engine takes them: token-id lists, fitted to the context, padded when a tensor is wanted.

One place for each rule, which every entry point (`generate`, `beam_search`, `complete`,
`gpt2kit generate`, the server, the Explorer, the evaluators) calls:

- `eos_id`: the end-of-text id, <|endoftext|>: it ends a continuation, starts an empty
  prompt or context, and pads;
- `fit_prompt`: an empty prompt starts from it; an over-long one keeps its last tokens;
- `left_pad` / `pad_id`: token-id lists as one left-padded [B, T] tensor and its mask;
- `check_left_padded` / `unpad`: a [B, T] tensor's attention mask must be left padding.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from gpt2kit.errors import ConfigError
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.tokenizer.tokenizer import EOT, Tokenizer

log = logging.getLogger(__name__)


def eos_id(model: GPT2, tokenizer: Tokenizer | None = None) -> int:
    """The end-of-text id: the tokenizer's <|endoftext|> when there is a tokenizer and it has
    that token, else the model config's `eos_token_id`.

    When the two disagree (a tokenizer whose <|endoftext|> is not the config's eos id), the
    tokenizer's wins: it is the id the text is written with. Id-level calls without a
    tokenizer (`generate`, `beam_search`, `evals.scoring`) take the config's, as does a
    tokenizer without <|endoftext|>. GPT-2 uses this one token as bos and eos alike.

    >>> eos_id(model, Tokenizer.gpt2())  # doctest: +SKIP
    50256
    """
    if tokenizer is not None and EOT in tokenizer.special_tokens:
        return tokenizer.eot_token
    return model.config.eos_token_id


def pad_id(eos_token_id: int) -> int:
    """The id padding is written with: the eos id, as `transformers` pads GPT-2's outputs, or 0
    when there is none (`eos_token_id=-1`: never stop). A mask or a length says where it is."""
    return eos_token_id if eos_token_id >= 0 else 0


def fit_prompt(
    model: GPT2, prompt: list[int], max_new_tokens: int, *, tokenizer: Tokenizer | None = None
) -> list[int]:
    """An empty prompt starts from <|endoftext|> (`eos_id(model, tokenizer)`); an over-long one
    keeps its last tokens."""
    config = model.config
    if not prompt:
        return [eos_id(model, tokenizer)]
    n_ctx = config.n_positions
    keep = n_ctx - 1 if max_new_tokens > 0 else n_ctx
    if len(prompt) > keep:
        log.warning(
            "prompt has %d tokens; keeping the last %d to fit the context of %d", len(prompt), keep, n_ctx
        )
        return prompt[-keep:]
    return prompt


def left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor | None]:
    """Token-id lists as one left-padded [B, T] tensor (padding: `pad_id(pad)`) and its mask,
    1 for a token and 0 for padding (None when no row is padded).

    >>> left_pad([[1, 2], [3]], 0)
    (tensor([[1, 2],
            [0, 3]]), tensor([[1, 1],
            [0, 1]]))
    """
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id(pad), dtype=torch.long)
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
