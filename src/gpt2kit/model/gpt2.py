"""The GPT-2 transformer, exactly as OpenAI's checkpoints compute it. Pure torch.

Parameter names are the checkpoints' own (wte, wpe, h.{i}.attn.c_attn, ln_f, ...), with
`nn.Linear` weights stored [out, in]; checkpoint.py transposes the four Conv1D weights.

Shapes: B batch, T new positions, L positions attended to (cache included), C n_embd,
nh n_head, hs head size, V vocab_size.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2kit.device import auto_dtype, pick_device, pick_dtype
from gpt2kit.errors import ConfigError
from gpt2kit.model import checkpoint
from gpt2kit.model.config import TANH_GELUS, GPT2Config, sinusoidal_table
from gpt2kit.model.quantize import check_method, quantize_int8
from gpt2kit.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class CausalLMOutput(NamedTuple):
    """`logits` (B, T, V) and, when targets were given, the mean cross-entropy `loss`."""

    logits: Tensor
    loss: Tensor | None = None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.head_size
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        cache: tuple[Tensor, Tensor] | None = None,
        input_pos: Tensor | None = None,
        lengths: Sequence[int] | None = None,
    ) -> Tensor:
        """Self-attention of `x` (B, T, C), or with `cache`, this layer's keys and values
        (B, nh, L, hs) written in place (`_write`): positions 0..T-1 of every row (prefill), or
        with `input_pos` (B,) one new token per row at its own position (decode). `lengths`
        (prefill, B = 1): `x` is several prompts one after another, prompt i's keys and values
        go to cache row i, and each attends to itself alone."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        if lengths is not None:
            assert cache is not None and B == 1, "prompts one after another fill a cache, one row each"
            y = _attend_each(q, k, v, cache, lengths, self.attn_pdrop if self.training else 0.0)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))
        if cache is not None:
            k, v = _write(cache, k, v, input_pos)  # (B, nh, L, hs)
            if input_pos is not None:
                # Written into the whole cache first, read over the mask's span after: a write
                # into a slice of a compiled step's input cost a copy of that slice, twice, per
                # layer (benchmarks/README.md, "The 8-row step").
                k, v = k[:, :, : attn_mask.shape[-1]], v[:, :, : attn_mask.shape[-1]]
        if input_pos is not None and torch.compiler.is_compiling():
            # Written out, so that inductor fuses it into its own loops: for one query the CPU
            # flash kernel's fixed cost per call was ~12% of a gpt2 step. Eager, the one fused
            # kernel below beats these three small ones (and their thread syncs).
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_size))  # (B, nh, 1, L)
            y = att.masked_fill(~attn_mask, float("-inf")).softmax(dim=-1) @ v  # (B, nh, 1, hs)
        else:
            dropout = self.attn_pdrop if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout, is_causal)  # (B, nh, T, hs)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


def _attend_each(
    q: Tensor, k: Tensor, v: Tensor, cache: tuple[Tensor, Tensor], lengths: Sequence[int], dropout: float
) -> Tensor:
    """Causal attention of each prompt of q, k, v (1, nh, sum(lengths), hs) over itself alone,
    its keys and values written into its own row of `cache`: the same call, on the same
    shapes, as that prompt prefilled alone."""
    k_cache, v_cache = cache
    ys = []
    for i, (qi, ki, vi) in enumerate(
        zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2), strict=True)
    ):
        ki, vi = _write((k_cache[i : i + 1], v_cache[i : i + 1]), ki, vi, None)
        ys.append(F.scaled_dot_product_attention(qi, ki, vi, None, dropout, True))  # (1, nh, t, hs)
    return torch.cat(ys, dim=2)


