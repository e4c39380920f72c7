"""Hugging Face model directories load exactly, save loadably, and bad files fail clearly."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import hf_model, save_state_dir, tiny_model
from gpt2kit import GPT2, GPT2Config, Tokenizer
from gpt2kit.errors import CheckpointError, ConfigError, Gpt2kitError
from gpt2kit.model.checkpoint import load_tokenizer

IDS = torch.tensor([[5, 17, 3, 96, 40, 2, 2, 71], [0, 0, 0, 9, 8, 7, 6, 5]])
MASK = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """(transformers model, its save_pretrained directory, its logits on IDS/MASK)."""
    path = tmp_path_factory.mktemp("hf")
    model = hf_model(seed=21)
    model.save_pretrained(path)
    position_ids = (MASK.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(IDS, attention_mask=MASK, position_ids=position_ids).logits
    return model, path, logits


def assert_same_logits(model: GPT2, want: torch.Tensor) -> None:
    with torch.no_grad():
        got = model(IDS, attention_mask=MASK).logits
    real = MASK.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("prefix", [True, False], ids=["prefixed", "bare"])
@pytest.mark.parametrize("lm_head", [True, False], ids=["lm_head", "tied"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_checkpoint_variants_load(reference, tmp_path: Path, prefix: bool, lm_head: bool, fmt: str) -> None:
    model, path, want = reference
    raw = hf_state(path)
    assert all(k.startswith("transformer.") for k in raw), "transformers saves with the prefix"
    state = {(k if prefix else k.removeprefix("transformer.")): v for k, v in raw.items()}
    if lm_head:
        state["lm_head.weight"] = raw["transformer.wte.weight"].clone()
    if fmt == "bin":
        # Old pickled checkpoints also carry the causal mask buffers; they must be ignored.
        n = model.config.n_positions
        for i in range(model.config.n_layer):
            p = "transformer." if prefix else ""
            state[f"{p}h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
            state[f"{p}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    config = json.loads((path / "config.json").read_text())
    d = save_state_dir(tmp_path / "m", config, state, bin=fmt == "bin")
    assert_same_logits(GPT2.from_pretrained(d), want)


def test_loads_with_dtype(reference) -> None:
    _, path, want = reference
    model = GPT2.from_pretrained(path, dtype=torch.float64)
    assert model.wte.weight.dtype == torch.float64
    assert not model.training
    with torch.no_grad():
        got = model(IDS, attention_mask=MASK).logits.float()
    torch.testing.assert_close(got[MASK.bool()], want[MASK.bool()], atol=1e-4, rtol=0)


def test_differing_lm_head_is_reported(reference, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, path, want = reference
    state = hf_state(path)
    state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])
    d = save_state_dir(tmp_path / "m", json.loads((path / "config.json").read_text()), state, bin=False)
    with caplog.at_level(logging.WARNING, logger="gpt2kit"):
        model = GPT2.from_pretrained(d)
    assert "lm_head.weight differs from wte.weight" in caplog.text
    assert_same_logits(model, want)  # GPT-2 ties them: wte wins


def test_save_pretrained_loads_in_transformers(tiny_hf_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = GPT2.from_pretrained(tiny_hf_dir)
    ours.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "generation_config.json"} <= names
    assert not any(n.endswith(".tmp") for n in names), "atomic writes leave no temporary files"

    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world, naïve 🙂 <|endoftext|> again"
    assert tok.encode(text) == Tokenizer.gpt2().encode(text, allowed_special="all")
    assert tok.model_max_length == 128
    assert load_tokenizer(tmp_path).encode("Hello world") == [15496, 995]
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 50256


def test_round_trip_is_exact(tmp_path: Path) -> None:
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    again = GPT2.from_pretrained(tmp_path)
    assert again.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_small_vocabulary_saves_its_own_tokenizer(tmp_path: Path) -> None:
    from conftest import bytes_vocab

    vocab, merges = bytes_vocab([("a", "b")])
    tok = Tokenizer(vocab, merges)
    model = tiny_model(vocab_size=tok.n_vocab, eos_token_id=tok.eot_token, bos_token_id=tok.eot_token)
    model.save_pretrained(tmp_path, tokenizer=tok)
    assert load_tokenizer(tmp_path).encode("abab") == tok.encode("abab")
    with pytest.raises(ConfigError, match="vocab_size"):
        tiny_model().save_pretrained(tmp_path / "bad", tokenizer=tok)
    # Without tokenizer files, only GPT-2's vocabulary size implies GPT-2's tokenizer.
    tiny_model().save_pretrained(tmp_path / "none")
    with pytest.raises(CheckpointError, match=r"no vocab\.json"):
        load_tokenizer(tmp_path / "none")


def test_padded_vocabulary_round_trips(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model(seed=4, padded_vocab_size=128)
    model.save_pretrained(tmp_path)
    assert load_file(tmp_path / "model.safetensors")["transformer.wte.weight"].shape == (97, 32)
    again = GPT2.from_pretrained(tmp_path)
    assert again.config.padded_vocab_size == 128 and again.wte.weight.shape == (128, 32)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(again(ids).logits, want)
        ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(ref(ids).logits, want, atol=1e-4, rtol=0)


def test_sinusoidal_positions_round_trip_and_load_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model(seed=5, position_embedding="sinusoidal")
    model.save_pretrained(tmp_path)
    again = GPT2.from_pretrained(tmp_path)
    assert again.config.position_embedding == "sinusoidal"
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(again(ids).logits, want)
        ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(ref(ids).logits, want, atol=1e-4, rtol=0)


# --- bad files: one-line errors that name the file ------------------------------------------


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_one_line(e: pytest.ExceptionInfo, *names: str) -> None:
    message = str(e.value)
    assert isinstance(e.value, Gpt2kitError)
    assert "\n" not in message, message
    for name in names:
        assert name in message, message


def test_wrong_shapes(reference, tmp_path: Path) -> None:
    _, path, _ = reference
    d = copy_dir(path, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["n_embd"] = 64
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="wrong shape") as e:
        GPT2.from_pretrained(d)
    assert_one_line(e, str(d / "model.safetensors"), "wte.weight (97, 32) (expected (97, 64))")


def test_missing_and_unexpected_keys(reference, tmp_path: Path) -> None:
    _, path, _ = reference
    state = hf_state(path)
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.7.attn.c_attn.weight"] = torch.zeros(1)
    config = json.loads((path / "config.json").read_text())
    d = save_state_dir(tmp_path / "m", config, state, bin=False)
    with pytest.raises(CheckpointError) as e:
        GPT2.from_pretrained(d)
    assert_one_line(e, "missing 1: h.1.mlp.c_fc.bias", "unexpected 1: h.7.attn.c_attn.weight")


def test_truncated_safetensors(reference, tmp_path: Path) -> None:
    _, path, _ = reference
    d = copy_dir(path, tmp_path / "m")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    for cut in (len(data) // 2, 20, 3):
        weights.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated") as e:
            GPT2.from_pretrained(d)
        assert_one_line(e, str(weights))


def test_missing_config(reference, tmp_path: Path) -> None:
    _, path, _ = reference
    d = copy_dir(path, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json not found") as e:
        GPT2.from_pretrained(d)
    assert_one_line(e, str(d / "config.json"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{broken", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"model_type": "llama"}', "only 'gpt2' is supported"),
        ('{"n_embd": 30, "n_head": 4}', "must be divisible by n_head"),
        ('{"n_layer": "two"}', "n_layer must be a positive integer"),
        ('{"activation_function": "relu"}', "not supported"),
        ('{"unknown_key": 1, "n_positions": -3}', "n_positions must be a positive integer"),
    ],
)
def test_bad_config(reference, tmp_path: Path, content: str, message: str) -> None:
    _, path, _ = reference
    d = copy_dir(path, tmp_path / "m")
    (d / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=message) as e:
        GPT2.from_pretrained(d)
    assert_one_line(e, str(d / "config.json"))


def test_config_with_nulls_uses_defaults(reference, tmp_path: Path) -> None:
    # Some published config.json files have null for fields transformers gives defaults.
    _, path, want = reference
    d = copy_dir(path, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config.update(bos_token_id=None, eos_token_id=None, n_inner=None, layer_norm_epsilon=None)
    (d / "config.json").write_text(json.dumps(config))
    model = GPT2.from_pretrained(d)
    assert model.config.eos_token_id == GPT2Config().eos_token_id
    assert model.config.layer_norm_epsilon == 1e-5
    assert_same_logits(model, want)


def test_no_weights_file(reference, tmp_path: Path) -> None:
    _, path, _ = reference
    d = copy_dir(path, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or pytorch_model\.bin") as e:
        GPT2.from_pretrained(d)
    assert_one_line(e, str(d))


class Payload:
    """Unpickling this would run `os.system` (the classic malicious checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class NotWeights:
    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("kind", ["os.system", "instance", "instance-in-dict"])
def test_unsafe_pickle_is_refused(reference, tmp_path: Path, kind: str) -> None:
    _, path, _ = reference
    marker = tmp_path / "pwned"
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(path / "config.json", d / "config.json")
    obj = {
        "os.system": {"wte.weight": Payload(marker)},
        "instance": NotWeights(),
        "instance-in-dict": {**hf_state(path), "extra": NotWeights()},
    }[kind]
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump(obj, f)
    # torch.save's zip format too: it must be refused either way.
    with pytest.raises(CheckpointError, match=r"(refusing to unpickle|unreadable weights file)") as e:
        GPT2.from_pretrained(d)
    assert_one_line(e, str(d / "pytorch_model.bin"))
    torch.save(obj, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle") as e:
        GPT2.from_pretrained(d)
    assert_one_line(e, str(d / "pytorch_model.bin"))
    assert not marker.exists(), "the payload must never run"


def test_pickle_of_a_list_of_tensors(reference, tmp_path: Path) -> None:
    _, path, _ = reference
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(path / "config.json", d / "config.json")
    torch.save([torch.zeros(2)], d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="expected a dict of tensors") as e:
        GPT2.from_pretrained(d)
    assert_one_line(e, str(d / "pytorch_model.bin"))


def test_path_errors(reference, tmp_path: Path) -> None:
    _, path, _ = reference
    with pytest.raises(CheckpointError, match="found a file") as e:
        GPT2.from_pretrained(path / "config.json")
    assert_one_line(e)
    for missing in (tmp_path / "nope", "./nope", "a/b/c"):
        with pytest.raises(CheckpointError, match="no such model directory") as e:
            GPT2.from_pretrained(str(missing))
        assert_one_line(e)


# --- the hub code path, against a local cache (this machine can't reach the hub) ------------


def offline_hub(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """Point huggingface_hub at an empty cache under `home`, offline."""
    from huggingface_hub import constants

    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variables at import time.
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_loads_from_the_cache(
    reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_hf_dir: Path
) -> None:
    _, path, want = reference
    cache = offline_hub(monkeypatch, tmp_path / "hf")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--some-org--tiny-gpt2"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(path, snapshot)
    shutil.copy(tiny_hf_dir / "vocab.json", snapshot / "vocab.json")
    shutil.copy(tiny_hf_dir / "merges.txt", snapshot / "merges.txt")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.chdir(tmp_path)  # so "some-org/tiny-gpt2" isn't a local directory by accident

    model = GPT2.from_pretrained("some-org/tiny-gpt2")
    assert_same_logits(model, want)
    assert load_tokenizer("some-org/tiny-gpt2").encode("Hello world") == [15496, 995]


def test_unknown_hub_id_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_hub(monkeypatch, tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    for name in ("some-org/not-there", "gpt2"):
        with pytest.raises(CheckpointError, match="can't be downloaded") as e:
            GPT2.from_pretrained(name)
        assert_one_line(e, name)
