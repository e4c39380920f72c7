"""GGUF export and import: the file llama.cpp reads, checked with the `gguf` package's reader.

Tiny models only: a BPE trained here (the kind `gpt2kit prepare` makes) and GPT-2's own
vocabulary on a one-layer model. The checks against the real llama.cpp are slow tests in
tests/model/test_gguf_llama.py.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from conftest import tiny_model
from gpt2kit import GPT2, Tokenizer
from gpt2kit.errors import CheckpointError, ConfigError, TokenizerError
from gpt2kit.model import gguf_file
from gpt2kit.model.checkpoint import load_tokenizer
from gpt2kit.tokenizer import gguf_vocab
from gpt2kit.tokenizer.bpe import train_bpe
from gpt2kit.tokenizer.gguf_reader import read_header

TYPES = ["f32", "f16", "bf16", "q8_0"]
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
# Max |logit difference| after a round trip, as a fraction of the logits' std (about 0.5 here).
# Measured on this model: f16 0.2%, bf16 2.1%, q8_0 4.8% (its head, the tied wte, is q8_0 too).
BOUNDS = {"f32": 0.0, "f16": 0.01, "bf16": 0.05, "q8_0": 0.10}
F32 = gguf.GGMLQuantizationType.F32


def randomize(model: GPT2, seed: int) -> GPT2:
    """Every parameter random, biases and norms too: a bias or norm mapped wrongly must show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(
                1.0 + 0.1 * noise
                if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
                else 0.1 * noise
            )
    return model


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe([TEXT] * 30 + ["Hamlet, Ophelia, Polonius and the ghost"] * 20, vocab_size=300)


@pytest.fixture(scope="module")
def model(bpe: Tokenizer) -> GPT2:
    eot = bpe.eot_token
    return randomize(tiny_model(vocab_size=bpe.n_vocab, bos_token_id=eot, eos_token_id=eot), seed=3)


@pytest.fixture(scope="module")
def files(model: GPT2, bpe: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gguf")
    for type in TYPES:
        model.save_gguf(out / f"tiny-{type}.gguf", type=type, tokenizer=bpe)
    return {type: out / f"tiny-{type}.gguf" for type in TYPES}


def fields(path) -> tuple[gguf.GGUFReader, dict]:
    reader = gguf.GGUFReader(path)
    return reader, {name: f.contents() for name, f in reader.fields.items()}


@pytest.mark.parametrize("type", TYPES)
def test_metadata_is_llama_cpps_gpt2(files, model: GPT2, type: str) -> None:
    _, meta = fields(files[type])
    c = model.config
    assert meta["general.architecture"] == "gpt2"
    assert meta["general.type"] == "model"
    assert meta["general.name"] == f"tiny-{type}"
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[type]
    assert meta["general.quantization_version"] == 2
    assert meta["gpt2.context_length"] == c.n_positions == 64
    assert meta["gpt2.embedding_length"] == c.n_embd
    assert meta["gpt2.feed_forward_length"] == 4 * c.n_embd
    assert meta["gpt2.block_count"] == c.n_layer
    assert meta["gpt2.attention.head_count"] == c.n_head
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)


def test_tokenizer_keys_are_the_vocabulary(files, bpe: Tokenizer) -> None:
    _, meta = fields(files["f32"])
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    by_id = {i: t for t, i in bpe.vocab.items()}
    assert meta["tokenizer.ggml.tokens"] == [by_id[i] for i in range(bpe.n_vocab)]
    types = meta["tokenizer.ggml.token_type"]
    assert types[bpe.eot_token] == gguf.TokenType.CONTROL
    assert sum(t == gguf.TokenType.NORMAL for t in types) == bpe.n_vocab - 1
    assert meta["tokenizer.ggml.merges"] == [f"{a} {b}" for a, b in bpe.merges]
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == bpe.eot_token
    assert meta["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize("type", TYPES)
def test_tensors_names_shapes_and_types(files, model: GPT2, type: str) -> None:
    reader, _ = fields(files[type])
    c = model.config
    C, V, L = c.n_embd, c.vocab_size, c.n_layer
    want = {  # GGUF shapes list the innermost dimension first
        "token_embd.weight": (C, V),
        "position_embd.weight": (C, c.n_positions),
        "output_norm.weight": (C,),
        "output_norm.bias": (C,),
    }
    for i in range(L):
        want |= {
            f"blk.{i}.attn_norm.weight": (C,),
            f"blk.{i}.attn_norm.bias": (C,),
            f"blk.{i}.attn_qkv.weight": (C, 3 * C),
            f"blk.{i}.attn_qkv.bias": (3 * C,),
            f"blk.{i}.attn_output.weight": (C, C),
            f"blk.{i}.attn_output.bias": (C,),
            f"blk.{i}.ffn_norm.weight": (C,),
            f"blk.{i}.ffn_norm.bias": (C,),
            f"blk.{i}.ffn_up.weight": (C, 4 * C),
            f"blk.{i}.ffn_up.bias": (4 * C,),
            f"blk.{i}.ffn_down.weight": (4 * C, C),
            f"blk.{i}.ffn_down.bias": (C,),
        }
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)  # no output.weight: the head is tied to token_embd
    assert {n: tuple(int(d) for d in t.shape) for n, t in got.items()} == want
    big = gguf.GGMLQuantizationType[type.upper()]
    for name, t in got.items():
        f32 = len(want[name]) == 1 or name == "position_embd.weight"  # as llama.cpp's converter
        assert t.tensor_type == (F32 if f32 else big), name


