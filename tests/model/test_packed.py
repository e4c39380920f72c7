"""Packed weights (gpt2kit.model.packed): the same bits as F.linear, and only where they apply."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gpt2kit import GPT2, GPT2Config
from gpt2kit.device import CPU_LEVELS
from gpt2kit.errors import ConfigError
from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.engine import Engine
from gpt2kit.model.gpt2 import use_decode_layout
from gpt2kit.model.packed import PackedWeights
from gpt2kit.model.quantize import quantize_int8

CONFIG = GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=1000, n_positions=128)


def bf16_model() -> GPT2:
    torch.manual_seed(0)
    model = GPT2(CONFIG).to(torch.bfloat16).eval()
    use_decode_layout(model)  # what the engine gives it, before it packs
    return model


def packed_or_skip(model: GPT2) -> PackedWeights:
    packed, why = PackedWeights.of(model)
    if packed is None:
        assert "CPU" in why, why  # the one reason a bfloat16 CPU model isn't packed
        pytest.skip(why)
    return packed


def int8(model: GPT2) -> GPT2:
    quantize_int8(model, scheme="int8-weight-only")
    return model


def caches(rows: int, dtype: torch.dtype = torch.bfloat16) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shape = (rows, CONFIG.n_head, CONFIG.n_positions, CONFIG.head_size)
    k = [torch.zeros(shape, dtype=dtype) for _ in range(CONFIG.n_layer)]
    return k, [torch.zeros_like(t) for t in k]


@torch.inference_mode()
def test_prefill_and_decode_are_the_same_bits_packed_or_not():
    model = bf16_model()
    packed = packed_or_skip(model)
    g = torch.Generator().manual_seed(1)
    for T in (1, 2, 7, 16, 33, 100):
        ids = torch.randint(0, CONFIG.vocab_size, (1, T), generator=g)
        results = []
        for use in (False, True):
            k, v = caches(1)
            with packed.active() if use else torch.no_grad():
                h = model.prefill(ids, k, v)
                results.append((h, model.logits(h[:, -1]), k, v))
        (h0, l0, k0, v0), (h1, l1, k1, v1) = results
        assert torch.equal(h0, h1) and torch.equal(l0, l1), f"prefill of {T} tokens"
        assert all(torch.equal(a, b) for a, b in zip(k0 + v0, k1 + v1, strict=True)), f"cache of {T} tokens"
    for rows in range(1, 9):  # every row count an eager decode step runs
        idx = torch.randint(0, CONFIG.vocab_size, (rows, 1), generator=g)
        pos = torch.arange(3, 3 + rows)
        out = []
        for use in (False, True):
            k, v = caches(rows)
            with packed.active() if use else torch.no_grad():
                out.append(model.decode_step(idx, pos, k, v))
        assert torch.equal(out[0], out[1]), f"decode step of {rows} rows"


def test_active_puts_the_model_back_even_after_an_error():
    model = bf16_model()
    packed = packed_or_skip(model)
    with pytest.raises(RuntimeError, match="inside"), packed.active():
        assert "forward" in model.h[0].attn.c_attn.__dict__ and "logits" in model.__dict__
        raise RuntimeError("inside")
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert "logits" not in model.__dict__


def test_weights_changed_after_packing_are_refused():
    model = bf16_model()
    packed = packed_or_skip(model)
    with torch.no_grad():
        model.h[1].mlp.c_fc.weight.add_(1)
    with pytest.raises(ConfigError, match="weights changed after they were packed"), packed.active():
        pass


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: GPT2(CONFIG).eval(), "packing is for bfloat16 weights, these are float32"),
        (lambda: int8(GPT2(CONFIG).to(torch.bfloat16)), "quantized"),
    ],
    ids=["float32", "int8"],
)
def test_not_packed_where_it_would_change_bits_or_does_not_apply(make, reason):
    packed, why = PackedWeights.of(make())
    assert packed is None
    assert reason in why


def test_an_engine_makes_the_same_tokens_packed_or_not():
    model = bf16_model()
    packed_or_skip(model)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 9, 3)]
    tokens = {}
    for packed in (False, True):
        engine = Engine(model, slots=4, eos_token_id=None, packed=packed)
        assert (engine.packed is not None) == packed
        rows = [
            engine.add(p, SamplingConfig(max_new_tokens=12, temperature=0.9 if i % 2 else 0.0), seed=i)
            for i, p in enumerate(prompts)
        ]
        while engine.busy:
            engine.step()
        tokens[packed] = [r.tokens for r in rows]
    assert tokens[True] == tokens[False]
    assert all(len(t) == 12 for t in tokens[True])


def test_at_the_avx2_level_it_is_not_packed_and_says_why():
    """oneDNN packs bfloat16 from AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT up: capped at AVX2 it
    refuses, and the engine runs unpacked."""
    code = (
        "import torch\n"
        "from gpt2kit import GPT2, GPT2Config\n"
        "from gpt2kit.generation.config import SamplingConfig\n"
        "from gpt2kit.generation.engine import Engine\n"
        "from gpt2kit.model.packed import PackedWeights\n"
        "m = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=64, vocab_size=100, n_positions=32)).to(torch.bfloat16)\n"
        "packed, why = PackedWeights.of(m)\n"
        "print(packed is None, why)\n"
        "e = Engine(m, slots=2, eos_token_id=None, packed=True)\n"
        "r = e.add([1, 2, 3], SamplingConfig(max_new_tokens=4))\n"
        "while e.busy: e.step()\n"
        "print(len(r.tokens))\n"
    )
    env = os.environ | CPU_LEVELS["avx2"]
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()[-2:]
    if first.startswith("False"):
        pytest.skip("this CPU's oneDNN packs bfloat16 at the avx2 level (AVX-NE-CONVERT)")
    assert first.startswith("True not packed: oneDNN can't pack bfloat16 weights on this CPU"), first
    assert second == "4"


# --- prompts prefilled together (GPT2.prefill(..., lengths), the engine's groups) ----------


@torch.inference_mode()
def test_prompts_prefilled_together_attend_to_themselves_alone():
    """float32, unpacked: the same values as each prompt alone to float rounding (a prompt
    that saw another's tokens would be off by far more), at its own positions."""
    torch.manual_seed(0)
    model = GPT2(CONFIG).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, CONFIG.vocab_size, (t,), generator=g) for t in (4, 1, 19, 9)]
    k, v = caches(len(prompts), torch.float32)
    together = model.prefill(torch.cat(prompts)[None], k, v, [len(p) for p in prompts])[0]
    for i, (p, h) in enumerate(zip(prompts, together.split([len(p) for p in prompts]), strict=True)):
        k1, v1 = caches(1, torch.float32)
        alone = model.prefill(p[None], k1, v1)[0]
        torch.testing.assert_close(h, alone, rtol=1e-5, atol=1e-5)
        for a, b in zip(k + v, k1 + v1, strict=True):
            torch.testing.assert_close(a[i : i + 1], b, rtol=1e-5, atol=1e-5)


