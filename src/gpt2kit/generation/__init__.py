"""Generation: one engine under every way of asking for tokens.

- `config`: `SamplingConfig`, every control of a generation, checked once
- `processors`: logits -> next token (penalties, filters, the sampler); pure functions
- `engine`: continuous batching over cache slots; every caller decodes here
- `generate`, `complete`, `beam`: the public entry points (ids, text, beams)
- `prompts`: prompts as the engine takes them (fitting, left padding, the end-of-text id)
- `textstream`: tokens -> text that is safe to show (whole characters, no stop-string leaks)
"""

from gpt2kit.generation.beam import beam_search
from gpt2kit.generation.complete import Completion, CompletionChunk, complete
from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.generate import generate

__all__ = ["Completion", "CompletionChunk", "SamplingConfig", "beam_search", "complete", "generate"]
