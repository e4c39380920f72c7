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
from gpt2kit.generation.prompts import eos_id, fit_prompt, left_pad, pad_id, unpad
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
    deterministic: bool = False,
) -> Tensor:
    """Best beam per prompt: [B, T + new] ids, shorter results padded with eos (as `transformers`).

    `input_ids` [B, T], left-padded when `attention_mask` is given; prompts longer than the
    context keep their last tokens. `eos_token_id` None is the model's (`prompts.eos_id`).
    `repetition_penalty` and `no_repeat_ngram_size` edit the beams' log-probabilities as in
    `transformers`. `compile` as in `generate`: the beams decode with the engine's compiled
    step when one is saved (or built, with True). `deterministic=True` decodes at one fixed
    shape, so a prompt's beams are the same bits whatever prompts search beside it
    (`gpt2kit.generation.engine`).
    """
    _check_options(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
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
    eos = eos_id(model) if eos_token_id is None else eos_token_id
    prompt, mask = left_pad(prompts, eos)
    max_new = min(max_new_tokens, model.config.n_positions - max(len(p) for p in prompts))
    if max_new <= 0:
        return prompt
    beams = _Beams(
        prompt.to(device),
        None if mask is None else mask.to(device),
        num_beams=num_beams,
        max_new=max_new,
        eos=eos,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    rows = [p for p in prompts for _ in range(num_beams)]  # slot r holds row r's beam
    lengths = [len(p) for p in rows]  # real prompt length of each row
    max_len = max(lengths) + max_new
    step = step_for(model, slots=len(rows), max_len=max_len, compile=compile, deterministic=deterministic)
    cache = SlotCache(model, slots=len(rows), max_len=max_len, step=step, deterministic=deterministic)
    _, logits = cache.prefill(0, rows)
    while True:
        logp = logits.float().log_softmax(dim=-1)  # (B*K, V)
        if penalties.needs_seen or penalties.no_repeat_ngram_size:
            logp = penalise(logp, penalties, beams.history(logp.shape[-1]))
        parents, done = beams.step(logp)
        cache.reorder(parents)
        if done:
            break
        positions = [n + beams.new_tokens - 1 for n in lengths]  # the new token's position in each row
        logits = cache.decode(beams.last_tokens(), positions)
    return beams.best()


def _check_options(*, num_beams: int, length_penalty: float, early_stopping: bool | str) -> None:
    if early_stopping not in (True, False, "never"):
        raise ConfigError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ConfigError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    check_length_penalty(length_penalty)


class _Beams:
    """The running and the finished hypotheses of B prompts, K of each, kept as `transformers`
    keeps them: (B, K, max_length) token tensors, their scores, and each new token's parent
    slot (so the best finished beam's length is known)."""

    def __init__(
        self,
        prompt: Tensor,
        mask: Tensor | None,
        *,
        num_beams: int,
        max_new: int,
        eos: int,
        length_penalty: float,
        early_stopping: bool | str,
    ) -> None:
        device = prompt.device
        B, T = prompt.shape
        K = num_beams
        self.B, self.K, self.T, self.max_length = B, K, T, T + max_new
        self.eos, self.length_penalty, self.early_stopping = eos, length_penalty, early_stopping
        self.keep = 2 * K  # transformers: max(2, 1 + number of eos ids) * num_beams
        self.top_mask = torch.arange(self.keep, device=device) < K
        ids = prompt.repeat_interleave(K, dim=0)  # (B*K, T)
        self.valid = (
            mask.bool().repeat_interleave(K, dim=0) if mask is not None else torch.ones_like(ids).bool()
        )
        self.running = torch.full((B, K, self.max_length), pad_id(eos), dtype=torch.long, device=device)
        self.running[:, :, :T] = ids.view(B, K, T)
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros(B, K, device=device)
        self.running_scores[:, 1:] = NEG  # all beams start identical: only the first may expand
        self.scores = torch.full((B, K), NEG, device=device)
        self.finished = torch.zeros(B, K, dtype=torch.bool, device=device)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
        self.running_parent = torch.full((B, K, max_new), -1, dtype=torch.long, device=device)
        self.parents = self.running_parent.clone()
        self.batch_offset = torch.arange(B, device=device)[:, None] * K
        self.cur = T  # the column the next token goes to

    @property
    def new_tokens(self) -> int:
        return self.cur - self.T

    def history(self, V: int) -> History:
        """The running beams' tokens so far, for the repetition penalties."""
        B, K, cur = self.B, self.K, self.cur
        return _history(self.running[:, :, :cur].reshape(B * K, cur), self.valid, V)

    def last_tokens(self) -> Tensor:
        return self.running[:, :, self.cur - 1].reshape(self.B * self.K)

    def step(self, logp: Tensor) -> tuple[Tensor, bool]:
        """Extend the beams by one token, given their log-probabilities (B*K, V); returns the
        slot each running beam now continues (for the cache) and whether the search is over."""
        topk_scores, topk_seq, topk_parent, hits = self._expand(logp)
        # The best K candidates that did not just finish keep running.
        run_scores = topk_scores + hits.float() * NEG
        nxt = torch.topk(run_scores, k=self.K)[1]
        self.running = _gather(topk_seq, nxt)
        self.running_scores = _gather(run_scores, nxt)
        self.running_parent = _gather(topk_parent, nxt)
        self._finish(topk_scores, topk_seq, topk_parent, hits)
        parents = self.running_parent[:, :, self.cur - self.T].reshape(-1)
        self.cur += 1
        return parents, self._done(hits)

    def best(self) -> Tensor:
        """The best finished beam of each prompt, [B, T + new] on the CPU."""
        out = self.sequences[:, 0]  # (B, max_length)
        new_len = int((self.parents[:, 0] + 1).bool().sum(dim=1).max())
        return out[:, : self.T + new_len].cpu()

    def _expand(self, logp: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The best 2K of the K * V one-token continuations: scores, sequences, parents, and
        which of them end (eos, or the length limit)."""
        B, K, T, cur = self.B, self.K, self.T, self.cur
        V = logp.shape[-1]
        logp = (logp.view(B, K, V) + self.running_scores[:, :, None]).view(B, K * V)
        topk_scores, topk_index = torch.topk(logp, k=self.keep)  # (B, 2K)
        beam = topk_index // V
        token = topk_index % V
        topk_seq = _gather(self.running, beam)  # (B, 2K, max_length)
        topk_seq[:, :, cur] = token
        topk_parent = _gather(self.running_parent, beam)
        topk_parent[:, :, cur - T] = beam + self.batch_offset
        hits = (token == self.eos) if self.eos >= 0 else torch.zeros_like(token, dtype=torch.bool)
        if cur + 1 >= self.max_length:
            hits = torch.ones_like(hits)
        return topk_scores, topk_seq, topk_parent, hits

    def _finish(self, topk_scores: Tensor, topk_seq: Tensor, topk_parent: Tensor, hits: Tensor) -> None:
        """Candidates among the top K that just finished compete with the finished set."""
        K = self.K
        just = hits & self.top_mask[None, :]
        fin = topk_scores / ((self.cur + 1 - self.T) ** self.length_penalty)
        fin = fin + (self.finished.all(dim=-1, keepdim=True) & (self.early_stopping is True)).float() * NEG
        fin = fin + (~self.improvable).float() * NEG
        fin = fin + (~just) * NEG
        merged_scores = torch.cat([self.scores, fin], dim=1)
        best = torch.topk(merged_scores, k=K)[1]
        self.sequences = _gather(torch.cat([self.sequences, topk_seq], dim=1), best)
        self.scores = _gather(merged_scores, best)
        self.parents = _gather(torch.cat([self.parents, topk_parent], dim=1), best)
        self.finished = _gather(torch.cat([self.finished, just], dim=1), best)

    def _done(self, hits: Tensor) -> bool:
        """Over when no running beam can beat the worst finished one, when every prompt has K
        finished ones (early_stopping=True), or when every candidate just ended."""
        never = self.early_stopping == "never" and self.length_penalty > 0.0
        length = (self.max_length - self.T) if never else (self.cur - self.T)
        best_running = self.running_scores[:, :1] / (length**self.length_penalty)
        worst_finished = torch.where(self.finished, self.scores.min(dim=1, keepdim=True).values, NEG)
        self.improvable = self.improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        all_full = bool(self.finished.all()) and self.early_stopping is True
        return not bool(self.improvable.any()) or all_full or bool(hits.all())


def _history(ids: Tensor, valid: Tensor, V: int) -> History:
    """The beams' tokens so far (B*K, L), prompt padding (the first columns where `valid` is False) left out."""
    L = ids.shape[1]
    real = torch.cat([valid, valid.new_ones(ids.shape[0], L - valid.shape[1])], dim=1)
    seen = torch.zeros(ids.shape[0], V + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, ids.masked_fill(~real, V), True)  # padding goes to a scratch column V
    tokens = [row[ok].tolist() for row, ok in zip(ids.cpu(), real.cpu(), strict=True)]
    return History(seen=seen[:, :V], tokens=tokens)
