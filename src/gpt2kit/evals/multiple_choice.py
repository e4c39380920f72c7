"""Multiple choice (HellaSwag / CBT style): the option with the highest log-likelihood wins.

`acc` compares the summed log-probabilities of the options' tokens; `acc_norm` divides
each by the option's length in characters first: `len(choice)` of the choice text as the
task gives it, without the delimiter that joins it to the context (lm-eval-harness's
`acc_norm`, which keeps long options from losing just for having more tokens). Options of many items
are scored in one padded batch on top of one shared pass over each item's context.

>>> result = evaluate_multiple_choice(model, tokenizer, task)  # doctest: +SKIP
>>> result["metrics"]["acc"], result["metrics"]["acc_norm"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpt2kit.evals.scoring import check_fits, score_choices
from gpt2kit.evals.stats import with_stderr
from gpt2kit.evals.tasks import Task, fewshot_prefix
from gpt2kit.generation.prompts import eos_id
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.tokenizer.tokenizer import Tokenizer


def evaluate_multiple_choice(
    model: GPT2,
    tokenizer: Tokenizer,
    task: Task,
    *,
    shots: int = 0,
    seed: int = 1234,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """`acc` and `acc_norm` over the task's items; every option's log-likelihood per item."""
    contexts, options = [], []
    for item in task.items:
        prefix = fewshot_prefix(task, item, shots=shots, seed=seed)
        contexts.append(tokenizer.encode_ordinary(prefix + item.context))
        tokens = [tokenizer.encode_ordinary(task.target_delimiter + c) for c in item.choices]
        for j, t in enumerate(tokens):
            check_fits(f"{task.path}:{item.line}", f"choice {j}", len(t), model.config.n_positions)
        options.append(tokens)
    scores = score_choices(
        model,
        contexts,
        options,
        bos_token_id=eos_id(model, tokenizer),
        batch_size=batch_size,
        progress=progress,
    )
    items, hits, hits_norm = [], [], []
    for item, item_scores in zip(task.items, scores, strict=True):
        logprobs = [s.logprob for s in item_scores]
        # Characters of the choice itself, not the delimiter: lm-eval's len(choice).
        normed = [lp / len(c) for lp, c in zip(logprobs, item.choices, strict=True)]
        pred = max(range(len(logprobs)), key=logprobs.__getitem__)
        pred_norm = max(range(len(normed)), key=normed.__getitem__)
        hits.append(float(pred == item.label))
        hits_norm.append(float(pred_norm == item.label))
        items.append(
            {
                "line": item.line,
                "label": item.label,
                "pred": pred,
                "pred_norm": pred_norm,
                "logprobs": logprobs,
            }
        )
    metrics = {
        **with_stderr(acc=hits, acc_norm=hits_norm),
        "n_items": len(items),
        "n_options": sum(len(o) for o in options),
    }
    return {"metrics": metrics, "items": items}
