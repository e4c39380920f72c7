"""Training: a run from prepared data to checkpoints, on one device or many.

- `config`: `TrainConfig`, every setting, from TOML and `key=value` overrides
- `loop`: `train`, the loop itself
- `parallel`: single process, DDP or FSDP behind one interface
- `optim`, `schedule`: the optimizers (AdamW, Muon) and the learning-rate schedule
- `checkpoint`: run checkpoints (resume state), written crash-safely
- `metrics`, `plot`: metrics.jsonl and its plot
- `quickstart`: the README's demo: data, tokenizer, training, samples
"""

from gpt2kit.training.config import TrainConfig
from gpt2kit.training.loop import train

__all__ = ["TrainConfig", "train"]
