"""Run a GGUF file in llama.cpp (llama-cpp-python) and print what it did, as JSON.

It runs in the Python that has llama_cpp (its own virtual environment: benchmarks/README.md,
"GGUF in llama.cpp", has the recipe), never in gpt2kit's: benchmarks/check_gguf.py and tests/model/test_gguf_llama.py
call it in a subprocess with a JSON request on stdin:

    {"model": "m.gguf", "n_ctx": 1024, "prompt": [ids], "new_tokens": 64, "texts": ["...", ...],
     "logits": true}

and read back {"n_vocab", "n_ctx_train", "greedy": [ids], "tokens": [[ids], ...],
"first_logits": [...]}: llama.cpp's greedy continuation of the prompt (argmax of its logits at
each step, end-of-text ignored), its token ids for each text (no BOS, special tokens as text),
and the logits after the prompt.
"""

from __future__ import annotations

import ctypes
import json
import sys

import llama_cpp
import numpy as np


def main() -> None:
    req = json.load(sys.stdin)
    llm = llama_cpp.Llama(
        model_path=req["model"],
        n_ctx=req.get("n_ctx", 0),  # 0: llama.cpp's default
        n_threads=req.get("threads", 2),
        n_threads_batch=req.get("threads", 2),
        n_gpu_layers=0,
        logits_all=False,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    out: dict = {
        "n_vocab": n_vocab,
        "n_ctx_train": llama_cpp.llama_model_n_ctx_train(llm.model),
        "greedy": [],
        "tokens": [],
    }
    for text in req.get("texts", []):
        out["tokens"].append(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    prompt = req.get("prompt")
    if prompt:
        llm.eval(prompt)
        logits = _last_logits(llm, n_vocab)
        if req.get("logits"):
            out["first_logits"] = logits.tolist()
        for _ in range(req.get("new_tokens", 0)):
            token = int(np.argmax(logits))
            out["greedy"].append(token)
            llm.eval([token])
            logits = _last_logits(llm, n_vocab)
    json.dump(out, sys.stdout)


def _last_logits(llm: llama_cpp.Llama, n_vocab: int) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()


if __name__ == "__main__":
    main()
