"""One GGUF file in llama.cpp (llama-cpp-python) as a system of bench_generate.py.

It runs in the Python that has llama_cpp, never gpt2kit's, with one JSON argument:
{"model": "m.gguf", "ids": [[prompt ids]], "new": 128, "threads": 2, "no_amx": false}, and
answers bench_generate's commands on stdin, one line each (the protocol of its children):

- first, unasked: a note (llama.cpp's system info: the instruction sets its kernels use);
- "warm": a 4-token run, answers "ok";
- "rate": the decode tokens/s of the same wall-clock method as every other system (a
  1-token run, then a `new`-token run; rows x (new - 1) / the difference), then llama.cpp's
  own figure for the `new`-token run (`llama_perf_context`: n_eval / t_eval);
- "tokens": the `new` greedy tokens (JSON), end-of-text never ending the run.

A run is `llm.eval(prompt)`, then one `llm.eval([token])` per further token, the token the
argmax of `llama_get_logits_ith(ctx, -1)` (the peers README's recipe). llama-cpp-python's
`Llama` decodes one sequence, so one prompt only.
"""

from __future__ import annotations

import ctypes
import json
import sys

import llama_cpp
import llama_cpp.llama_cpp as lib
import numpy as np

from peer_protocol import answers, decode_rate, serve


def load(req: dict) -> llama_cpp.Llama:
    if req.get("no_amx"):  # AMX lives in ggml's extra buffer types; the avx512 level turns it off
        default = lib.llama_model_default_params

        def params() -> object:
            p = default()
            p.use_extra_bufts = False
            return p

        lib.llama_model_default_params = params
    return llama_cpp.Llama(
        model_path=req["model"],
        n_ctx=len(req["ids"][0]) + req["new"] + 8,
        n_batch=512,
        n_threads=req["threads"],
        n_threads_batch=req["threads"],
        n_gpu_layers=0,
        logits_all=False,
        verbose=False,
    )


def main() -> None:
    req = json.loads(sys.argv[1])
    reply = answers()
    if len(req["ids"]) != 1:
        raise SystemExit("llama-cpp-python's Llama decodes one sequence: batch 1 only")
    llm = load(req)
    prompt, n_vocab = req["ids"][0], llm.n_vocab()

    def logits() -> np.ndarray:
        ptr = lib.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))

    def run(n: int) -> list[list[int]]:
        llm.reset()
        llm.eval(prompt)
        out = [int(np.argmax(logits()))]
        for _ in range(n - 1):
            llm.eval([out[-1]])
            out.append(int(np.argmax(logits())))
        return [out]

    def rate() -> str:
        reset = lambda: lib.llama_perf_context_reset(llm.ctx)  # noqa: E731
        wall = decode_rate(run, rows=1, new=req["new"], before=reset)
        perf = lib.llama_perf_context(llm.ctx)
        own = perf.n_eval / (perf.t_eval_ms / 1000) if perf.t_eval_ms > 0 else float("nan")
        return f"{wall} {own}"

    info = lib.llama_print_system_info().decode().strip().rstrip("|").strip()
    print(
        f"llama.cpp {info}" + (" (AMX off: use_extra_bufts=False)" if req.get("no_amx") else ""),
        file=reply,
        flush=True,
    )
    serve(reply, run=run, rate=rate, new=req["new"])


if __name__ == "__main__":
    main()