def _write(
    cache: tuple[Tensor, Tensor], k: Tensor, v: Tensor, input_pos: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Write the new keys and values (B, nh, T, hs) into `cache`; return what to attend to.

    Prefill (`input_pos` None): positions 0..T-1 of every row, attended to causally. Decode
    and extend (`input_pos` (B,)): row b's at input_pos[b].. input_pos[b] + T - 1; every
    shape stays static (the whole cache is returned, and the caller's mask hides what a row
    has not written)."""
    k_cache, v_cache = cache
    if input_pos is None:
        T = k.shape[2]
        k_cache[:, :, :T] = k
        v_cache[:, :, :T] = v
        return k_cache[:, :, :T], v_cache[:, :, :T]
    rows = torch.arange(k.shape[0], device=k.device)
    T = k.shape[2]
    if T == 1:  # decode: the form the compiled step is built from
        k_cache[rows, :, input_pos] = k[:, :, 0]  # row b's key at its own position input_pos[b]
        v_cache[rows, :, input_pos] = v[:, :, 0]
        return k_cache, v_cache
    pos = input_pos[:, None] + torch.arange(T, device=k.device)  # (B, T): `extend`
    k_cache[rows[:, None], :, pos] = k.transpose(1, 2)  # (B, T, nh, hs)
    v_cache[rows[:, None], :, pos] = v.transpose(1, 2)
    return k_cache, v_cache


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_size)
        self.c_proj = nn.Linear(config.inner_size, config.n_embd)
        self.approximate = "tanh" if config.activation_function in TANH_GELUS else "none"
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-norm transformer block (GPT-2's change from GPT-1)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        cache: tuple[Tensor, Tensor] | None = None,
        input_pos: Tensor | None = None,
        lengths: Sequence[int] | None = None,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal, cache, input_pos, lengths)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2: token + position embeddings, n_layer blocks, ln_f, logits tied to wte.

    >>> model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64))
    >>> model(torch.tensor([[1, 2, 3]])).logits.shape
    torch.Size([1, 3, 100])
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.wte_rows, config.n_embd)
        if config.position_embedding == "learned":
            self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        else:
            table = sinusoidal_table(config.n_positions, config.n_embd)
            self.register_buffer("wpe_table", table, persistent=False)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        if self.wte.weight.device.type != "meta":
            self.reset_parameters()

    # --- construction -------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02) weights, zero biases, residual projections / sqrt(2 n_layer)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The two projections that write into the residual stream, 2 per block (GPT-2 paper).
        for block in self.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        if self.config.position_embedding == "sinusoidal":
            self.wpe_table.copy_(sinusoidal_table(self.config.n_positions, self.config.n_embd))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        quantize: str | None = None,
    ) -> GPT2:
        """Load a model directory, a GPT-2 GGUF file ("model.gguf": f32, f16, bf16 or q8_0,
        dequantized), or download a hub id ("gpt2", "openai-community/gpt2-xl").

        `dtype`: None keeps the checkpoint's own; else a torch dtype or its name ("float32",
        "bfloat16", "float16", or "auto": bf16 where `device` computes it natively, see
        `gpt2kit.device.auto_dtype`). `quantize="int8"`: int8 weights for inference, computing in
        `dtype`, in the scheme `gpt2kit.model.quantize.pick_scheme` picks for `device`
        ("int8-dynamic" or "int8-weight-only" choose one); the scheme used is `model.quantization`.
        The folder's format is `gpt2kit.model.checkpoint`'s, the GGUF file's `gpt2kit.model.gguf_file`'s
        (its tokenizer: `gpt2kit.model.checkpoint.load_tokenizer`).

        >>> model = GPT2.from_pretrained("path/to/gpt2", dtype="bfloat16", quantize="int8")  # doctest: +SKIP
        """
        check_method(quantize)
        device = pick_device(str(device), flag="device=")
        auto = isinstance(dtype, str) and dtype == "auto"
        if dtype is not None:
            dtype = pick_dtype(dtype, device, flag="dtype=")
        if checkpoint.is_gguf(name_or_path):
            from gpt2kit.model import gguf_file  # imports the gguf package: only for .gguf files

            config, state, _ = gguf_file.read(name_or_path)
            source: str | os.PathLike[str] = name_or_path
        else:
            path = checkpoint.resolve(name_or_path)
            config = GPT2Config.from_json_file(path / "config.json")
            state = checkpoint.read_state_dict(path)
            source = checkpoint.weights_file(path)
        with torch.device("meta"):
            model = cls(config)
        state = checkpoint.from_hf_state_dict(state, model, source=source)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        if config.position_embedding == "sinusoidal":
            # A non-persistent buffer, so still on meta after the load.
            model.wpe_table = sinusoidal_table(config.n_positions, config.n_embd)
        model = model.to(device).eval()
        if auto:
            log.info("dtype auto: %s (%s)", str(dtype).removeprefix("torch."), auto_dtype(device)[1])
        if quantize is not None:
            quantize_int8(model, scheme=quantize)
        return model

    def save_pretrained(self, path: str | os.PathLike[str], *, tokenizer: Tokenizer | None = None) -> None:
        """Write a directory `transformers` loads as-is (see `gpt2kit.model.checkpoint.save_model`)."""
        checkpoint.save_model(self, path, tokenizer=tokenizer)

    def save_gguf(
        self, path: str | os.PathLike[str], *, type: str = "f32", tokenizer: Tokenizer | None = None
    ) -> None:
        """Write one GGUF file that llama.cpp (and so ollama, LM Studio) runs as its `gpt2` model.

        `type`: "f32", "f16", "bf16" or "q8_0" (llama.cpp's 8-bit blocks) for the weight
        matrices; `tokenizer`: the model's (default GPT-2's, for a 50257-token vocabulary).
        The layout is `gpt2kit.model.gguf_file`'s; the write is atomic.

        >>> GPT2.from_pretrained("gpt2").save_gguf("gpt2-q8_0.gguf", type="q8_0")  # doctest: +SKIP
        """
        from gpt2kit.model import gguf_file  # imports the gguf package: only when exporting

        gguf_file.check_type(type)
        if tokenizer is None:
            if self.config.vocab_size != 50257:
                raise ConfigError(
                    f"the model's vocabulary ({self.config.vocab_size} tokens) is not GPT-2's; "
                    "pass tokenizer= (e.g. gpt2kit.model.checkpoint.load_tokenizer(model_dir))"
                )
            tokenizer = Tokenizer.gpt2()
        gguf_file.write(self, path, type=type, tokenizer=tokenizer)

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        """Parameters, the tied wte/lm_head counted once (as the paper's and docs/tokenizer-and-model.md's counts do)."""
        # lm_head, where a quantized model has one, is a copy of wte.
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("lm_head."))
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if hasattr(self, "wpe") else 0)
        return n

    # --- forward ------------------------------------------------------------------------

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> CausalLMOutput:
        """Logits for `idx` (B, T) and, with `targets` (B, T), the mean cross-entropy loss.

        `attention_mask` (B, T), 1 for real tokens and 0 for padding; position ids then count
        real tokens only, so a left-padded row gives the same logits as the row alone. Targets
        equal to -100 are ignored. `last_only` computes logits for the last position only.
        (Generation runs on a KV cache through `prefill` and `decode_step`.)
        """
        B, T = idx.shape
        if idx.shape[1] > self.config.n_positions:
            raise ValueError(f"sequence of {T} positions exceeds the context of {self.config.n_positions}")
        key_mask = None if attention_mask is None else attention_mask.to(device=idx.device, dtype=torch.bool)
        if key_mask is not None and key_mask.shape != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(key_mask.shape)}, expected {(B, T)}")
        if position_ids is None:
            position_ids = _position_ids(key_mask, T, idx.device)
        attn_mask, is_causal = _attention_mask(key_mask, T, idx.device)
        x = self.hidden_states(idx, position_ids, attn_mask, is_causal)
        if last_only:
            x = x[:, -1:, :]
        logits = self.logits(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return CausalLMOutput(logits, loss)

    def hidden_states(
        self,
        idx: Tensor,
        position_ids: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        caches: list[tuple[Tensor, Tensor]] | None = None,
        input_pos: Tensor | None = None,
        lengths: Sequence[int] | None = None,
    ) -> Tensor:
        """ln_f(blocks(wte + wpe)) for (B, T) ids: (B, T, C). Masks as `_attention_mask` makes
        them; `caches[i]` is layer i's (k, v), written as CausalSelfAttention says."""
        x = self.drop(self.wte(idx) + self._positions(position_ids))  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, attn_mask, is_causal, caches[i] if caches is not None else None, input_pos, lengths)
        return self.ln_f(x)

    def prefill(
        self, idx: Tensor, k_cache: list[Tensor], v_cache: list[Tensor], lengths: Sequence[int] | None = None
    ) -> Tensor:
        """Hidden states (B, T, C) of prompts starting at position 0, their keys and values written
        into positions 0..T-1 of `k_cache[i]`/`v_cache[i]` (B, nh, L, hs) for layer i.

        Rows may be right-padded to a common T: attention is causal, so a row's real tokens
        never see its padding, and the padding's cache entries are masked by `decode_step`
        until they are overwritten. Read row b's next-token state at its last real position.

        `lengths`: `idx` (1, sum(lengths)) is several prompts one after another, without
        padding; prompt i (at its own positions 0..lengths[i] - 1, attending to itself alone)
        fills cache row i. Only the matrix products see them together (the engine uses this
        where it checked that those give a row the same bits in any batch).
        """
        if lengths is not None:
            if sum(lengths) != idx.shape[1] or idx.shape[0] != 1 or len(lengths) > k_cache[0].shape[0]:
                raise ValueError(f"prompts of lengths {list(lengths)} don't fit ids {tuple(idx.shape)}")
            positions = torch.cat([torch.arange(t, device=idx.device) for t in lengths]).unsqueeze(0)
        else:
            positions = torch.arange(idx.shape[1], device=idx.device).unsqueeze(0)  # (1, T)
        caches = list(zip(k_cache, v_cache, strict=True))
        return self.hidden_states(idx, positions, None, True, caches, None, lengths)

    def decode_step(
        self,
        idx: Tensor,
        input_pos: Tensor,
        k_cache: list[Tensor],
        v_cache: list[Tensor],
        span: int | None = None,
    ) -> Tensor:
        """Logits (B, V) of one new token per row, row b at its own position `input_pos[b]`.

        `idx` (B, 1) the tokens, `input_pos` (B,) int64, `k_cache[i]`/`v_cache[i]` (B, nh, L, hs)
        layer i's cache. Row b's key and value are written at `input_pos[b]`, and it attends to
        its own positions 0..input_pos[b] only: rows are independent, so a row can join or
        leave a batch (a cache slot) without any tensor changing shape. `span`: attend over
        the first `span` positions only (all L by default; every input_pos[b] < span). This
        is the function the compiled step compiles (`gpt2kit.model.compiled`).
        """
        L = k_cache[0].shape[2] if span is None else span
        written = torch.arange(L, device=idx.device)[None, :] <= input_pos[:, None]  # (B, L)
        attn_mask = written[:, None, None, :]  # (B, 1, 1, L)
        caches = list(zip(k_cache, v_cache, strict=True))
        x = self.hidden_states(idx, input_pos[:, None], attn_mask, False, caches, input_pos)
        return self.logits(x[:, -1])  # (B, V)

    def extend(self, idx: Tensor, input_pos: Tensor, k_cache: list[Tensor], v_cache: list[Tensor]) -> Tensor:
        """Hidden states (B, T, C) of T new tokens per row after the row's cached ones: row b's
        at positions input_pos[b]..input_pos[b] + T - 1, written into the cache there.

        `decode_step` for several tokens at once (the eval scorer's continuations); row b
        attends to its positions up to each token's own."""
        T, L = idx.shape[1], k_cache[0].shape[2]
        positions = input_pos[:, None] + torch.arange(T, device=idx.device)  # (B, T)
        keys = torch.arange(L, device=idx.device)
        attn_mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, L)
        caches = list(zip(k_cache, v_cache, strict=True))
        return self.hidden_states(idx, positions, attn_mask, False, caches, input_pos)

    def logits(self, x: Tensor) -> Tensor:
        """The tied output projection; rows past vocab_size (padding) are never scored.
        A quantized model has an int8 copy of it, `lm_head` (gpt2kit.model.quantize)."""
        if "lm_head" in self._modules:
            return self.lm_head(x)
        return F.linear(x, self.wte.weight[: self.config.vocab_size])

    def _positions(self, position_ids: Tensor) -> Tensor:
        if self.config.position_embedding == "learned":
            return self.wpe(position_ids)
        return self.wpe_table[position_ids].to(self.wte.weight.dtype)


