"""`gpt2kit eval`: zero- and few-shot evaluation (perplexity, lambada, multiple-choice, generate)."""

from __future__ import annotations

import argparse
import time

TASKS = ("perplexity", "lambada", "multiple-choice", "generate")

EXAMPLE = """examples:
  gpt2kit eval --model gpt2 --task perplexity --data wiki.txt --stride 512 --output ppl.json
  gpt2kit eval --model gpt2 --task lambada --data lambada_test.jsonl --output lambada.json
  gpt2kit eval --model gpt2 --task multiple-choice --data hellaswag_val.jsonl --limit 500
  gpt2kit eval --model gpt2 --task generate --data qa_sample --shots 3 --seed 1
  gpt2kit eval --model gpt2 --task lambada --data lambada_sample   # a bundled sample task

bundled samples (pass the name as --data): perplexity_sample.txt, lambada_sample.jsonl,
multiple_choice_sample.jsonl, qa_sample.jsonl, translate_sample.jsonl
"""


def register(sub: argparse._SubParsersAction) -> None:
    from gpt2kit.cli import HelpFormatter

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
    p.add_argument("--model", required=True, help="model directory or Hugging Face hub id (e.g. gpt2)")
    p.add_argument("--task", required=True, choices=TASKS, help="task kind")
    p.add_argument(
        "--data", required=True, help="text file (perplexity) or task file, or a bundled sample name"
    )
    p.add_argument("--output", default=None, help="write the results JSON here; None = table only")
    p.add_argument(
        "--stride", type=int, default=None, help="perplexity window stride; None = half the context"
    )
    p.add_argument("--shots", type=int, default=0, help="few-shot examples in each prompt")
    p.add_argument("--fewshot-data", default=None, help="draw few-shot examples from this file instead")
    p.add_argument(
        "--description", default=None, help="task description before the examples (overrides the file's)"
    )
    p.add_argument("--seed", type=int, default=1234, help="seed for drawing few-shot examples (and sampling)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generate: tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="generate: 0 = greedy")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype; auto = bf16 on CUDA",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import sys
    from pathlib import Path

    from tqdm import tqdm

    from gpt2kit.checkpoint import load_model, load_tokenizer
    from gpt2kit.cli.generate import pick_device, pick_dtype
    from gpt2kit.errors import ConfigError, DataError
    from gpt2kit.evals import report
    from gpt2kit.evals.tasks import file_sha256, load_task, resolve_data_path
    from gpt2kit.sampling import check_sampling

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--shots", args.shots, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_sampling(temperature=args.temperature)
    if args.task == "perplexity":
        data = resolve_data_path(args.data)
        try:
            text = data.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{data}: not UTF-8 text ({e}); re-save it as UTF-8") from None
        if not text:
            raise DataError(f"{data}: the file is empty; perplexity needs some text")
        task_info = {"path": str(data), "sha256": file_sha256(data)}
        total = None
    else:
        task = load_task(args.data, kind=args.task, fewshot_path=args.fewshot_data).limit(args.limit)
        if args.description is not None:
            task = dataclasses.replace(task, description=args.description)
        task_info = {
            "name": task.name,
            "path": str(task.path),
            "sha256": task.sha256,
            "fewshot_path": str(task.fewshot_path) if task.fewshot_path else None,
            "fewshot_sha256": task.fewshot_sha256,
            "description": task.description,
            "n_items": len(task.items),
            "n_pool": len(task.pool),
        }
        total = len(task.items)

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = load_model(args.model, device=device, dtype=dtype)
    tokenizer = load_tokenizer(args.model)
    settings = {
        "shots": args.shots if args.task != "perplexity" else None,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
    }
    t0 = time.perf_counter()
    unit = "window" if args.task == "perplexity" else "item"
    with tqdm(total=total, unit=unit, desc=args.task, file=sys.stderr, dynamic_ncols=True) as bar:
        if args.task == "perplexity":
            from gpt2kit.evals.perplexity import evaluate_perplexity, windows

            stride = args.stride if args.stride is not None else model.config.n_positions // 2
            n_ids = len(tokenizer.encode_ordinary(text)) + 1
            bar.total = (
                len(windows(n_ids, context=model.config.n_positions, stride=stride)) if n_ids else None
            )
            metrics = evaluate_perplexity(
                model, tokenizer, text, stride=stride, batch_size=args.batch_size, progress=bar.update
            )
            result = {"metrics": metrics, "items": []}
            settings["stride"] = stride
        else:
            # The task-file kinds share their options; `generate` adds its decoding ones.
            common = {"shots": args.shots, "seed": args.seed, "batch_size": args.batch_size}
            if args.task == "lambada":
                from gpt2kit.evals.lambada import evaluate_lambada

                result = evaluate_lambada(model, tokenizer, task, **common, progress=bar.update)
            elif args.task == "multiple-choice":
                from gpt2kit.evals.multiple_choice import evaluate_multiple_choice

                result = evaluate_multiple_choice(model, tokenizer, task, **common, progress=bar.update)
            else:
                from gpt2kit.evals.generation import evaluate_generation

                settings["max_new_tokens"] = args.max_new_tokens
                settings["temperature"] = args.temperature
                result = evaluate_generation(
                    model,
                    tokenizer,
                    task,
                    **common,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    progress=bar.update,
                )
    elapsed = time.perf_counter() - t0
    model_info = {
        "name_or_path": str(args.model),
        "resolved_path": str(Path(args.model).resolve()) if Path(args.model).is_dir() else None,
        "n_params": model.num_parameters(),
        "config": model.config.to_hf_dict(),
    }
    doc = report.results_document(
        kind=args.task,
        metrics=result["metrics"],
        items=result["items"],
        model=model_info,
        task=task_info,
        settings=settings,
        elapsed_s=elapsed,
    )
    print(report.format_table(doc))
    if args.output:
        report.write_results(args.output, doc)
        print(f"[results written to {args.output}]", file=sys.stderr)
    return 0
