"""The model computes what transformers' GPT-2 computes, with GPT-2's sizes and init."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import hf_model, tiny_config, tiny_model
from gpt2kit import GPT2, GPT2Config
from gpt2kit.model.gpt2 import sinusoidal_table

# Small members of the GPT-2 family: vary every dimension, activation and epsilon.
CONFIGS = [
    dict(n_layer=1, n_head=1, n_embd=16, n_positions=16, vocab_size=50),
    dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97),
    dict(n_layer=3, n_head=4, n_embd=64, n_positions=32, vocab_size=300, activation_function="gelu"),
    dict(n_layer=2, n_head=3, n_embd=48, n_positions=40, vocab_size=211, n_inner=100),
    dict(n_layer=4, n_head=8, n_embd=64, n_positions=128, vocab_size=128, layer_norm_epsilon=1e-3),
    dict(
        n_layer=2, n_head=2, n_embd=32, n_positions=20, vocab_size=64, activation_function="gelu_pytorch_tanh"
    ),
]


def padded_batch(vocab_size: int, n_positions: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of 4 rows: full length, and three left-padded ones (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    T = min(12, n_positions)
    ids = torch.randint(0, vocab_size, (4, T), generator=g)
    mask = torch.ones(4, T, dtype=torch.long)
    for row, pad in zip((1, 2, 3), (1, T // 2, T - 1), strict=True):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' logits, with the position ids a left-padded row needs (count real tokens)."""
    with torch.no_grad():
        if mask is None:
            return model(ids).logits
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return model(ids, attention_mask=mask, position_ids=position_ids).logits


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c['n_layer']}-H{c['n_head']}-C{c['n_embd']}")
def test_logits_match_transformers(cfg: dict, tmp_path: Path) -> None:
    ref = hf_model(seed=7, **cfg)
    ref.save_pretrained(tmp_path)
    ours = GPT2.from_pretrained(tmp_path)
    assert ours.config.n_layer == cfg["n_layer"] and ours.config.vocab_size == cfg["vocab_size"]
    ids, mask = padded_batch(cfg["vocab_size"], cfg["n_positions"])
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
    want = hf_logits(ref, ids, mask)
    real = mask.bool()
    assert got.shape == want.shape
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    # A full-context sequence without a mask too.
    ids = torch.randint(0, cfg["vocab_size"], (2, cfg["n_positions"]))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf_logits(ref, ids), atol=1e-4, rtol=0)


def test_left_padded_row_equals_row_alone() -> None:
    model = tiny_model()
    ids, mask = padded_batch(97, 64, seed=3)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = model(ids[row : row + 1, real]).logits[0]
            torch.testing.assert_close(batch[row, real], alone, atol=1e-5, rtol=0)
    assert torch.isfinite(batch).all(), "padding positions must not produce NaN"


def test_explicit_position_ids_match_the_default() -> None:
    model = tiny_model()
    ids, mask = padded_batch(97, 64, seed=4)
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, attention_mask=mask, position_ids=pos).logits,
            model(ids, attention_mask=mask).logits,
        )


def test_prefill_then_decode_steps_equal_the_full_forward() -> None:
    # The KV-cache path generation and the eval scorer use: right-padded prompts prefilled
    # together, then one token per row at each row's own position.
    model = tiny_model(seed=5)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (12, 7, 1, 9)]
    prompts, more = [r[:-4] or r[:1] for r in rows], 4
    L = max(len(r) for r in rows) + more
    cfg = model.config
    k = [torch.zeros(4, cfg.n_head, L, cfg.head_size) for _ in range(cfg.n_layer)]
    v = [torch.zeros_like(t) for t in k]
    T = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    with torch.no_grad():
        h = model.prefill(ids, k, v)  # (4, T, C)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p])).logits[0]
            torch.testing.assert_close(model.logits(h[i, : len(p)]), alone, atol=1e-5, rtol=0)
        for t in range(more):
            pos = torch.tensor([len(p) + t for p in prompts])
            fed = torch.tensor([[(rows[i] + [0] * more)[len(p) + t]] for i, p in enumerate(prompts)])
            got = model.decode_step(fed, pos, k, v)  # (4, V)
            for i, p in enumerate(prompts):
                seq = (rows[i] + [0] * more)[: len(p) + t + 1]
                want = model(torch.tensor([seq])).logits[0, -1]
                torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