def test_prefill_refuses_lengths_that_do_not_fit():
    model = GPT2(CONFIG).eval()
    k, v = caches(2, torch.float32)
    with pytest.raises(ValueError, match="don't fit"):
        model.prefill(torch.zeros(1, 5, dtype=torch.long), k, v, [2, 2])
    with pytest.raises(ValueError, match="don't fit"):
        model.prefill(torch.zeros(1, 3, dtype=torch.long), k, v, [1, 1, 1])  # 3 prompts, 2 rows


@torch.inference_mode()
def test_prompts_prefilled_together_are_the_same_bits_as_alone_when_packed():
    model = bf16_model()
    packed = packed_or_skip(model)
    g = torch.Generator().manual_seed(4)
    for _ in range(6):
        lengths = torch.randint(1, 60, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        prompts = [torch.randint(0, CONFIG.vocab_size, (t,), generator=g) for t in lengths]
        k, v = caches(len(prompts))
        with packed.active():
            together = model.prefill(torch.cat(prompts)[None], k, v, lengths)[0]
            for i, (p, h) in enumerate(zip(prompts, together.split(lengths), strict=True)):
                k1, v1 = caches(1)
                alone = model.prefill(p[None], k1, v1)[0]
                assert torch.equal(h, alone), f"prompt {i} of {lengths}"
                assert all(torch.equal(a[i : i + 1], b) for a, b in zip(k + v, k1 + v1, strict=True))


def test_the_engine_prefills_together_only_where_its_check_passes(monkeypatch, caplog):
    model = bf16_model()
    packed_or_skip(model)
    with caplog.at_level("INFO", logger="gpt2kit.generation.engine"):
        assert Engine(model, slots=4, eos_token_id=None, packed=True).cache.together
    assert "prefilled together (checked" in caplog.text
    assert not Engine(model, slots=4, eos_token_id=None, packed=False).cache.together
    assert not Engine(model, slots=8, eos_token_id=None, packed=True, deterministic=True).cache.together
    assert not Engine(model, slots=1, eos_token_id=None, packed=True).cache.together

    # Kernels whose result for a row depended on the rows beside it: one prompt off by one ulp.
    real = GPT2.prefill

    def row_dependent(self, idx, k_cache, v_cache, lengths=None):
        h = real(self, idx, k_cache, v_cache, lengths)
        return h if lengths is None else h.index_add(1, torch.tensor([0]), torch.ones_like(h[:, :1]) * 1e-2)

    monkeypatch.setattr(GPT2, "prefill", row_dependent)
    caplog.clear()
    with caplog.at_level("INFO", logger="gpt2kit.generation.engine"):
        assert not Engine(model, slots=4, eos_token_id=None, packed=True).cache.together
    assert "each prompt alone" in caplog.text


def test_a_group_holds_at_most_the_free_slots_and_prefill_tokens(monkeypatch):
    from gpt2kit.generation import engine as engine_module

    model = bf16_model()
    packed_or_skip(model)
    engine = Engine(model, slots=4, eos_token_id=None, packed=True)
    groups: list[list[int]] = []
    real = engine.cache.prefill

    def recording(first, prompts):
        groups.append([len(p) for p in prompts])
        return real(first, prompts)

    monkeypatch.setattr(engine.cache, "prefill", recording)
    monkeypatch.setattr(engine_module, "PREFILL_TOKENS", 50)
    for t in (20, 20, 20, 5, 5, 5):
        engine.add(list(range(1, t + 1)), SamplingConfig(max_new_tokens=2))
    engine.step()
    assert groups == [[20, 20], [20, 5]]  # 50 tokens at most, then the 4 slots are full
    while engine.busy:
        engine.step()
    assert groups[2:] == [[5, 5]]