@pytest.mark.parametrize("type", TYPES)
def test_our_header_reader_agrees_with_ggufs(files, type: str) -> None:
    """gpt2kit reads headers with its own parser (GGUFReader takes 10-35 s on GPT-2's vocabulary)."""
    reader, meta = fields(files[type])
    header = read_header(files[type])
    theirs = {k: v for k, v in meta.items() if not k.startswith("GGUF.")}
    assert header.metadata.keys() == theirs.keys()
    for key, value in theirs.items():
        assert header.metadata[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert [(t.name, t.shape, t.type) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in reader.tensors
    ]
    assert [t.offset for t in header.tensors] == [int(t.data_offset) for t in reader.tensors]


def test_token_types_are_ggufs() -> None:
    assert (gguf_vocab.NORMAL, gguf_vocab.CONTROL, gguf_vocab.UNUSED) == (
        gguf.TokenType.NORMAL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.UNUSED,
    )


def test_names_are_ggufs_own_for_gpt2() -> None:
    """Our name table agrees with the gguf package's tensor map for the gpt2 architecture."""
    mapping = gguf.TensorNameMap(gguf.MODEL_ARCH.GPT2, 3)
    for ours, theirs in gguf_file.NAMES.items():
        base, suffix = ours.format(i=2).rsplit(".", 1)
        assert mapping.get_name(base) + "." + suffix == theirs.format(i=2), ours


def test_q8_0_is_llama_cpps_block_layout(files, model: GPT2) -> None:
    """Decoded by hand: blocks of 34 bytes, an fp16 scale then 32 int8s; scale = max|w| / 127."""
    reader, _ = fields(files["q8_0"])
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    raw = np.asarray(tensor.data).reshape(-1, 34)
    scale = raw[:, :2].copy().view(np.float16).astype(np.float32)  # (blocks, 1)
    q = raw[:, 2:].copy().view(np.int8).astype(np.float32)  # (blocks, 32)
    w = model.h[1].mlp.c_fc.weight.detach().numpy().reshape(-1, 32)  # [out, in] rows, in blocks of 32
    np.testing.assert_allclose(scale[:, 0], np.abs(w).max(1) / 127, rtol=1e-3)
    assert np.abs(q).max() == 127
    decoded = q * scale
    # Rounding to the nearest step (half a scale), plus the scale's own fp16 rounding (q was
    # computed with the float32 scale): 127 * 2**-11 of a scale at most.
    assert np.all(np.abs(decoded - w) <= scale * (0.5 + 127 * 2**-11) + 1e-7)
    np.testing.assert_array_equal(decoded.ravel(), gguf.quants.dequantize(raw, tensor.tensor_type).ravel())


@pytest.mark.parametrize("type", TYPES)
def test_round_trip_logits(files, model: GPT2, bpe: Tokenizer, type: str) -> None:
    ids = torch.tensor([bpe.encode(TEXT)[:40]])
    loaded = GPT2.from_pretrained(files[type])
    assert loaded.wte.weight.dtype == {"f16": torch.float16, "bf16": torch.bfloat16}.get(type, torch.float32)
    assert loaded.config.vocab_size == model.config.vocab_size
    with torch.no_grad():
        want = model(ids).logits
        got = loaded.float()(ids).logits
    diff = (got - want).abs().max().item()
    assert diff <= BOUNDS[type] * want.std().item(), diff
    if type == "f32":
        assert torch.equal(got, want)


def test_tokenizer_round_trip(files, bpe: Tokenizer) -> None:
    tok = load_tokenizer(files["q8_0"])
    assert tok.vocab == bpe.vocab and tok.merges == bpe.merges
    assert tok.encode(TEXT) == bpe.encode(TEXT)
    assert tok.eot_token == bpe.eot_token


@pytest.fixture(scope="module")
def gpt2_vocab_file(tmp_path_factory: pytest.TempPathFactory):
    model = randomize(tiny_model(vocab_size=50257, n_layer=1, bos_token_id=50256, eos_token_id=50256), 5)
    path = tmp_path_factory.mktemp("gguf-gpt2") / "gpt2-vocab.gguf"
    model.save_gguf(path, type="q8_0")  # no tokenizer: GPT-2's, for GPT-2's vocabulary size
    return model, path


def test_gpt2_vocabulary(gpt2_vocab_file) -> None:
    model, path = gpt2_vocab_file
    meta = read_header(path).metadata  # GGUFReader: the same (test above), but 10-35 s here
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 50257 and tokens[15496] == "Hello" and tokens[995] == "Ġworld"
    assert tokens[50256] == "<|endoftext|>"
    assert meta["tokenizer.ggml.token_type"][50256] == gguf.TokenType.CONTROL
    merges = meta["tokenizer.ggml.merges"]
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    tok = load_tokenizer(path)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]
    reference = Tokenizer.gpt2()
    assert tok.encode(TEXT) == reference.encode(TEXT)
    ids = torch.tensor([reference.encode(TEXT)])
    with torch.no_grad():
        want = model(ids).logits
        got = GPT2.from_pretrained(path)(ids).logits
    assert (got - want).abs().max() <= BOUNDS["q8_0"] * want.std()


