"""LAMBADA-style last-word prediction: accuracy and perplexity of the target, two ways.

`target="word"` (lm-eval-harness's lambada_openai): an item is right when greedy decoding
from the context produces the whole target word, however many tokens it has: the argmax at
every target position must be the target's token (`ContinuationScore.greedy`), which is
exactly what greedy decoding would emit.

`target="token"` (the GPT-2 paper's): the passage is tokenized whole, and an item is right
when the model's top prediction is the passage's final BPE token, given every token before
it (so the earlier pieces of a multi-token last word are given, not predicted).

>>> result = evaluate_lambada(model, tokenizer, task, shots=0)  # doctest: +SKIP
>>> result["metrics"]["acc"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpt2kit.errors import ConfigError
from gpt2kit.evals.scoring import check_fits, score_continuations
from gpt2kit.evals.stats import exp_nll, with_stderr
from gpt2kit.evals.tasks import Task, fewshot_prefix
from gpt2kit.generation.prompts import eos_id
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.tokenizer.tokenizer import Tokenizer

TARGETS = ("word", "token")


def evaluate_lambada(
    model: GPT2,
    tokenizer: Tokenizer,
    task: Task,
    *,
    target: str = "word",
    shots: int = 0,
    seed: int = 1234,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score every item with the `target` convention ("word" or "token", see the module doc).

    word: `acc` (whole word greedy), `perplexity` (per target word, exp of the mean word
    NLL, as lm-eval-harness and the paper report it) and `token_perplexity` (per target
    token). token: `acc` (top-1 final token) and `perplexity` (of the final token).
    Perplexities are inf when their mean NLL is too large for exp() (above ~709 nats).
    """
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    requests = []
    for item in task.items:
        prefix = fewshot_prefix(task, item, shots=shots, seed=seed)
        if target == "token":
            ids = tokenizer.encode_ordinary(prefix + item.context + task.target_delimiter + item.targets[0])
            requests.append((ids[:-1], ids[-1:]))
            continue
        context = tokenizer.encode_ordinary(prefix + item.context)
        continuation = tokenizer.encode_ordinary(task.target_delimiter + item.targets[0])
        check_fits(f"{task.path}:{item.line}", "the target", len(continuation), model.config.n_positions)
        requests.append((context, continuation))
    scores = score_continuations(
        model, requests, bos_token_id=eos_id(model, tokenizer), batch_size=batch_size, progress=progress
    )
    correct = [float(s.greedy) for s in scores]
    nll = [-s.logprob for s in scores]
    if target == "token":
        metrics = {
            **with_stderr(acc=correct),
            "perplexity": exp_nll(sum(nll) / len(nll)),
            "n_items": len(scores),
        }
        items = [
            {
                "line": item.line,
                "target": item.targets[0],
                "target_token": tokenizer.decode_tokens(cont)[0],
                "logprob": s.logprob,
                "correct": s.greedy,
            }
            for item, (_, cont), s in zip(task.items, requests, scores, strict=True)
        ]
        return {"metrics": metrics, "items": items}
    n_target_tokens = sum(s.n_tokens for s in scores)
    metrics = {
        **with_stderr(acc=correct),
        "perplexity": exp_nll(sum(nll) / len(nll)),
        "token_perplexity": exp_nll(sum(nll) / n_target_tokens),
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
