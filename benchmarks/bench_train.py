"""Training throughput: gpt2kit's training loop vs a plain nanoGPT-style PyTorch loop, same run.

Both train the same GPT-2 shape with the same batch, block and fp32 on CPU (or the GPU with
--device cuda) on the same memory-mapped tokens. The baseline is nanoGPT's model.py and
train.py inner loop, condensed: its model (Linear lm_head tied to wte, SDPA attention), its
get_batch (a fresh np.memmap per batch, torch.stack of slices), its AdamW setup (decay
groups, `fused` only on CUDA) and its step (forward, backward, clip 1.0, step, zero_grad).
gpt2kit's figure comes from `gpt2kit.training.loop.train` itself (metrics records, after warm-up).

    python benchmarks/bench_train.py                      # the README's figures
    python benchmarks/bench_train.py --n-layer 4 --n-embd 256 --block 128 --batch 16 --repeats 3

Prints tokens/s of each and the ratio. Each figure is the fastest single step (after
--warmup steps) over --repeats interleaved runs: on a shared machine the fastest step is
the one least disturbed by other processes, so best-of is the stable statistic.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2kit.data.shards import write_meta, write_shard
from gpt2kit.tokenizer.tokenizer import Tokenizer, bytes_to_unicode
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.loop import train

# --- nanoGPT (model.py), condensed ------------------------------------------------------------


class NanoAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = NanoAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.h = nn.ModuleList([NanoBlock(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def nanogpt_tokens_per_s(args: argparse.Namespace, data_dir: Path, vocab: int, device: str) -> float:
    torch.manual_seed(0)
    model = NanoGPT(vocab, args.block, args.n_layer, args.n_head, args.n_embd).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=device == "cuda")

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(data_dir / "train-00000.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - args.block, (args.batch,))
        x = torch.stack([torch.from_numpy(data[i : i + args.block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + args.block].astype(np.int64)) for i in ix])
        return x.to(device), y.to(device)

    def step() -> float:
        x, y = get_batch()
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    best = math.inf
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step().item()  # the step's end (nanoGPT reads the loss at each log_interval)
        best = min(best, time.perf_counter() - t0)
    return args.batch * args.block / best


def gpt2kit_tokens_per_s(args: argparse.Namespace, data_dir: Path, run_dir: Path, device: str) -> float:
    cfg = TrainConfig(
        data=str(data_dir),
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        block_size=args.block,
        batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        log_interval=1,  # a tokens/s record for every step
        eval_interval=10**9,
        ckpt_interval=10**9,
        warmup_steps=1,
        device=device,
        dtype="float32",
        compile=args.compile,
    )
    records: list[dict] = []
    train(cfg, run_dir, on_event=lambda e: records.append(e) if "tokens_per_s" in e else None)
    return max(r["tokens_per_s"] for r in records if r["step"] > args.warmup)


def make_data(path: Path, vocab: int, n_tokens: int) -> None:
    """Random tokens in gpt2kit's data format, with a byte-level tokenizer padded to `vocab`."""
    tok_vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok_vocab["<|endoftext|>"] = len(tok_vocab)
    tok = Tokenizer(tok_vocab, [], name="bytes")
    tok.save(path / "tokenizer")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tok.n_vocab, size=n_tokens, dtype=np.uint16)
    write_shard(path / "train-00000.bin", ids)
    split = {"files": ["train-00000.bin"], "tokens": n_tokens, "documents": 1}
    tokenizer = {"name": "bytes", "n_vocab": tok.n_vocab, "eot_token": tok.eot_token, "files": "tokenizer"}
    write_meta(path, {"dtype": "uint16", "tokenizer": tokenizer, "splits": {"train": split}, "source": {}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile gpt2kit's model")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = 257  # the data's tokenizer; both models use the same vocabulary
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, device {args.device}"
    )
    print(
        f"model: n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} vocab={vocab}, "
        f"batch {args.batch} x block {args.block}, fp32, {args.steps} timed steps after {args.warmup}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        make_data(data_dir, vocab, 1_000_000)
        ours, theirs = [], []
        for r in range(args.repeats):
            theirs.append(nanogpt_tokens_per_s(args, data_dir, vocab, args.device))
            ours.append(gpt2kit_tokens_per_s(args, data_dir, Path(tmp) / f"run{r}", args.device))
            print(f"  repeat {r + 1}: nanoGPT-style {theirs[-1]:,.0f} tok/s, gpt2kit {ours[-1]:,.0f} tok/s")
    best_ours, best_theirs = max(ours), max(theirs)
    result = {
        "nanogpt_tokens_per_s": round(best_theirs),
        "gpt2kit_tokens_per_s": round(best_ours),
        "ratio": round(best_ours / best_theirs, 3),
    }
    print(f"best of {args.repeats}: {json.dumps(result)}")
    print(
        f"gpt2kit / nanoGPT-style = {best_ours / best_theirs:.2f}x {'(target >= 1.2x)' if math.isfinite(best_ours) else ''}"
    )


if __name__ == "__main__":
    main()