@pytest.mark.parametrize(
    "overrides",
    [dict(padded_vocab_size=320), dict(position_embedding="sinusoidal"), dict(n_inner=48)],
    ids=["padded", "sinusoidal", "n_inner"],
)
def test_model_options_round_trip_exactly(bpe: Tokenizer, tmp_path, overrides) -> None:
    eot = bpe.eot_token
    model = randomize(tiny_model(vocab_size=bpe.n_vocab, bos_token_id=eot, eos_token_id=eot, **overrides), 7)
    model.save_gguf(tmp_path / "m.gguf", tokenizer=bpe)
    loaded = GPT2.from_pretrained(tmp_path / "m.gguf")
    ids = torch.tensor([bpe.encode(TEXT)[:30]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.config.inner_size == model.config.inner_size


# --- bad input ------------------------------------------------------------------------------


def test_bad_type_and_tokenizer(model: GPT2, bpe: Tokenizer, tmp_path) -> None:
    with pytest.raises(ConfigError, match="'q4_0' is not supported; use one of f32, f16, bf16, q8_0"):
        model.save_gguf(tmp_path / "m.gguf", type="q4_0", tokenizer=bpe)
    with pytest.raises(ConfigError, match="not GPT-2's; pass tokenizer="):
        model.save_gguf(tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match="the tokenizer has 50257 tokens but the model's vocab_size is"):
        model.save_gguf(tmp_path / "m.gguf", tokenizer=Tokenizer.gpt2())
    assert list(tmp_path.iterdir()) == []


def write_other_arch(path, arch: str = "llama") -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_bad_files_are_one_line_errors(files, tmp_path) -> None:
    write_other_arch(tmp_path / "llama.gguf")
    with pytest.raises(CheckpointError, match="architecture 'llama'; gpt2kit reads only GPT-2") as e:
        GPT2.from_pretrained(tmp_path / "llama.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file") as e2:
        GPT2.from_pretrained(tmp_path / "junk.gguf")
    cut = tmp_path / "cut.gguf"
    data_start = min(t.offset for t in read_header(files["f32"]).tensors)
    cut.write_bytes(files["f32"].read_bytes()[: data_start + 100])  # the header whole, tensors cut off
    with pytest.raises(CheckpointError, match="runs past the end of the file; it is truncated"):
        GPT2.from_pretrained(cut)
    cut.write_bytes(files["f32"].read_bytes()[: data_start // 2])  # cut inside the header
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        GPT2.from_pretrained(cut)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        GPT2.from_pretrained(tmp_path / "missing.gguf")
    with pytest.raises(TokenizerError, match="architecture 'llama'; gpt2kit reads only GPT-2"):
        load_tokenizer(tmp_path / "llama.gguf")
    write_other_arch(tmp_path / "no-vocab.gguf", "gpt2")
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path / "no-vocab.gguf")
    for err in (e, e2):
        assert "\n" not in str(err.value)


def test_a_failed_write_leaves_no_file(model: GPT2, bpe: Tokenizer, tmp_path, monkeypatch) -> None:
    """The disk filling up mid-write: no partial file, and the previous export stays whole."""
    target = tmp_path / "m.gguf"
    model.save_gguf(target, type="f16", tokenizer=bpe)
    before = target.read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save_gguf(target, type="f32", tokenizer=bpe)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert target.read_bytes() == before
