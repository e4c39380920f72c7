"""Tiny training runs: a prepared byte-level data directory and the settings that keep a model tiny."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import bytes_vocab, shakespeare_plays
from gpt2kit.data.shards import dtype_for, write_meta, write_shard
from gpt2kit.tokenizer.tokenizer import Tokenizer
from gpt2kit.training.config import TrainConfig

TINY = {
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 32,
    "block_size": 32,
    "batch_size": 4,
    "warmup_steps": 2,
    "eval_iters": 2,
    "threads": 1,
    # float32 whatever the CPU: comparisons across process counts need float32's tolerance
    "dtype": "float32",
}


def make_data(path: Path, text: str | None = None, *, val: bool = True) -> Path:
    """A prepared data directory of `text` (default: the start of a play), byte-level tokens."""
    vocab, merges = bytes_vocab([])
    tok = Tokenizer(vocab, merges, name="bytes")
    tok.save(path / "tokenizer")
    text = text if text is not None else shakespeare_plays()[0].read_text(encoding="utf-8")[:20000]
    ids = np.array([*tok.encode_ordinary(text), tok.eot_token], dtype=dtype_for(tok.n_vocab))
    n = int(len(ids) * 0.9) if val else len(ids)
    splits = {"train": (ids[:n], "train-00000.bin"), "val": (ids[n:], "val-00000.bin")}
    meta_splits = {}
    for split, (part, name) in splits.items():
        if split == "val" and not val:
            continue
        write_shard(path / name, part)
        meta_splits[split] = {"files": [name], "tokens": len(part), "documents": 1}
    tokenizer = {"name": "bytes", "n_vocab": tok.n_vocab, "eot_token": tok.eot_token, "files": "tokenizer"}
    write_meta(path, {"dtype": "uint16", "tokenizer": tokenizer, "splits": meta_splits, "source": {}})
    return path


def config(data_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, "data": str(data_dir), **overrides})


def tiny_args(data: Path, out: Path, **overrides) -> list[str]:
    args = ["train", "--data", str(data), "--out", str(out), "--no-progress"]
    for key, value in {**TINY, **overrides}.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args
