"""generate, complete and beam_search under `torch.inference_mode()` and `torch.no_grad()`, in
float32, bfloat16 and int8, with compile=None, True and False.

Users wrap inference in these all the time; an int8 model under inference_mode crashed in
the step cache's weight hash (torchao's detach sets a version counter, which an inference
tensor refuses). Each case must give what the same call gives outside any context.

The steps are built once per precision, by a module fixture, under inference_mode (one row;
and two for float32's beams): 3.5-4 min each on this 2-core CPU shared with other jobs (load
~20), much less on an idle one. Beam search with compile=True in bf16 and int8 would build a
two-row step too: slow.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import bytes_vocab, tiny_model
from gpt2kit import Tokenizer, generate
from gpt2kit.generation.beam import beam_search
from gpt2kit.generation.complete import complete
from gpt2kit.model.compiled import compiled_step, decode_step, missing_toolchain
from gpt2kit.model.quantize import quantize_int8

pytestmark = [
    pytest.mark.skipif(
        missing_toolchain() is not None, reason=f"compiled steps can't be built here: {missing_toolchain()}"
    ),
    pytest.mark.timeout(1800),  # the first test waits for 4 builds: minutes each on a busy CPU
]

EOT = 256
PROMPT = [72, 105, 32, 116]  # "Hi t"
CONTEXTS: dict[str, Callable] = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


def make_model(precision: str):
    model = tiny_model(seed=5, vocab_size=EOT + 1, bos_token_id=EOT, eos_token_id=EOT)
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)
    if precision == "int8":
        quantize_int8(model)
    return model


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> Path:
    """A step cache holding each precision's one-row step (and float32's two-row step)."""
    cache = tmp_path_factory.mktemp("steps")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2KIT_CACHE_DIR", str(cache))
        for precision in ("float32", "bfloat16", "int8"):
            model = make_model(precision)
            with torch.inference_mode():
                assert decode_step(model, slots=1, max_len=64, build=True) is not None
        model = make_model("float32")
        with torch.no_grad():
            assert decode_step(model, slots=2, max_len=64, build=True) is not None
    return cache


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(*bytes_vocab([]))


def call(function: str, model, tokenizer: Tokenizer, compile: bool | None):
    if function == "generate":
        return generate(model, [PROMPT], max_new_tokens=6, temperature=0, eos_token_id=-1, compile=compile)
    if function == "complete":
        done = complete(model, tokenizer, "Hi t", max_new_tokens=6, temperature=0, compile=compile)
        return [(c.text, c.token_ids) for c in done]
    out = beam_search(
        model, torch.tensor([PROMPT]), max_new_tokens=5, num_beams=2, eos_token_id=-1, compile=compile
    )
    return out.tolist()


def cases():
    for precision in ("float32", "bfloat16", "int8"):
        for function in ("generate", "complete", "beam_search"):
            for compile in (True, None, False):
                slow = compile is True and function == "beam_search" and precision != "float32"
                marks = [pytest.mark.slow] if slow else []
                yield pytest.param(
                    precision, function, compile, marks=marks, id=f"{precision}-{function}-{compile}"
                )


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize(("precision", "function", "compile"), cases())
def test_works_under_inference_mode_and_no_grad(
    steps, tokenizer, monkeypatch, context: str, precision: str, function: str, compile: bool | None
) -> None:
    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(steps))
    model = make_model(precision)
    want = call(function, model, tokenizer, compile)  # outside any context
    with CONTEXTS[context]():
        got = call(function, model, tokenizer, compile)
    assert got == want
    if precision == "float32" and compile is not False:  # compiled float32 decodes as eager does
        assert got == call(function, model, tokenizer, False)
    if compile is not False and function != "beam_search":  # it decoded with the saved step
        assert compiled_step(model, slots=1, max_len=64, build=False) is not None


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_model_outputs_are_bitwise_the_same_after_compiled_generate(
    steps, monkeypatch, precision: str
) -> None:
    """generate() on the saved compiled step leaves model(x) as it was (the eager versions,
    and those under ATEN_CPU_CAPABILITY=avx2, are in test_decode_layout.py)."""
    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(steps))
    model = make_model(precision)
    x = torch.tensor([PROMPT])
    with torch.inference_mode():
        before = model(x).logits
    generate(model, [PROMPT], max_new_tokens=4, seed=0)
    assert compiled_step(model, slots=1, max_len=64, build=False) is not None
    with torch.inference_mode():
        assert torch.equal(model(x).logits, before)
