"""`gpt2kit eval`: zero- and few-shot evaluation (perplexity, lambada, multiple-choice, generate)."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: `gpt2kit --help` must not import torch
    from gpt2kit.evals.tasks import Task
    from gpt2kit.model.gpt2 import GPT2
    from gpt2kit.tokenizer.tokenizer import Tokenizer

TASKS = ("perplexity", "lambada", "multiple-choice", "generate")

EXAMPLE = """examples:
  gpt2kit eval --model gpt2 --task perplexity --data wiki.txt --stride 512 --output ppl.json
  gpt2kit eval --model gpt2 --task lambada --data lambada_test.jsonl --output lambada.json
  gpt2kit eval --model gpt2 --task lambada --data lambada_test.jsonl --target token   # the paper's scoring
  gpt2kit eval --model gpt2 --task multiple-choice --data hellaswag_val.jsonl --limit 500
  gpt2kit eval --model gpt2 --task generate --data qa_sample --shots 3 --seed 1
  gpt2kit eval --model gpt2 --task lambada --data lambada_sample   # a bundled sample task

bundled samples (pass the name as --data): perplexity_sample.txt, lambada_sample.jsonl,
multiple_choice_sample.jsonl, qa_sample.jsonl, translate_sample.jsonl
"""


def register(sub: argparse._SubParsersAction) -> None:
    from gpt2kit.cli import HelpFormatter
    from gpt2kit.cli._common import add_flags, add_model_flag

    p = sub.add_parser(
        "eval",
        help="zero-/few-shot evaluation: perplexity, lambada, multiple-choice, generate",
        description=(
            "Evaluate a model as in the GPT-2 paper. perplexity: sliding-window token perplexity and "
            "bits per byte of a text file. lambada: last-word accuracy and target perplexity. "
            "multiple-choice: the option with the highest log-likelihood (acc, acc_norm). generate: "
            "greedy answers cut at the first newline, scored by exact match and contains. Task "
            "files are JSON Lines (see docs/evaluation.md); LAMBADA plain text and HellaSwag JSON "
            "Lines load too. Prints a results table; --output writes every number as JSON."
        ),
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    add_model_flag(p)
    p.add_argument("--task", required=True, choices=TASKS, help="task kind")
    p.add_argument(
        "--data", required=True, help="text file (perplexity) or task file, or a bundled sample name"
    )
    p.add_argument("--output", default=None, help="write the results JSON here; None = table only")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="perplexity: window stride S, 1..context C; S < C overlaps windows (Hugging Face's sliding "
        "window), S = C scores disjoint blocks of C tokens (lm-eval-harness's rolling windows); "
        "None = C/2",
    )
    p.add_argument(
        "--target",
        choices=["word", "token"],
        default=None,
        help="lambada: word = greedy decoding must produce the whole last word (lm-eval-harness); "
        "token = the top prediction must be the passage's final BPE token (the GPT-2 paper); None = word",
    )
    p.add_argument(
        "--shots", type=int, default=None, help="few-shot examples in each prompt (JSONL tasks); None = 0"
    )
    p.add_argument(
        "--fewshot-data", default=None, help="draw few-shot examples from this file instead (JSONL tasks)"
    )
    p.add_argument(
        "--description",
        default=None,
        help="task description before the examples, overriding the file's (JSONL tasks)",
    )
    p.add_argument("--seed", type=int, default=1234, help="seed for drawing few-shot examples (and sampling)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items (JSONL tasks)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generate: tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="generate: 0 = greedy")
    add_flags(p, dtype_default="float32")
    p.set_defaults(func=run)


# Flags that only mean something for the task kinds read from JSON Lines files.
JSONL_ONLY = (
    ("--shots", "shots"),
    ("--limit", "limit"),
    ("--fewshot-data", "fewshot_data"),
    ("--description", "description"),
)


def run(args: argparse.Namespace) -> int:
    import contextlib
    import sys

    from gpt2kit.cli._common import load
    from gpt2kit.evals import report
    from gpt2kit.model.checkpoint import load_tokenizer

    # Everything the flags and the data file alone can tell is checked before the model
    # loads (which can take minutes), so a typo costs nothing.
    check_flags(args)
    check_output(args.output)
    if args.task != "perplexity":
        args.shots = args.shots or 0  # None only marks "not given", for check_flags
    if args.task == "perplexity":
        data, task_info = read_perplexity_text(args.data)
    else:
        data, task_info = read_task(args)

    model, device = load(args)
    tokenizer = load_tokenizer(args.model)
    settings = {
        "shots": None if args.task == "perplexity" else args.shots,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "device": str(device),
        "dtype": str(model.wte.weight.dtype).removeprefix("torch."),
        "quantization": getattr(model, "quantization", None),
    }
    t0 = time.perf_counter()
    if args.task == "perplexity":
        total, unit = perplexity_windows(model, tokenizer, data, args.stride), "window"
    else:
        total, unit = len(data.items), "item"
    bar = LazyBar(total=total, unit=unit, desc=args.task, file=sys.stderr, dynamic_ncols=True)
    with contextlib.closing(bar):
        result = evaluate(args, model, tokenizer, data, settings, progress=bar)
    elapsed = time.perf_counter() - t0
    doc = report.results_document(
        kind=args.task,
        metrics=result["metrics"],
        items=result["items"],
        model=model_info(args.model, model),
        task=task_info,
        settings=settings,
        elapsed_s=elapsed,
    )
    print(report.format_table(doc))
    if args.output:
        report.write_results(args.output, doc)
        print(f"[results written to {args.output}]", file=sys.stderr)
    return 0


def check_flags(args: argparse.Namespace) -> None:
    """Bounds of the numeric flags, and no flag the chosen task would silently ignore."""
    from gpt2kit.cli._common import flag_error
    from gpt2kit.errors import ConfigError
    from gpt2kit.generation.config import SamplingConfig, SamplingError

    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--shots", args.shots, 0),
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--stride", args.stride, 1),
    ):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    try:
        SamplingConfig(temperature=args.temperature)
    except SamplingError as e:
        raise flag_error(e) from None
    if args.task == "perplexity":
        given = [flag for flag, attr in JSONL_ONLY if getattr(args, attr) is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: only for the JSONL task kinds (lambada, multiple-choice, generate), "
                f"not --task perplexity; drop {'it' if len(given) == 1 else 'them'}"
            )
    elif args.stride is not None:
        raise ConfigError(f"--stride: only for --task perplexity, not --task {args.task}; drop it")
    if args.target is not None and args.task != "lambada":
        raise ConfigError(f"--target: only for --task lambada, not --task {args.task}; drop it")


def check_output(output: str | None) -> None:
    """Make sure `--output` can be written, creating its folder, before any work is done."""
    import os
    from pathlib import Path

    from gpt2kit.errors import ConfigError

    if output is None:
        return
    path = Path(output)
    if path.is_dir():
        raise ConfigError(
            f"--output {path}: is a directory; pass a file path such as {path / 'results.json'}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--output {path}: can't create its folder {path.parent} ({e.strerror}); "
            "pass a path whose folder exists or can be created"
        ) from None
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"--output {path}: the folder {path.parent} is not writable; pass another path")


def read_perplexity_text(name: str) -> tuple[str, dict[str, str]]:
    """The text to score, exactly as the file holds it, and the file's path and sha256."""
    from gpt2kit.errors import DataError
    from gpt2kit.evals.tasks import file_sha256, read_text, resolve_data_path

    path = resolve_data_path(name)
    text = read_text(path)
    if not text:
        raise DataError(f"{path}: the file is empty; perplexity needs some text")
    return text, {"path": str(path), "sha256": file_sha256(path)}


