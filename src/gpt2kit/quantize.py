"""Int8 weight-only quantization (opt-in): 4x smaller block weights, activations stay float.

Every `nn.Linear` inside the transformer blocks becomes an `Int8Linear`: weights rounded
per output channel to int8 with one float scale per row (symmetric, scale = max|w| / 127).
The tied embedding / output projection and the LayerNorms stay in float. The matmul uses
torch's `_weight_int8pack_mm` kernel where it exists (CPU), else dequantizes on the fly.
The quality cost is measured as a perplexity delta (benchmarks/README.md); on CPUs
without int8 dot-product instructions it is *slower* than fp32, so it is a memory option.

>>> model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10, n_positions=8))
>>> _ = quantize_int8(model); type(model.h[0].mlp.c_fc).__name__
'Int8Linear'
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2kit.model import GPT2


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, with q int8 (out, in) and scale (out,) per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("bias", linear.bias.detach().clone() if linear.bias is not None else None)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale.to(x.dtype))
        else:
            y = F.linear(x2, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> Tensor:
        """The float weight this layer computes with (out, in)."""
        return self.weight.float() * self.scale.float()[:, None]


@torch.no_grad()
def quantize_int8(model: GPT2) -> GPT2:
    """Replace the blocks' Linear layers by `Int8Linear` in place (inference only); returns the model."""
    for block in model.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    model.eval()
    return model
