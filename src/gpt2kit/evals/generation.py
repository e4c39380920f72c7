"""`generate` tasks: question answering and translation posed as text, scored by exact match.

Each prompt (few-shot prefix + the item's prompt) is continued greedily by default, in
left-padded batches, and the continuation is cut at the first newline (and at
<|endoftext|>). Prediction and answers are normalised (stripped, case-folded, whitespace
collapsed); `exact_match` needs the prediction to equal an answer, `contains` needs an
answer to appear in it.

>>> result = evaluate_generation(model, tokenizer, task, shots=1)  # doctest: +SKIP
>>> result["metrics"]["exact_match"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gpt2kit.evals.stats import with_stderr
from gpt2kit.evals.tasks import Task, fewshot_prefix
from gpt2kit.generate import generate
from gpt2kit.model import GPT2
from gpt2kit.tokenizer import Tokenizer


def normalize(text: str) -> str:
    """Strip, case-fold and collapse whitespace.

    >>> normalize("  The  Eiffel\\tTower ")
    'the eiffel tower'
    """
    return " ".join(text.casefold().split())


def evaluate_generation(
    model: GPT2,
    tokenizer: Tokenizer,
    task: Task,
    *,
    shots: int = 0,
    seed: int = 1234,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """`exact_match` and `contains` over the task's items, with every prediction.

    `progress(0)` is called once the prompts are built, then `progress(n)` as n items finish.
    """
    n_ctx = model.config.n_positions
    max_new_tokens = min(max_new_tokens, n_ctx - 1)
    prompts = []
    for item in task.items:
        prefix = fewshot_prefix(task, item, shots=shots, seed=seed)
        ids = tokenizer.encode_ordinary(prefix + item.context)
        prompts.append(ids[-(n_ctx - max_new_tokens) :])  # keep the query: cut from the left
    newline = tokenizer.encode_ordinary("\n")
    # Stopping a row at the newline token saves the rest of its decoding; text after any
    # other newline-bearing token is cut below.
    eos = newline[0] if len(newline) == 1 else None
    predictions: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    if progress is not None:
        progress(0)  # every prompt is built: decoding starts
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        T = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), T), model.config.eos_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, T - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, T - len(prompts[i]) :] = 1
        out = generate(
            model,
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            # One seed per item, so a sampled answer doesn't depend on the batching.
            seed=[seed + task.items[i].line for i in rows] if temperature > 0 else None,
            eos_token_id=eos,
        )
        for r, i in enumerate(rows):
            predictions[i] = _cut(tokenizer, out[r, T:].tolist())
        if progress is not None:
            progress(len(rows))
    items, em, contains = [], [], []
    for item, pred in zip(task.items, predictions, strict=True):
        p = normalize(pred)
        answers = [normalize(a) for a in item.targets]
        hit_em = any(p == a for a in answers)
        hit_contains = any(a in p for a in answers)
        em.append(float(hit_em))
        contains.append(float(hit_contains))
        items.append(
            {
                "line": item.line,
                "prediction": pred,
                "answers": list(item.targets),
                "exact_match": hit_em,
                "contains": hit_contains,
            }
        )
    metrics = {**with_stderr(exact_match=em, contains=contains), "n_items": len(items)}
    return {"metrics": metrics, "items": items}


def _cut(tokenizer: Tokenizer, new_ids: list[int]) -> str:
    """The continuation's text up to <|endoftext|> and the first newline."""
    eot = tokenizer.special_tokens.get("<|endoftext|>")
    if eot is not None and eot in new_ids:
        new_ids = new_ids[: new_ids.index(eot)]
    return tokenizer.decode(new_ids).split("\n", 1)[0]
