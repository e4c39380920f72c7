"""GPT-2's byte-level BPE: the exact tokenizer (`tokenizer.py`) and training a new vocabulary (`bpe.py`)."""

from gpt2kit.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