def use_decode_layout(model: nn.Module) -> None:
    """Lay every Linear/Embedding weight out [in, out] in memory; values and shapes unchanged.

    One-token decoding is a matrix-vector product per weight, bound by memory bandwidth.
    On CPU, `x @ W.T` streams a weight stored [in, out] (the `W.T` contiguous) faster than
    one stored [out, in] (benchmarks/README.md, "Decode weight layout"). The GEMM may sum in
    another order, so decode-step logits agree to float rounding, not always to the bit.

    What changes in the model: each 2-D weight's memory order (stride `(1, out)`, a new
    `data_ptr`), once. What doesn't: the Parameter objects, their values, shapes and dtypes,
    so training, `state_dict` and `save_pretrained` work as before, and `model(x)` stays
    bitwise the same (tests/model/test_decode_layout.py, also under ATEN_CPU_CAPABILITY=avx2),
    and trainable when this runs under `torch.inference_mode()`. Idempotent.

    >>> model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10, n_positions=8))
    >>> use_decode_layout(model); model.wte.weight.stride()
    (1, 10)
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.dim() == 2:
            w = module.weight
            if type(w.data) is not Tensor:  # a quantized weight (gpt2kit.model.quantize) has its own layout
                continue
            if w.is_contiguous() and w.shape[0] > 1 and w.shape[1] > 1:
                # The new memory is made in the mode the weight was: under a caller's
                # inference_mode it would become an inference tensor, and the model could
                # no longer be trained.
                with torch.no_grad(), torch.inference_mode(w.is_inference()):
                    w.data = w.data.t().contiguous().t()


# --- masks: the padding mask and the causal mask -----------------------------------------


def _position_ids(key_mask: Tensor | None, T: int, device: torch.device) -> Tensor:
    if key_mask is None:
        return torch.arange(T, device=device).unsqueeze(0)  # (1, T)
    # Count real tokens only, so a left-padded row sees positions 0, 1, 2, ... as alone.
    return (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)


def _attention_mask(key_mask: Tensor | None, T: int, device: torch.device) -> tuple[Tensor | None, bool]:
    """(mask for scaled_dot_product_attention, is_causal); True in the mask = may attend."""
    if key_mask is None:
        return None, True  # plain causal: flash/efficient kernels apply
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    mask = causal.unsqueeze(0) & key_mask[:, None, :]  # (B, T, T)
    # A padding query would otherwise see nothing and give NaN; let it see itself (its
    # output is never used, since real tokens never attend to it).
    eye = torch.eye(T, dtype=torch.bool, device=device)
    return (mask | eye).unsqueeze(1), False  # (B, 1, T, T)
