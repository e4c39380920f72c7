"""`generate` tasks: question answering and translation posed as text, scored by exact match.

Each prompt (few-shot prefix + the item's prompt) is continued greedily by default, all
items sharing the engine's slots, and the continuation ends at the first newline (a stop
string) or at <|endoftext|>. Prediction and answers are normalised (stripped, case-folded, whitespace
collapsed); `exact_match` needs the prediction to equal an answer, `contains` needs an
answer to appear in it.

>>> result = evaluate_generation(model, tokenizer, task, shots=1)  # doctest: +SKIP
>>> result["metrics"]["exact_match"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpt2kit.evals.stats import with_stderr
from gpt2kit.evals.tasks import Task, fewshot_prefix
from gpt2kit.generation.complete import complete
from gpt2kit.generation.config import SamplingConfig
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.tokenizer.tokenizer import Tokenizer


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
    predictions: list[str] = [""] * len(prompts)
    if progress is not None:
        progress(0)  # every prompt is built: decoding starts
    # An answer ends at the first newline; item i samples with seed + i, so a sampled answer
    # doesn't depend on how items share the engine's slots.
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop="\n", seed=seed)
    for chunk in complete(model, tokenizer, prompts, config, stream=True, batch_size=batch_size):
        predictions[chunk.index] += chunk.text
        if chunk.finish_reason is not None and progress is not None:
            progress(1)
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
