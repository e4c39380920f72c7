"""The GPT-2 network and what turns it into something that runs.

- `config`: `GPT2Config`, the hyper-parameters of every size
- `gpt2`: `GPT2`, the network (forward, prefill, decode_step)
- `checkpoint`: Hugging Face model folders: load, save, download
- `quantize`: int8 through torchao
- `compiled`, `stepcache`: decode steps built by AOTInductor and the cache that keeps them
"""

from gpt2kit.model.config import GPT2Config
from gpt2kit.model.gpt2 import GPT2

__all__ = ["GPT2", "GPT2Config"]
