"""LAMBADA-style last-word prediction: accuracy and perplexity of the target word.

An item is right when greedy decoding from the context produces the whole target word,
however many tokens it has: the argmax at every target position must be the target's
token (`ContinuationScore.greedy`), which is exactly what greedy decoding would emit.

>>> result = evaluate_lambada(model, tokenizer, task, shots=0)  # doctest: +SKIP
>>> result["metrics"]["acc"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpt2kit.evals.scoring import check_fits, score_continuations
from gpt2kit.evals.stats import exp_nll, with_stderr
from gpt2kit.evals.tasks import Task, fewshot_prefix
from gpt2kit.model import GPT2
from gpt2kit.tokenizer import Tokenizer


def evaluate_lambada(
    model: GPT2,
    tokenizer: Tokenizer,
    task: Task,
    *,
    shots: int = 0,
    seed: int = 1234,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """`acc` (whole word greedy), `perplexity` (per target word, exp of the mean word NLL, as
    lm-eval-harness and the paper report it) and `token_perplexity` (per target token).

    Both perplexities are inf when their mean NLL is too large for exp() (above ~709 nats).
    """
    requests = []
    for item in task.items:
        prefix = fewshot_prefix(task, item, shots=shots, seed=seed)
        context = tokenizer.encode_ordinary(prefix + item.context)
        target = tokenizer.encode_ordinary(task.target_delimiter + item.targets[0])
        check_fits(f"{task.path}:{item.line}", "the target", len(target), model.config.n_positions)
        requests.append((context, target))
    scores = score_continuations(model, requests, batch_size=batch_size, progress=progress)
    correct = [float(s.greedy) for s in scores]
    word_nll = [-s.logprob for s in scores]
    n_target_tokens = sum(s.n_tokens for s in scores)
    metrics = {
        **with_stderr(acc=correct),
        "perplexity": exp_nll(sum(word_nll) / len(word_nll)),
        "token_perplexity": exp_nll(sum(word_nll) / n_target_tokens),
        "n_items": len(scores),
        "n_target_tokens": n_target_tokens,
    }
    items = [
        {
            "line": item.line,
            "target": item.targets[0],
            "target_tokens": s.n_tokens,
            "logprob": s.logprob,
            "correct": s.greedy,
        }
        for item, s in zip(task.items, scores, strict=True)
    ]
    return {"metrics": metrics, "items": items}
