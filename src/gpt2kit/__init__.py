"""gpt2kit: GPT-2 exactly: tokenizer, model, checkpoints, training, generation, serving."""

from gpt2kit.beam import beam_search
from gpt2kit.completion import Completion, CompletionChunk, complete
from gpt2kit.config import GPT2Config
from gpt2kit.errors import Gpt2kitError
from gpt2kit.generate import generate
from gpt2kit.model import GPT2
from gpt2kit.sampling import SamplingConfig
from gpt2kit.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT2",
    "Completion",
    "CompletionChunk",
    "GPT2Config",
    "Gpt2kitError",
    "SamplingConfig",
    "Tokenizer",
    "__version__",
    "beam_search",
    "complete",
    "generate",
]
