"""gpu_check stage "train": training tokens/s and MFU of gpt2 124M through gpt2kit's own loop.

`gpt2kit.training.loop.train` itself (what `gpt2kit train` runs) on random GPT-2 tokens
(vocabulary 50257, padded to 50304 as the loop does), `--batch` x `--block` tokens per step,
bf16 autocast (`--dtype bfloat16`, the default), `torch.compile` of the model with `--compile`.
`--warmup` steps (the compile) then `--steps` timed steps; the loop logs tokens/s every
`--log-every` steps, over the time since its last log (it reads the loss, so the GPU has
finished the steps it counts); the figure is the median of the logs after the warm-up.

MFU = flops per token x tokens/s / the GPU's peak dense bf16 FLOP/s. Flops per token are
the loop's own `flops_per_token` (PaLM's 6N + 12 L H Q T, as nanoGPT's estimate_mfu:
the attention term included, N counting the tied embedding once). The peak: `--peak-tflops`,
else read off the GPU's name (`PEAK_TFLOPS`; the H100 SXM and the H200 989 dense bf16 TFLOP/s,
the vendors' datasheets), else MFU is not given. The check: every loss finite.

    python benchmarks/gpu_check_train.py --device cuda --compile --result /tmp/train.jsonl
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpt2kit import Tokenizer
from gpt2kit.data.shards import write_meta, write_shard
from gpt2kit.model import GPT2Config
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.loop import flops_per_token, train
from gpu_check_common import SIZES, Results, machine_line

# Dense bf16 tensor-core peaks, TFLOP/s (no sparsity), by a part of the GPU's name; the
# first match wins, so the more specific names come first.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """The peak to divide by, and where it came from."""
    if given:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for part, tflops in PEAK_TFLOPS.items():
        if part in name:
            return tflops, f"{name}'s datasheet"
    return None, f"no peak known for {name} (give --peak-tflops)"


def make_data(path: Path, n_tokens: int) -> None:
    """Random GPT-2 token ids in gpt2kit's data format, with GPT-2's tokenizer."""
    tok = Tokenizer.gpt2()
    tok.save(path / "tokenizer")
    ids = np.random.default_rng(0).integers(0, tok.n_vocab, size=n_tokens, dtype=np.uint16)
    write_shard(path / "train-00000.bin", ids)
    split = {"files": ["train-00000.bin"], "tokens": n_tokens, "documents": 1}
    tokenizer = {"name": "gpt2", "n_vocab": tok.n_vocab, "eot_token": tok.eot_token, "files": "tokenizer"}
    write_meta(path, {"dtype": "uint16", "tokenizer": tokenizer, "splits": {"train": split}, "source": {}})


def run(args: argparse.Namespace, work: Path) -> tuple[list[dict], GPT2Config]:
    """Train; the loop's tokens/s records and the config of the model it trained."""
    make_data(work / "data", max(2_000_000, 4 * args.batch * args.block))
    size = SIZES[args.size]
    cfg = TrainConfig(
        data=str(work / "data"),
        n_layer=size["n_layer"],
        n_head=size["n_head"],
        n_embd=size["n_embd"],
        block_size=args.block,
        batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        log_interval=args.log_every,
        eval_interval=10**9,  # no evaluation and no checkpoint inside the timed steps
        ckpt_interval=10**9,
        warmup_steps=1,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
    )
    records: list[dict] = []
    t0 = time.perf_counter()
    train(cfg, work / "run", on_event=lambda e: records.append(e) if "tokens_per_s" in e else None)
    print(f"train() returned after {time.perf_counter() - t0:.1f}s (the final save included)", flush=True)
    return records, GPT2Config.from_json_file(work / "run" / "final" / "config.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="gpt2", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--block", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--warmup", type=int, default=10, help="steps before the timed ones (compile)")
    p.add_argument("--steps", type=int, default=40, help="timed steps")
    p.add_argument("--log-every", type=int, default=5, help="steps per tokens/s record")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="bfloat16: autocast")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the GPU")
    p.add_argument("--work", default=None, help="folder for the data and the run (default: a temporary one)")
    p.add_argument("--result", required=True, help="JSON lines file the item is appended to")
    args = p.parse_args()
    print(machine_line(), flush=True)
    device = torch.device(args.device)
    results = Results(args.result)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        records, config = run(args, Path(tmp))
    timed = [r["tokens_per_s"] for r in records if r["step"] > args.warmup]
    losses = [r["loss"] for r in records]
    rate = statistics.median(timed)
    peak, source = peak_tflops(device, args.peak_tflops)
    per_token = flops_per_token(config, args.block)
    mfu = per_token * rate / (peak * 1e12) if peak else None
    dtype = "bf16 autocast" if args.dtype == "bfloat16" else "float32"
    item = (
        f"train {args.size}, {dtype}, {'torch.compile' if args.compile else 'eager'}, "
        f"batch {args.batch} x {args.block}"
    )
    figure = f"{rate:,.0f} tok/s, MFU " + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a")
    memory = (
        f"; peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        if device.type == "cuda"
        else ""
    )
    ok = all(math.isfinite(x) for x in losses) and len(timed) > 0
    check = (
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, all finite; median of {len(timed)} logs over "
        f"{args.steps} timed steps after {args.warmup}; {per_token / 1e9:.3f} GFLOP/token; peak: "
        f"{f'{peak:g} TFLOP/s, ' if peak else ''}{source}{memory}"
    )
    results.add(item, "PASS" if ok else "FAIL", figure, check, tok_s=rate, mfu=mfu, peak_tflops=peak)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
