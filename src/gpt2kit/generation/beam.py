"""Beam search, step for step as `transformers` does it (so the outputs are identical).

Each prompt keeps `num_beams` running hypotheses. Every step scores all
`num_beams * vocab` continuations by summed log-probability, keeps the best
`2 * num_beams` (so enough non-finished ones remain), moves the candidates that end with
<|endoftext|> or reach the length limit into the finished set, scored
`sum_logprobs / new_len ** length_penalty`, and continues the best `num_beams` others.
The engine's cache slots follow their beams (`SlotCache.reorder`). Like `transformers`, it
stops when no running beam can beat the worst finished one (`early_stopping=False`,
judged at the current length), when every prompt has `num_beams` finished hypotheses
(`early_stopping=True`), or at `max_new_tokens`.

>>> out = beam_search(model, torch.tensor([[464, 3290]]), max_new_tokens=8, num_beams=4)  # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gpt2kit.errors import ConfigError
from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.engine import SlotCache, step_for
from gpt2kit.generation.processors import History, penalise
from gpt2kit.generation.prompts import fit_prompt, left_pad, unpad
from gpt2kit.model.gpt2 import GPT2, use_decode_layout

NEG = -1.0e9  # the "impossible" score transformers adds; kept identical so ties break alike


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """t (B, K, ...) -> t[b, index[b, j], ...] (B, J, ...)."""
    batch = torch.arange(t.shape[0], device=t.device)[:, None]
    return t[batch, index]


def check_length_penalty(length_penalty: float) -> None:
    """A finite number: NaN or inf would rank every finished beam the same."""
    if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise ConfigError(f"--length-penalty must be a finite number (1 = neutral), got {length_penalty!r}")


@torch.inference_mode()
def beam_search(
    model: GPT2,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    compile: bool | None = None,
) -> Tensor:
    """Best beam per prompt: [B, T + new] ids, shorter results padded with eos (as `transformers`).

    `input_ids` [B, T], left-padded when `attention_mask` is given; prompts longer than the
    context keep their last tokens. `repetition_penalty` and `no_repeat_ngram_size` edit the
    beams' log-probabilities as in `transformers`. `compile` as in `generate`: the beams
    decode with the engine's compiled step when one is saved (or built, with True).
    """
    if early_stopping not in (True, False, "never"):
        raise ConfigError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ConfigError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    check_length_penalty(length_penalty)
    penalties = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    device = model.wte.weight.device
    if device.type == "cpu":
        use_decode_layout(model)
    prompts = [fit_prompt(model, p, max_new_tokens) for p in unpad(input_ids, attention_mask)]
    pad = model.config.eos_token_id if eos_token_id is None else eos_token_id
    prompt, mask = left_pad(prompts, pad)
    max_new = min(max_new_tokens, model.config.n_positions - max(len(p) for p in prompts))
    if max_new <= 0:
        return prompt
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    B, T = prompt.shape
    K, V = num_beams, model.config.vocab_size
    max_length = T + max_new
    keep = 2 * K  # transformers: max(2, 1 + number of eos ids) * num_beams
    top_mask = torch.arange(keep, device=device) < K
    fill = eos if eos >= 0 else 0

    ids = prompt.to(device).repeat_interleave(K, dim=0)  # (B*K, T)
    flat_mask = mask.to(device).repeat_interleave(K, dim=0) if mask is not None else None
    valid = flat_mask.bool() if flat_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    running = torch.full((B, K, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :T] = ids.view(B, K, T)
    sequences = running.clone()
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = NEG  # all beams start identical: only the first may expand
    scores = torch.full((B, K), NEG, device=device)
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    running_parent = torch.full((B, K, max_new), -1, dtype=torch.long, device=device)
    parents = running_parent.clone()
    batch_offset = torch.arange(B, device=device)[:, None] * K

    lengths = [len(p) for p in prompts for _ in range(K)]  # real prompt length of each row
    max_len = max(lengths) + max_new
    step = step_for(model, slots=B * K, max_len=max_len, compile=compile)
    cache = SlotCache(model, slots=B * K, max_len=max_len, step=step)
    _, logits = cache.prefill(0, [p for p in prompts for _ in range(K)])
    cur = T
    while True:
        logp = logits.float().log_softmax(dim=-1)  # (B*K, V)
        if penalties.needs_seen or penalties.no_repeat_ngram_size:
            logp = penalise(logp, penalties, _history(running[:, :, :cur].reshape(B * K, cur), valid, V))
        logp = (logp.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        topk_scores, topk_index = torch.topk(logp, k=keep)  # (B, 2K)
        beam = topk_index // V
        token = topk_index % V
        topk_seq = _gather(running, beam)  # (B, 2K, max_length)
        topk_seq[:, :, cur] = token
        topk_parent = _gather(running_parent, beam)
        topk_parent[:, :, cur - T] = beam + batch_offset
        hits = (token == eos) if eos >= 0 else torch.zeros_like(token, dtype=torch.bool)
        if cur + 1 >= max_length:
            hits = torch.ones_like(hits)

        # The best K candidates that did not just finish keep running.
        run_scores = topk_scores + hits.float() * NEG
        nxt = torch.topk(run_scores, k=K)[1]
        running, running_scores, running_parent = (
            _gather(topk_seq, nxt),
            _gather(run_scores, nxt),
            _gather(topk_parent, nxt),
        )

        # Candidates among the top K that just finished compete with the finished set.
        just = hits & top_mask[None, :]
        fin = topk_scores / ((cur + 1 - T) ** length_penalty)
        fin = fin + (finished.all(dim=-1, keepdim=True) & (early_stopping is True)).float() * NEG
        fin = fin + (~improvable).float() * NEG
        fin = fin + (~just) * NEG
        merged_scores = torch.cat([scores, fin], dim=1)
        best = torch.topk(merged_scores, k=K)[1]
        sequences = _gather(torch.cat([sequences, topk_seq], dim=1), best)
        scores = _gather(merged_scores, best)
        parents = _gather(torch.cat([parents, topk_parent], dim=1), best)
        finished = _gather(torch.cat([finished, just], dim=1), best)

        cache.reorder(running_parent[:, :, cur - T].reshape(-1))
        cur += 1
        length = (max_length - T) if (early_stopping == "never" and length_penalty > 0.0) else (cur - T)
        best_running = running_scores[:, :1] / (length**length_penalty)
        worst_finished = torch.where(finished, scores.min(dim=1, keepdim=True).values, NEG)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        all_full = bool(finished.all()) and early_stopping is True
        if not bool(improvable.any()) or all_full or bool(hits.all()):
            break
        positions = [n + cur - 1 - T for n in lengths]  # the new token's position in each row
        logits = cache.decode(running[:, :, cur - 1].reshape(B * K), positions)

    out = sequences[:, 0]  # (B, max_length)
    new_len = int((parents[:, 0] + 1).bool().sum(dim=1).max())
    return out[:, : T + new_len].cpu()


def _history(ids: Tensor, valid: Tensor, V: int) -> History:
    """The beams' tokens so far (B*K, L), prompt padding (the first columns where `valid` is False) left out."""
    L = ids.shape[1]
    real = torch.cat([valid, valid.new_ones(ids.shape[0], L - valid.shape[1])], dim=1)
    seen = torch.zeros(ids.shape[0], V + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, ids.masked_fill(~real, V), True)  # padding goes to a scratch column V
    tokens = [row[ok].tolist() for row, ok in zip(ids.cpu(), real.cpu(), strict=True)]
    return History(seen=seen[:, :V], tokens=tokens)
