"""Training data: raw text -> token shards -> batches.

- `corpora`: where text comes from (files, JSON Lines, Hugging Face datasets, Shakespeare)
- `prepare`: the pipeline behind `gpt2kit prepare`
- `shards`: the on-disk layout (`meta.json` + binary shards) and `TokenData`
- `batches`: random training blocks as a pure function of the step
"""

from gpt2kit.data.shards import TokenData

__all__ = ["TokenData"]
