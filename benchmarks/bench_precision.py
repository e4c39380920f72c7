"""float32, bf16 and int8 for decoding: the speed of the decode step, and the quality cost.

Speed (the default): GPT-2 124M with random weights (transformers' default GPT2Config, saved
with `save_pretrained` and loaded back by gpt2kit in each precision). gpt2kit's one-token step
`GPT2.decode_step` runs eager and compiled (torch.compile with freezing, max_autotune and the
CPP GEMM backend, as gpt2kit.model.compiled does) over a static cache of --cache positions; the peer
is transformers' one-token forward with its KV cache holding --cache positions (the cache is
cropped back after each step, so every step sees the same length). All runs live in one
process and are timed interleaved, --repeats rounds of --steps steps each: the best and the
median tokens/s, and ratios to transformers float32 and to gpt2kit float32 compiled.

Quality (--quality RUN_DIR): perplexity in each precision on the quick start's Shakespeare
val split (RUN_DIR/final scored on RUN_DIR/data's whole val split, as the quick start
scores it), and of a random gpt2 on the first --random-tokens GPT-2 tokens of the same text
(disjoint 1024-token windows); the change from float32, relative.

    python benchmarks/bench_precision.py                          # every precision, batch 1 and 8
    python benchmarks/bench_precision.py --batch 1 --only float32 int8-dynamic
    python benchmarks/bench_precision.py --quality runs/quickstart
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

# name: (dtype, int8 scheme)
PRECISIONS = {
    "float32": (torch.float32, None),
    "bfloat16": (torch.bfloat16, None),
    "int8-dynamic": (torch.float32, "int8-dynamic"),
    "int8-dynamic+bf16": (torch.bfloat16, "int8-dynamic"),
    "int8-weight-only": (torch.float32, "int8-weight-only"),
    "int8-weight-only+bf16": (torch.bfloat16, "int8-weight-only"),
}
INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
FLAGS = ("avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def machine() -> str:
    from importlib.metadata import version

    import transformers

    from gpt2kit.device import cpu_features

    features = cpu_features()
    name = features.get("cpu_name") or platform.processor() or "unknown CPU"
    flags = " ".join(f for f in FLAGS if features.get(f))
    return (
        f"machine: {name}, {features.get('num_physical_cores', '?')} cores, {torch.get_num_threads()} threads; "
        f"flags: {flags}\nsoftware: torch {torch.__version__}, torchao {version('torchao')}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}"
    )


def random_gpt2(path: Path):
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    hf.save_pretrained(path)
    return hf


class OurStep:
    """gpt2kit's decode step for `batch` rows at position `pos` of a `cache`-long static cache."""

    def __init__(self, model, *, batch: int, cache: int, compiled: bool) -> None:
        c = model.config
        dtype = model.wte.weight.dtype
        shape = (batch, c.n_head, cache, c.head_size)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(c.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(c.n_layer)]
        self.idx = torch.randint(0, 50257, (batch, 1))
        self.pos = torch.full((batch,), cache // 2)
        self.fn = (
            torch.compile(model.decode_step, fullgraph=True, dynamic=False) if compiled else model.decode_step
        )

    def __call__(self) -> None:
        with torch._inductor.config.patch(INDUCTOR):
            self.fn(self.idx, self.pos, self.k, self.v)


class PeerStep:
    """transformers' one-token forward over a KV cache of `length` positions."""

    def __init__(self, hf, *, batch: int, length: int) -> None:
        import inspect

        self.hf = hf
        # transformers 5 renamed past_key_values to cache; 4.x knows only the old name.
        self.key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        out = hf(torch.randint(0, 50257, (batch, length)), use_cache=True)
        self.cache = getattr(out, "cache", None) or out.past_key_values
        self.idx = torch.randint(0, 50257, (batch, 1))

    def __call__(self) -> None:
        self.hf(self.idx, use_cache=True, **{self.key: self.cache})
        self.cache.crop(-1)  # drop the token just added: every step sees `length` positions


def speed(args: argparse.Namespace) -> None:
    from gpt2kit.model import GPT2

    torch._dynamo.config.recompile_limit = 64  # one compiled decode_step per model and batch size
    print(machine())
    print(
        f"model: GPT-2 124M random weights; cache {args.cache} positions; {args.steps} steps x {args.repeats} rounds"
    )
    runs: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as d, torch.inference_mode():
        hf = random_gpt2(Path(d))
        for batch in args.batch:
            runs[f"transformers float32 B={batch}"] = PeerStep(hf, batch=batch, length=args.cache // 2)
        for name in args.only:
            dtype, scheme = PRECISIONS[name]
            model = GPT2.from_pretrained(d, dtype=dtype, quantize=scheme)
            for batch in args.batch:
                for compiled in (False, True):
                    key = f"gpt2kit {name} {'compiled' if compiled else 'eager'} B={batch}"
                    step = OurStep(model, batch=batch, cache=args.cache, compiled=compiled)
                    t0 = time.perf_counter()
                    with contextlib.redirect_stderr(io.StringIO()):  # autotuning tables
                        step()
                        step()
                    if compiled:
                        print(f"  compiled {key} in {time.perf_counter() - t0:.0f} s", flush=True)
                    runs[key] = step
        rates: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(args.repeats):
            for key, step in runs.items():
                batch = int(key.rsplit("B=", 1)[1])
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                rates[key].append(batch * args.steps / (time.perf_counter() - t0))
    print("\n| run | batch | tok/s best | tok/s median | vs transformers fp32 | vs gpt2kit fp32 compiled |")
    print("|---|---|---|---|---|---|")
    for key, r in rates.items():
        label, batch = key.rsplit(" B=", 1)
        peer = max(rates[f"transformers float32 B={batch}"])
        ours = rates.get(f"gpt2kit float32 compiled B={batch}")
        vs_ours = f"{max(r) / max(ours):.2f}x" if ours else "-"
        print(
            f"| {label} | {batch} | {max(r):.1f} | {statistics.median(r):.1f} | "
            f"{max(r) / peer:.2f}x | {vs_ours} |"
        )


def quality(args: argparse.Namespace) -> None:
    from gpt2kit.data.shards import TokenData
    from gpt2kit.evals.perplexity import evaluate_perplexity
    from gpt2kit.evals.split_loss import split_loss
    from gpt2kit.model import GPT2
    from gpt2kit.tokenizer.tokenizer import Tokenizer

    print(machine())
    run = Path(args.quality)
    data = TokenData.open(run / "data")
    final = run / "final"
    print(f"\nquick-start model {final}: whole val split of {run / 'data'}")
    print("| precision | val loss (nats/token) | perplexity | bits/byte | perplexity vs float32 |")
    print("|---|---|---|---|---|")
    base = None
    for name in args.only:
        dtype, scheme = PRECISIONS[name]
        model = GPT2.from_pretrained(final, dtype=dtype, quantize=scheme)
        s = split_loss(model, data, "val", block_size=model.config.n_positions)
        ppl = math.exp(s["loss"])
        base = base or ppl
        print(
            f"| {name} | {s['loss']:.4f} | {ppl:.3f} | {s['bits_per_byte']:.4f} | {100 * (ppl / base - 1):+.2f}% |"
        )

    text = data.tokenizer().decode(data.tokens("val").tolist())
    gpt2 = Tokenizer.gpt2()
    ids = gpt2.encode_ordinary(text)[: args.random_tokens]
    text = gpt2.decode(ids)
    print(
        f"\nrandom gpt2 (124M): the first {len(ids)} GPT-2 tokens of the same val split, 1024-token windows"
    )
    print("| precision | perplexity | perplexity vs float32 |")
    print("|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as d:
        random_gpt2(Path(d))
        for name in args.only:
            dtype, scheme = PRECISIONS[name]
            model = GPT2.from_pretrained(d, dtype=dtype, quantize=scheme)
            ppl = evaluate_perplexity(model, gpt2, text, stride=1024, batch_size=2)["perplexity"]
            base = base or ppl
            print(f"| {name} | {ppl:.2f} | {100 * (ppl / base - 1):+.3f}% |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--cache", type=int, default=256, help="cache positions (the peer's: half)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--quality", default=None, metavar="RUN_DIR", help="instead: perplexity of each precision"
    )
    ap.add_argument(
        "--random-tokens", type=int, default=16384, help="--quality: tokens the random gpt2 scores"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "float32" in args.only:  # the reference comes first
        args.only.remove("float32")
        args.only.insert(0, "float32")
    quality(args) if args.quality else speed(args)


if __name__ == "__main__":
    main()
