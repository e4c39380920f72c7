"""Multiple-choice evaluation throughput (items/s): batched scoring vs one-at-a-time loops.

All three score the same items with the same random-weight model and must agree:

- `per-option loop`: the plain way, one forward pass per (context + option) sequence,
  logits for every position, log-softmax, sum the option's log-probs;
- `one item at a time`: gpt2kit's scorer given one item per call (its context runs once,
  the item's options share it);
- `batched`: gpt2kit's scorer over all items, `--batch-size` option rows per pass.

Items are the bundled multiple-choice sample with `--shots` few-shot examples in front
(~145 context tokens at 5 shots, 4 options of ~7 tokens). The best of `--repeats` rounds
is reported (the methods take turns in each round), because the machine is shared.

    python benchmarks/bench_eval.py                        # random 124M (gpt2 size), CPU fp32
    python benchmarks/bench_eval.py --size tiny --items 30 # a quick check
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_generate import cpu_name  # the sibling script (python puts this folder on sys.path)
from gpt2kit import GPT2, GPT2Config, Tokenizer
from gpt2kit.evals.scoring import score_choices
from gpt2kit.evals.tasks import fewshot_prefix, load_task


def build_items(n_items: int, shots: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    tok = Tokenizer.gpt2()
    task = load_task("multiple_choice_sample", kind="multiple-choice")
    contexts, choices = [], []
    for i in range(n_items):
        item = task.items[i % len(task.items)]
        # Different seeds per repetition so repeated items still get different prompts.
        prefix = fewshot_prefix(task, item, shots=shots, seed=i // len(task.items))
        contexts.append(tok.encode(prefix + item.context))
        choices.append([tok.encode(" " + c) for c in item.choices])
    return contexts, choices


@torch.inference_mode()
def per_option_loop(model: GPT2, contexts, choices) -> list[list[float]]:
    out = []
    for ctx, opts in zip(contexts, choices, strict=True):
        scores = []
        for opt in opts:
            ids = torch.tensor([ctx + opt[:-1]])
            logprobs = model(ids).logits[0].float().log_softmax(-1)  # (T, V)
            positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(opt))
            scores.append(float(logprobs[positions, torch.tensor(opt)].sum()))
        out.append(scores)
    return out


def one_item_at_a_time(model: GPT2, contexts, choices) -> list[list[float]]:
    return [
        [s.logprob for s in score_choices(model, [ctx], [opts], batch_size=len(opts))[0]]
        for ctx, opts in zip(contexts, choices, strict=True)
    ]


def batched(model: GPT2, contexts, choices, batch_size: int) -> list[list[float]]:
    return [
        [s.logprob for s in item] for item in score_choices(model, contexts, choices, batch_size=batch_size)
    ]


def best_times(methods: dict, contexts, choices, repeats: int) -> tuple[dict[str, float], dict]:
    """Best-of-`repeats` seconds per method; the methods take turns in each round, so a
    change in the shared machine's load hits all of them alike. Warm-up: two items each."""
    for fn in methods.values():
        fn(contexts[:2], choices[:2])
    best = dict.fromkeys(methods, float("inf"))
    results = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            results[name] = fn(contexts, choices)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", default="gpt2", choices=["gpt2", "tiny"], help="random 124M or a tiny model"
    )
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="option rows per forward pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.size == "gpt2":
        config = GPT2Config.from_name("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        config = GPT2Config(n_layer=2, n_head=4, n_embd=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2(config).eval()
    contexts, choices = build_items(args.items, args.shots)
    n_ctx_tokens = sum(map(len, contexts)) / len(contexts)
    n_opt_tokens = sum(len(o) for opts in choices for o in opts) / sum(map(len, choices))
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(
        f"model: random {args.size} ({model.num_parameters() / 1e6:.1f}M), fp32 CPU; {args.items} items, "
        f"{args.shots}-shot, {n_ctx_tokens:.0f} context tokens, 4 options of {n_opt_tokens:.1f} tokens on average"
    )

    methods = {
        "per-option loop (1 sequence/pass)": lambda c, o: per_option_loop(model, c, o),
        "one item at a time (shared context)": lambda c, o: one_item_at_a_time(model, c, o),
        f"batched ({args.batch_size} rows/pass)": lambda c, o: batched(model, c, o, args.batch_size),
    }
    times, results = best_times(methods, contexts, choices, args.repeats)
    ref = results[next(iter(methods))]
    for got in results.values():
        err = max(abs(a - b) for x, y in zip(ref, got, strict=True) for a, b in zip(x, y, strict=True))
        assert err < 1e-3, f"scores differ from the per-option loop by {err}"

    n = args.items
    t_loop = times[next(iter(methods))]
    print(f"{'method':<36} {'items/s':>9} {'vs loop':>8}")
    for name, t in times.items():
        print(f"{name:<36} {n / t:>9.2f} {t_loop / t:>7.2f}x")
    t_batch = times[list(methods)[-1]]
    print(f"batched / per-option loop: {t_loop / t_batch:.2f}x  (best of {args.repeats} interleaved rounds)")


if __name__ == "__main__":
    main()
