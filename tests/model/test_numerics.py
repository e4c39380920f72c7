"""Every precision and decode path against `gpt2kit.model.numerics.BOUNDS`, on a model of GPT-2's
width (768, 12 heads, the real vocabulary), at every CPU level this machine can emulate.

Each measurement runs in a subprocess at its level (`numerics_helpers.run_at`). Compiled
steps are the cost (each build is a minute or more): the session shares one step cache,
builds the three native steps, and reads each eager option's figures from its compiled
twin's run. Compiled steps at the lower levels are marked slow; benchmarks/bench_numerics.py
runs the whole matrix on gpt2 124M.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import hf_model, tiny_model
from gpt2kit.device import CPU_LEVELS
from gpt2kit.model.compiled import compiled_step, missing_toolchain
from gpt2kit.model.numerics import (
    BOUNDS,
    GREEDY_TOKENS,
    PRECISIONS,
    check,
    decode_logits,
    first_mismatch,
    greedy,
    mean_nll,
    nll_delta,
)
from gpt2kit.model.quantize import quantize_int8
from numerics_helpers import level_skip, run_at

# The first test that needs a compiled step waits for its build: minutes, more on a busy machine.
pytestmark = pytest.mark.timeout(1800)

WIDTH_768 = dict(n_embd=768, n_layer=2, n_head=12, vocab_size=50257, n_positions=256)
TEXT_TOKENS = 64  # tokens of a play scored for the NLL check (int8 eager: ~0.5 s a token here)
NO_COMPILER = missing_toolchain()


def _marks(level: str, compiled: bool) -> list:
    marks = []
    if level_skip(level):
        marks.append(pytest.mark.skip(reason=level_skip(level)))
    if compiled and NO_COMPILER:
        marks.append(pytest.mark.skip(reason=NO_COMPILER))
    if compiled and level != "native":
        marks.append(pytest.mark.slow)
    return marks


LEVELS = [pytest.param(level, marks=_marks(level, False), id=level) for level in CPU_LEVELS]
COMPILED_LEVELS = [pytest.param(level, marks=_marks(level, True), id=level) for level in CPU_LEVELS]
# (level, compiled): eager and compiled decoding at each level.
PATHS = [
    pytest.param(
        level, compiled, marks=_marks(level, compiled), id=f"{level}-{'compiled' if compiled else 'eager'}"
    )
    for level in CPU_LEVELS
    for compiled in (False, True)
]


class Runs:
    """Each (level, precision, compiled, run) measured once per session; the step cache shared."""

    def __init__(self, path: Path, prompt: list[int], text: list[int], cache: Path) -> None:
        self.path, self.prompt, self.text, self.cache = str(path), prompt, text, cache
        self.done: dict[tuple, dict] = {}

    def get(self, level: str, precision: str, compiled: bool, *, run: int = 0) -> dict:
        key = (level, precision, compiled, run)
        if key not in self.done:
            if not compiled and run == 0 and level == "native":
                # The native compiled run measures its eager twin too: one process less.
                twin = self.get(level, precision, True)
                self.done[key] = {"tokens": twin["eager_tokens"], "nll": twin["eager_nll"]}
            else:
                args = dict(path=self.path, precision=precision, compiled=compiled, prompt=self.prompt)
                args.update(text=self.text, n=GREEDY_TOKENS, tokens_only=run > 0)
                self.done[key] = self._run(level, args)
        if "error" in self.done[key]:  # a failed child fails every test that needs it, once
            pytest.fail(self.done[key]["error"])
        return self.done[key]

    def _run(self, level: str, args: dict, **options) -> dict:
        try:
            return run_at(level, args, cache=self.cache, **options)
        except AssertionError as e:
            return {"error": str(e)}

    def transformers(self, level: str) -> list[int]:
        key = (level, "transformers")
        if key not in self.done:
            args = dict(path=self.path, prompt=self.prompt, n=GREEDY_TOKENS)
            self.done[key] = self._run(level, args, transformers=True)
        if "error" in self.done[key]:
            pytest.fail(self.done[key]["error"])
        return self.done[key]["tokens"]


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer) -> Runs:
    from gpt2kit.data.corpora import shakespeare_documents

    path = tmp_path_factory.mktemp("width768")
    hf_model(seed=0, **WIDTH_768).save_pretrained(path)
    ids = gpt2_tokenizer.encode(shakespeare_documents()[0][2000:4000])  # past the title and cast
    return Runs(path, ids[:8], ids[8 : 8 + TEXT_TOKENS], tmp_path_factory.mktemp("steps"))


def _assert_bounds(precision: str, **measured) -> None:
    failures = check(precision, **measured)
    assert not failures, f"{precision}: " + "; ".join(failures)


@pytest.mark.parametrize("level", LEVELS)
def test_fp32_eager_equals_transformers(runs: Runs, level: str) -> None:
    ours = runs.get(level, "fp32", False)["tokens"]
    assert ours == runs.transformers(level), (
        f"first mismatch at {first_mismatch(ours, runs.transformers(level))}"
    )


@pytest.mark.parametrize("level", COMPILED_LEVELS)
def test_fp32_compiled_equals_transformers(runs: Runs, level: str) -> None:
    ours = runs.get(level, "fp32", True)["tokens"]
    assert ours == runs.transformers(level), (
        f"first mismatch at {first_mismatch(ours, runs.transformers(level))}"
    )


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("level", COMPILED_LEVELS)
def test_compiled_equals_its_eager(runs: Runs, level: str, precision: str) -> None:
    r = runs.get(level, precision, True)
    depth = first_mismatch(r["tokens"], r["eager_tokens"])
    _assert_bounds(precision, compiled_logits=r["compiled_logits"], depth_compiled=depth)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize(("level", "compiled"), PATHS)
def test_greedy_tokens_follow_fp32(runs: Runs, level: str, compiled: bool, precision: str) -> None:
    reference = runs.get(level, "fp32", False)["tokens"]
    depth = first_mismatch(runs.get(level, precision, compiled)["tokens"], reference)
    _assert_bounds(precision, depth_vs_fp32=depth)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("level", "compiled"), PATHS)
def test_nll_on_the_plays_near_fp32(runs: Runs, level: str, compiled: bool, precision: str) -> None:
    reference = runs.get(level, "fp32", False)["nll"]
    nll = runs.get(level, precision, compiled)["nll"]
    assert 5.0 < nll < 20.0, f"mean NLL {nll} is no NLL of a random model over 50257 tokens (~10.8)"
    _assert_bounds(precision, nll_rel=nll_delta(nll, reference))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("level", "compiled"), PATHS)
def test_two_processes_give_the_same_tokens(runs: Runs, level: str, compiled: bool, precision: str) -> None:
    # The second process loads the step the first one built and saved.
    first = runs.get(level, precision, compiled)["tokens"]
    assert runs.get(level, precision, compiled, run=1)["tokens"] == first


def test_the_measurements_agree_with_the_full_forward() -> None:
    model = tiny_model(seed=5)
    ids = [5, 17, 3, 40, 2, 9, 11, 60, 7, 1]
    full = model(torch.tensor([ids])).logits[0].float()  # (T, V), every position at once
    tokens = greedy(model, ids[:3], 5)
    assert decode_logits(model, ids[:3], tokens[:-1]).argmax(-1).tolist() == tokens
    assert torch.allclose(decode_logits(model, ids[:3], ids[3:]), full[2:], atol=1e-5)
    expected = torch.nn.functional.cross_entropy(full[:-1], torch.tensor(ids[1:]))
    assert abs(mean_nll(model, ids) - float(expected)) < 1e-5
    assert (
        first_mismatch([1, 2, 3], [1, 2, 4]),
        first_mismatch([1, 2], [1, 2, 3]),
        first_mismatch([], [1]),
    ) == (2, 2, 0)
    assert check("int8", depth_vs_fp32=0, nll_rel=1.0) and not check("fp32", depth_vs_fp32=GREEDY_TOKENS)


def test_bounds_cover_every_precision() -> None:
    assert set(PRECISIONS) == {"fp32", "bf16", "int8"} and BOUNDS["fp32"].depth_vs_fp32 == GREEDY_TOKENS


@pytest.mark.skipif(NO_COMPILER is not None, reason=str(NO_COMPILER))
def test_int8_step_is_right_where_torchao_traces_s8s8(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An AMX CPU (or one without VNNI) makes torchao trace its s8s8 int8 product; a one-row
    # compiled step of that form returned garbage (quantize.int8_export_form has why). Here
    # torchao is told it runs on AMX, so this CPU traces what an AMX CPU traces.
    import torchao.kernel.intmm as intmm

    monkeypatch.setattr(intmm, "_cpu_is_amx_tile_supported", lambda: True)
    model = tiny_model(seed=0, n_embd=128, n_head=2, n_layer=1, vocab_size=256, n_positions=64)
    quantize_int8(model, scheme="int8-dynamic")
    step = compiled_step(model, slots=1, max_len=64, build=True, exact=True, cache_dir=tmp_path)
    prompt = [1, 2, 3, 4]
    eager = greedy(model, prompt, 16)
    assert greedy(model, prompt, 16, step=step) == eager
    diff = (decode_logits(model, prompt, eager, step=step) - decode_logits(model, prompt, eager)).abs().max()
    _assert_bounds("int8", compiled_logits=float(diff))
