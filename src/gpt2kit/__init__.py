"""gpt2kit: GPT-2 exactly: tokenizer, model, checkpoints, training, generation, serving.

The packages, and which way imports flow, are described in docs/architecture.md.
"""

from gpt2kit._version import __version__
from gpt2kit.errors import Gpt2kitError
from gpt2kit.generation import (
    Completion,
    CompletionChunk,
    SamplingConfig,
    beam_search,
    complete,
    generate,
)
from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.tokenizer import Tokenizer
from gpt2kit.training import TrainConfig, train

__all__ = [
    "GPT2",
    "Completion",
    "CompletionChunk",
    "GPT2Config",
    "Gpt2kitError",
    "SamplingConfig",
    "Tokenizer",
    "TrainConfig",
    "__version__",
    "beam_search",
    "complete",
    "generate",
    "train",
]
