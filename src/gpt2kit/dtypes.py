"""The names of the float types a model loads and computes in: one constant, without torch.

`gpt2kit.device` maps them to torch dtypes, `TrainConfig` and the CLI's `--dtype` offer
them; all read this tuple, and none imports torch for it (so `gpt2kit --help` stays fast).

>>> DTYPE_CHOICES
('auto', 'float32', 'bfloat16', 'float16')
"""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)  # auto: see gpt2kit.device.auto_dtype
