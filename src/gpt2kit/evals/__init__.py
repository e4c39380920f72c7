"""Zero- and few-shot evaluation as in the GPT-2 paper: one module per task kind.

- `perplexity`: sliding-window perplexity and bits per byte of a text
- `lambada`: last-word accuracy and target perplexity
- `multiple_choice`: highest-likelihood option, `acc` and `acc_norm`
- `generation`: generated answers scored by exact match / contains
- `tasks`: task files (JSON Lines, LAMBADA text, HellaSwag) and few-shot prompts
- `scoring`: batched log-likelihood of continuations, shared by lambada and multiple choice
- `report`: the terminal table and the JSON results file
"""

from gpt2kit.evals.generation import evaluate_generation
from gpt2kit.evals.lambada import evaluate_lambada
from gpt2kit.evals.multiple_choice import evaluate_multiple_choice
from gpt2kit.evals.perplexity import evaluate_perplexity
from gpt2kit.evals.scoring import ContinuationScore, score_choices, score_continuations
from gpt2kit.evals.tasks import Item, Task, fewshot_prefix, load_task

__all__ = [
    "ContinuationScore",
    "Item",
    "Task",
    "evaluate_generation",
    "evaluate_lambada",
    "evaluate_multiple_choice",
    "evaluate_perplexity",
    "fewshot_prefix",
    "load_task",
    "score_choices",
    "score_continuations",
]
