"""GGUF files, llama.cpp's model format: write a GPT-2 as llama.cpp's `gpt2` architecture, read one back.

The layout is the one llama.cpp's own `convert_hf_to_gguf.py` writes for GPT-2 (its
`GPT2Model`): the tensor names of `NAMES`, weights in `nn.Linear`'s [out, in] order (GGUF
lists dimensions innermost first, so the file says {in, out}), no `output.weight` (the head
is tied to `token_embd`), and `gpt2.*` hyper-parameters. Which tensors keep float32 follows
the converter too: every 1-D tensor (biases, LayerNorm weights) and the position embedding;
the other matrices take the file's type. q8_0 is llama.cpp's block layout (32 weights, one
fp16 scale per block), quantized by the `gguf` package's bit-exact port of ggml's code.

>>> write(model, "gpt2-q8_0.gguf", type="q8_0", tokenizer=Tokenizer.gpt2())  # doctest: +SKIP
>>> config, state, tok = read("gpt2-q8_0.gguf")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from gpt2kit import atomic
from gpt2kit.errors import CheckpointError, ConfigError
from gpt2kit.model.checkpoint import TRANSPOSED, to_hf_state_dict
from gpt2kit.model.config import GPT2Config
from gpt2kit.tokenizer import gguf_vocab
from gpt2kit.tokenizer.gguf_reader import TensorInfo, read_header
from gpt2kit.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ARCH = "gpt2"
T = gguf.GGMLQuantizationType
# --type -> (the tensor type of the big matrices, general.file_type)
TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (T.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (T.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
READABLE = (T.F32, T.F16, T.BF16, T.Q8_0)
# Our parameter names (Hugging Face's, without "transformer.") -> llama.cpp's; {i} is the block.
NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "h.{i}.ln_1.weight": "blk.{i}.attn_norm.weight",
    "h.{i}.ln_1.bias": "blk.{i}.attn_norm.bias",
    "h.{i}.attn.c_attn.weight": "blk.{i}.attn_qkv.weight",
    "h.{i}.attn.c_attn.bias": "blk.{i}.attn_qkv.bias",
    "h.{i}.attn.c_proj.weight": "blk.{i}.attn_output.weight",
    "h.{i}.attn.c_proj.bias": "blk.{i}.attn_output.bias",
    "h.{i}.ln_2.weight": "blk.{i}.ffn_norm.weight",
    "h.{i}.ln_2.bias": "blk.{i}.ffn_norm.bias",
    "h.{i}.mlp.c_fc.weight": "blk.{i}.ffn_up.weight",
    "h.{i}.mlp.c_fc.bias": "blk.{i}.ffn_up.bias",
    "h.{i}.mlp.c_proj.weight": "blk.{i}.ffn_down.weight",
    "h.{i}.mlp.c_proj.bias": "blk.{i}.ffn_down.bias",
}
TIED_HEAD = "output.weight"  # written by other converters for untied models; GPT-2 ties it


def _to_gguf_name(name: str) -> str:
    block = re.match(r"h\.(\d+)\.", name)
    if block is None:
        return NAMES[name]
    return NAMES[name.replace(block.group(0), "h.{i}.", 1)].format(i=block.group(1))


def _from_gguf_names(n_layer: int) -> dict[str, str]:
    out = {}
    for ours, theirs in NAMES.items():
        for i in range(n_layer) if "{i}" in ours else [None]:
            out[theirs.format(i=i)] = ours.format(i=i)
    return out


def check_type(type: str) -> tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]:
    if type not in TYPES:
        raise ConfigError(f"GGUF type {type!r} is not supported; use one of {', '.join(TYPES)}")
    return TYPES[type]


# --- writing ------------------------------------------------------------------------------


def write(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    type: str = "f32",
    tokenizer: Tokenizer,
    name: str | None = None,
) -> None:
    """Write `model` and `tokenizer` as one GGUF file llama.cpp loads, atomically.

    `type`: "f32", "f16", "bf16" or "q8_0" for the weight matrices (see the module docstring).
    """
    qtype, ftype = check_type(type)
    config: GPT2Config = model.config
    if tokenizer.n_vocab != config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.n_vocab} tokens but the model's vocab_size is {config.vocab_size}; "
            "pass the tokenizer the model was trained with"
        )
    state = to_hf_state_dict(model)  # vocab padding cut, sinusoidal positions as a table
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        _add_header(writer, config, ftype, name or path.stem)
        _add_tokenizer(writer, tokenizer, config)
        for key, value in state.items():
            key = key.removeprefix("transformer.")
            if key.endswith(TRANSPOSED):  # back to nn.Linear's [out, in], as llama.cpp wants
                value = value.t()
            _add_tensor(writer, _to_gguf_name(key), value, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _add_header(writer: gguf.GGUFWriter, config: GPT2Config, ftype: gguf.LlamaFileType, name: str) -> None:
    if config.activation_function == "gelu":
        # llama.cpp's GPT-2 graph has only the tanh GELU; the exact erf one differs by < 1e-3.
        log.warning("activation 'gelu' (erf) is exported as llama.cpp's tanh GELU; outputs differ slightly")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.inner_size)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, config: GPT2Config) -> None:
    fields = gguf_vocab.to_fields(tokenizer)
    writer.add_tokenizer_model(gguf_vocab.MODEL)
    writer.add_tokenizer_pre(gguf_vocab.PRE)
    writer.add_token_list(fields.tokens)
    writer.add_token_types(fields.types)
    writer.add_token_merges(fields.merges)
    eot = tokenizer.special_tokens.get("<|endoftext|>")
    writer.add_bos_token_id(eot if eot is not None else config.bos_token_id)
    writer.add_eos_token_id(eot if eot is not None else config.eos_token_id)
    # GPT-2 prompts start with no BOS (unconditional samples start from <|endoftext|> by choice).
    writer.add_add_bos_token(False)


def _add_tensor(
    writer: gguf.GGUFWriter, name: str, value: torch.Tensor, qtype: gguf.GGMLQuantizationType
) -> None:
    data = value.detach().float().contiguous().numpy()
    # As llama.cpp's converter: 1-D tensors and the position table stay float32.
    if data.ndim <= 1 or name == "position_embd.weight":
        qtype = T.F32
    elif qtype == T.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
        log.warning("%s: rows of %d are not whole q8_0 blocks of 32; writing it as f16", name, data.shape[-1])
        qtype = T.F16
    writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


# --- reading ------------------------------------------------------------------------------


def read(path: str | os.PathLike[str]) -> tuple[GPT2Config, dict[str, torch.Tensor], Tokenizer]:
    """(config, state dict in Hugging Face's layout, tokenizer) of a GPT-2 GGUF file.

    The tensors come back in the dtype of the file's matrices: float16 or bfloat16 for f16 and
    bf16 files (their float32 biases and norms cast to it), float32 for f32 and q8_0 (dequantized).
    """
    header = read_header(path)
    config = config_from_metadata(header.metadata, source=str(path))
    names = _from_gguf_names(config.n_layer)
    unknown = [t.name for t in header.tensors if t.name not in names and t.name != TIED_HEAD]
    if unknown:
        raise CheckpointError(
            f"{path}: tensors a GPT-2 doesn't have: {', '.join(unknown[:6])}; is this a GPT-2 GGUF file?"
        )
    data = np.memmap(path, dtype=np.uint8, mode="r")
    state: dict[str, torch.Tensor] = {}
    for info in header.tensors:
        key = "lm_head.weight" if info.name == TIED_HEAD else names[info.name]
        value = _tensor(data, info, path)
        state[key] = value.t() if key.endswith(TRANSPOSED) else value
    # One dtype for the model: that of its matrices (float32 where they were q8_0).
    dtype = state["wte.weight"].dtype if "wte.weight" in state else torch.float32
    state = {k: v.to(dtype) for k, v in state.items()}
    return config, state, gguf_vocab.tokenizer_from_metadata(header.metadata, source=str(path))


def config_from_metadata(meta: dict, *, source: str) -> GPT2Config:
    """A GPT2Config from a GGUF file's `general.architecture` and `gpt2.*` keys."""
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(
            f"{source}: a GGUF file of architecture {arch!r}; gpt2kit reads only GPT-2 ({ARCH!r}) models"
        )
    keys = {
        "n_positions": f"{ARCH}.context_length",
        "n_embd": f"{ARCH}.embedding_length",
        "n_layer": f"{ARCH}.block_count",
        "n_head": f"{ARCH}.attention.head_count",
    }
    missing = [k for k in keys.values() if k not in meta]
    if missing:
        raise CheckpointError(
            f"{source}: the GGUF file lacks {', '.join(missing)}; it is damaged or incomplete"
        )
    sizes = {field: int(meta[key]) for field, key in keys.items()}
    inner = int(meta.get(f"{ARCH}.feed_forward_length", 4 * sizes["n_embd"]))
    tokens = meta.get(gguf_vocab.KEYS["tokens"]) or []
    eos = int(meta.get(gguf_vocab.KEYS["eos"], len(tokens) - 1))
    try:
        return GPT2Config(
            vocab_size=len(tokens),
            n_inner=None if inner == 4 * sizes["n_embd"] else inner,
            layer_norm_epsilon=float(meta.get(f"{ARCH}.attention.layer_norm_epsilon", 1e-5)),
            bos_token_id=int(meta.get(gguf_vocab.KEYS["bos"], eos)),
            eos_token_id=eos,
            **sizes,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _tensor(data: np.memmap, info: TensorInfo, path: str | os.PathLike[str]) -> torch.Tensor:
    """One tensor as torch, [rows, cols] (numpy's order: GGUF's dimensions reversed), copied
    out of the memory-mapped file."""
    if info.type not in READABLE:
        name = T(info.type).name if info.type in T._value2member_map_ else str(info.type)
        raise CheckpointError(
            f"{path}: tensor {info.name} is {name}; gpt2kit reads "
            f"{', '.join(t.name for t in READABLE)} (re-export it with one of those types)"
        )
    qtype = T(info.type)
    shape = tuple(reversed(info.shape))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nbytes = int(np.prod(shape)) // block * size
    if info.offset + nbytes > len(data) or shape[-1] % block:
        raise CheckpointError(f"{path}: tensor {info.name} runs past the end of the file; it is truncated")
    raw = data[info.offset : info.offset + nbytes]
    if qtype == T.F16:
        return torch.from_numpy(raw.view(np.float16).reshape(shape).copy())
    values = gguf.quants.dequantize(raw.reshape(-1, shape[-1] // block * size), qtype)
    out = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return out.to(torch.bfloat16) if qtype == T.BF16 else out  # bf16 -> f32 -> bf16 is exact