def read_task(args: argparse.Namespace) -> tuple[Task, dict[str, Any]]:
    """The task file with --limit and --description applied, checked against --shots."""
    import dataclasses

    from gpt2kit.evals.tasks import check_shots, load_task

    task = load_task(args.data, kind=args.task, fewshot_path=args.fewshot_data).limit(args.limit)
    if args.description is not None:
        task = dataclasses.replace(task, description=args.description)
    check_shots(task, args.shots)
    info = {
        "name": task.name,
        "path": str(task.path),
        "sha256": task.sha256,
        "fewshot_path": str(task.fewshot_path) if task.fewshot_path else None,
        "fewshot_sha256": task.fewshot_sha256,
        "description": task.description,
        "n_items": len(task.items),
        "n_pool": len(task.pool),
    }
    return task, info


def perplexity_windows(model: GPT2, tokenizer: Tokenizer, text: str, stride: int | None) -> int:
    """How many windows the text takes; raises for a stride above the model's context."""
    from gpt2kit.evals.perplexity import windows

    context = model.config.n_positions
    n_ids = len(tokenizer.encode_ordinary(text)) + 1
    return len(windows(n_ids, context=context, stride=context // 2 if stride is None else stride))


def evaluate(
    args: argparse.Namespace,
    model: GPT2,
    tokenizer: Tokenizer,
    data: Any,
    settings: dict[str, Any],
    *,
    progress: LazyBar,
) -> dict[str, Any]:
    """Run the task kind's evaluator; records the settings it used in `settings`."""
    if args.task == "perplexity":
        from gpt2kit.evals.perplexity import evaluate_perplexity

        result = evaluate_perplexity(
            model, tokenizer, data, stride=args.stride, batch_size=args.batch_size, progress=progress
        )
        settings["stride"] = result["stride"]
        return {"metrics": result, "items": []}
    # The task-file kinds share their options; `generate` adds its decoding ones.
    common = {
        "shots": args.shots,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "progress": progress,
    }
    if args.task == "lambada":
        from gpt2kit.evals.lambada import evaluate_lambada

        settings["target"] = args.target or "word"
        return evaluate_lambada(model, tokenizer, data, target=settings["target"], **common)
    if args.task == "multiple-choice":
        from gpt2kit.evals.multiple_choice import evaluate_multiple_choice

        return evaluate_multiple_choice(model, tokenizer, data, **common)
    from gpt2kit.evals.generation import evaluate_generation

    settings["max_new_tokens"] = args.max_new_tokens
    settings["temperature"] = args.temperature
    return evaluate_generation(
        model,
        tokenizer,
        data,
        **common,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )


def model_info(name: str, model: GPT2) -> dict[str, Any]:
    """What the results record about the model: where it came from, its size and config."""
    from pathlib import Path

    return {
        "name_or_path": str(name),
        "resolved_path": str(Path(name).resolve()) if Path(name).is_dir() else None,
        "n_params": model.num_parameters(),
        "config": model.config.to_hf_dict(),
    }


class LazyBar:
    """A tqdm bar opened on the first `progress` call, not before.

    Evaluators call `progress(0)` once their prompts are built and checked, so an error in
    a task item prints as one line, with no half-drawn bar in front of it.
    """

    def __init__(self, **tqdm_kwargs: Any) -> None:
        self._kwargs = tqdm_kwargs
        self._bar: Any = None

    def __call__(self, n: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(**self._kwargs)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
