"""Compiled decoding (`compile=True`): same tokens as eager decoding, recompiled when weights change.

Compiling needs a C++ compiler (inductor's CPU backend); the module is skipped without one.
One tiny model is compiled once for the module (about a minute on 2 cores) and shared.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from gpt2kit import generate
from gpt2kit.compiled import CACHE_BUCKET, cache_length, compiled_decoder
from gpt2kit.errors import ConfigError
from gpt2kit.model import KVCache

pytestmark = pytest.mark.skipif(
    not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")),
    reason="torch.compile on CPU needs a C++ compiler",
)

PROMPTS = [[5, 17, 3, 40, 2, 9], [7], [11, 12, 13]]  # mixed lengths: left padding in one batch


@pytest.fixture(scope="module")
def model():
    m = tiny_model(seed=3)
    # Compile the one shape the tests use (batch 3, one cache bucket), once.
    generate(m, PROMPTS, max_new_tokens=4, temperature=0, eos_token_id=-1, compile=True)
    return m


def test_cache_length_rounds_up_within_the_context() -> None:
    assert cache_length(1, 1024) == CACHE_BUCKET
    assert cache_length(CACHE_BUCKET + 1, 1024) == 2 * CACHE_BUCKET
    assert cache_length(900, 1024) == 1024  # never past the context...
    assert cache_length(60, 64) == 64
    assert cache_length(70, 64) == 70  # ...nor below what is needed (the model then refuses)


def test_greedy_batched_with_padding_equals_eager(model) -> None:
    fast = generate(model, PROMPTS, max_new_tokens=20, temperature=0, eos_token_id=-1, compile=True)
    slow = generate(model, PROMPTS, max_new_tokens=20, temperature=0, eos_token_id=-1)
    assert fast == slow
    assert [len(r) for r in fast] == [len(p) + 20 for p in PROMPTS]


def test_seeded_sampling_equals_eager(model) -> None:
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.95, seed=11, eos_token_id=-1)
    assert generate(model, PROMPTS, compile=True, **kw) == generate(model, PROMPTS, **kw)


def test_step_logits_match_the_eager_forward(model) -> None:
    ids = torch.tensor([[5, 17, 3, 40], [1, 2, 3, 4], [60, 50, 40, 30]])
    new = torch.tensor([[9], [8], [7]])
    decoder = compiled_decoder(model)
    with torch.inference_mode():
        cache = KVCache.allocate(model.config, 3, cache_length(8, model.config.n_positions))
        model(ids, kv_cache=cache)
        got = decoder.step(new, cache)
        want = model(torch.cat([ids, new], dim=1)).logits[:, -1]
    assert cache.pos == 5
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_finished_rows_keep_eos_while_the_batch_goes_on(model) -> None:
    # With the real eos, a row may end early; compiled decoding keeps it in the batch.
    eos = model.config.eos_token_id
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    fast = generate(model, ids, max_new_tokens=40, top_k=10, seed=0, compile=True)
    slow = generate(model, ids, max_new_tokens=40, top_k=10, seed=0)
    assert torch.equal(fast, slow)
    ended = (fast[:, 2:] == eos).any(dim=1)
    assert bool(ended.any()) and not bool(ended.all()), "the case needs one row to end before another"


def test_changed_weights_are_compiled_again(model) -> None:
    first = compiled_decoder(model)
    assert compiled_decoder(model) is first  # unchanged weights: the same graph
    changed = copy.deepcopy(model)
    assert "_compiled_decoder" not in changed.__dict__ or changed.__dict__["_compiled_decoder"] is None
    with torch.no_grad():
        changed.ln_f.bias.add_(0.5)
        changed.h[0].mlp.c_fc.weight.mul_(-1.0)
    fast = generate(changed, PROMPTS, max_new_tokens=10, temperature=0, eos_token_id=-1, compile=True)
    slow = generate(changed, PROMPTS, max_new_tokens=10, temperature=0, eos_token_id=-1)
    assert fast == slow
    assert compiled_decoder(changed) is not first


def test_beam_search_refuses_compile(model) -> None:
    with pytest.raises(ConfigError, match="beam search"):
        generate(model, [[1, 2]], max_new_tokens=3, num_beams=2, compile=True)


def test_cli_compile_with_beams_is_a_clear_error(tmp_path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2kit",
            "generate",
            "--model",
            str(tmp_path),
            "--compile",
            "--num-beams",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--compile" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_decoding_matches_eager(dtype) -> None:
    """The GPU half of compiled decoding (Triton kernels): run with `pytest -m gpu` on a CUDA machine."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    m = tiny_model(seed=3).to("cuda", dtype)
    kw = dict(max_new_tokens=12, temperature=0, eos_token_id=-1)
    fast, slow = generate(m, PROMPTS, compile=True, **kw), generate(m, PROMPTS, **kw)
    if dtype == torch.float32:  # bf16 rounding may flip a near-tie; its logits are checked below
        assert fast == slow
    assert [len(r) for r in fast] == [len(p) + 12 for p in PROMPTS]
    ids = torch.tensor([[5, 17, 3, 40], [1, 2, 3, 4], [60, 50, 40, 30]], device="cuda")
    new = torch.tensor([[9], [8], [7]], device="cuda")
    with torch.inference_mode():
        cache = KVCache.allocate(
            m.config, 3, cache_length(8, m.config.n_positions), device="cuda", dtype=dtype
        )
        m(ids, kv_cache=cache)
        got = compiled_decoder(m).step(new, cache)
        want = m(torch.cat([ids, new], dim=1)).logits[:, -1]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