def test_decode_step_over_a_span_writes_the_whole_cache_and_reads_its_first_positions() -> None:
    # The compiled step passes whole caches and a span (writing into a slice of its input
    # cost a copy per layer): same logits as the caches cut to the span, same cache.
    model = tiny_model(seed=3)
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    k = [torch.randn(3, cfg.n_head, 24, cfg.head_size, generator=g) for _ in range(cfg.n_layer)]
    v = [torch.randn(3, cfg.n_head, 24, cfg.head_size, generator=g) for _ in range(cfg.n_layer)]
    k2, v2 = [t.clone() for t in k], [t.clone() for t in v]
    before = k[0].clone()
    idx, pos = torch.tensor([[5], [9], [1]]), torch.tensor([3, 10, 15])
    with torch.no_grad():
        spanned = model.decode_step(idx, pos, k, v, span=16)
        cut = model.decode_step(idx, pos, [t[:, :, :16] for t in k2], [t[:, :, :16] for t in v2])
    torch.testing.assert_close(spanned, cut, atol=0, rtol=0)
    for a, b in zip(k + v, k2 + v2, strict=True):
        assert torch.equal(a, b)  # the new keys and values written in place, nothing else moved
    assert not torch.equal(k[0][0, :, 3], before[0, :, 3])  # row 0's key went to its position
    assert torch.equal(k[0][:, :, 16:], before[:, :, 16:])  # past the span: untouched


def test_last_only_returns_the_last_position() -> None:
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, last_only=True).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_sequence_longer_than_the_context_is_refused() -> None:
    model = tiny_model(n_positions=8)
    with pytest.raises(ValueError, match="exceeds the context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_loss_matches_transformers_labels(tmp_path: Path) -> None:
    ref = hf_model(seed=11)
    ref.save_pretrained(tmp_path)
    ours = GPT2.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        want = ref(ids, labels=ids).loss  # transformers shifts the labels itself
        out = ours(ids[:, :-1], targets=ids[:, 1:])
        torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=0)
        # -100 targets are ignored, as with transformers' labels.
        labels = ids.clone()
        labels[:, :5] = -100
        targets = labels[:, 1:]
        torch.testing.assert_close(
            ours(ids[:, :-1], targets=targets).loss, ref(ids, labels=labels).loss, atol=1e-5, rtol=0
        )
    assert out.logits.shape == (3, 16, 97)
    assert ours(ids).loss is None


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_preset_parameter_counts(name: str, count: int) -> None:
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_name(name))
    assert model.wte.weight.is_meta
    assert model.num_parameters() == count
    assert sum(p.numel() for p in model.parameters()) == count
    # The same count transformers gives (tied lm_head counted once).
    import transformers

    with torch.device("meta"):
        cfg = GPT2Config.from_name(name)
        ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf_dict()))
    assert sum(p.numel() for p in ref.parameters()) == count


def test_preset_names() -> None:
    assert GPT2Config.from_name("openai-community/gpt2-medium") == GPT2Config.from_name("gpt2-medium")
    cfg = GPT2Config.from_name("gpt2")
    assert (cfg.vocab_size, cfg.n_positions, cfg.layer_norm_epsilon) == (50257, 1024, 1e-5)


def test_padded_vocabulary_never_scores_padding() -> None:
    model = tiny_model(padded_vocab_size=128)
    assert model.wte.weight.shape == (128, 32)
    with torch.no_grad():
        model.wte.weight[97:] = 100.0  # would win every argmax if it were scored
        out = model(torch.randint(0, 97, (2, 6)), targets=torch.randint(0, 97, (2, 6)))
    assert out.logits.shape == (2, 6, 97)
    assert out.logits.argmax(-1).max() < 97
    assert torch.isfinite(out.loss)


def test_padded_vocabulary_gives_the_same_logits() -> None:
    plain = tiny_model(seed=2)
    padded = tiny_model(seed=2, padded_vocab_size=128)
    with torch.no_grad():
        padded.load_state_dict(
            {**plain.state_dict(), "wte.weight": torch.cat([plain.wte.weight, torch.randn(31, 32)])}
        )
        ids = torch.randint(0, 97, (2, 10))
        torch.testing.assert_close(padded(ids).logits, plain(ids).logits)


def test_sinusoidal_table_is_seed_001s() -> None:
    table = sinusoidal_table(50, 16)
    pos, i = 7, 3
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert torch.equal(table[0, 0::2], torch.zeros(8)) and torch.equal(table[0, 1::2], torch.ones(8))
    assert sinusoidal_table(10, 7).shape == (10, 7)  # odd widths work too


def test_sinusoidal_model_has_no_learned_positions() -> None:
    model = tiny_model(position_embedding="sinusoidal")
    assert not hasattr(model, "wpe")
    assert "wpe.weight" not in model.state_dict()
    torch.testing.assert_close(model.wpe_table, sinusoidal_table(64, 32))
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        x = model(ids).logits
        y = model(ids.roll(1, dims=1)).logits
    assert not torch.allclose(x, y), "positions must matter"


def test_init_statistics() -> None:
    torch.manual_seed(0)
    n_layer = 6
    model = GPT2(GPT2Config(n_layer=n_layer, n_head=4, n_embd=256, vocab_size=2000, n_positions=256))
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    for block in model.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
            assert proj.weight.mean().abs().item() < resid_std / 10
        for linear in (block.attn.c_attn, block.mlp.c_fc):
            assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
        for ln in (block.ln_1, block.ln_2):
            assert torch.equal(ln.weight, torch.ones_like(ln.weight))
            assert torch.equal(ln.bias, torch.zeros_like(ln.bias))
        for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # A fresh model predicts nearly uniformly: the loss starts near ln(vocab).
    ids = torch.randint(0, 2000, (2, 64))
    with torch.no_grad():
        loss = model(ids, targets=torch.randint(0, 2000, (2, 64))).loss.item()
    assert loss == pytest.approx(math.log(2000), rel=0.05)


def test_architecture_details() -> None:
    cfg = tiny_config()
    model = GPT2(cfg)
    assert model.ln_f.eps == 1e-5 and model.h[0].ln_1.eps == 1e-5
    assert model.h[0].mlp.approximate == "tanh"  # gelu_new is the tanh approximation
    assert model.h[0].mlp.c_fc.out_features == 4 * cfg.n_embd
    # Tied output: no separate lm_head parameter.
    assert not any("lm_head" in name for name, _ in model.named_parameters())


def test_dropout_only_in_training() -> None:
    model = tiny_model(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
        torch.testing.assert_close(a, b)
        model.train()
        c = model(ids).logits
    assert not torch.allclose(a, c)


def test_builds_on_meta_then_materialises() -> None:
    with torch.device("meta"):
        model = GPT2(tiny_config())
    model.to_empty(device="cpu")
    model.reset_parameters()
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long)).logits).all()


def test_extend_equals_the_full_forward_at_each_rows_own_position() -> None:
    # Several new tokens per row after its cached ones (the eval scorer's continuations).
    model = tiny_model(seed=7)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 3, 6)]
    more = torch.randint(0, 97, (3, 4), generator=g)
    cfg, L = model.config, 9 + 4
    k = [torch.zeros(3, cfg.n_head, L, cfg.head_size) for _ in range(cfg.n_layer)]
    v = [torch.zeros_like(t) for t in k]
    ids = torch.tensor([p + [0] * (9 - len(p)) for p in prompts])
    with torch.no_grad():
        model.prefill(ids, k, v)
        h = model.extend(more, torch.tensor([len(p) for p in prompts]), k, v)  # (3, 4, C)
        for i, p in enumerate(prompts):
            want = model(torch.tensor([p + more[i].tolist()])).logits[0, len(p) :]
            torch.testing.assert_close(model.logits(h[i]), want, atol=1e-5, rtol=0)
