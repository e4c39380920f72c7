"""Compiled decode steps: built once by one process, loaded by others, equal to eager decode_step.

Building needs a C++ compiler (inductor's CPU backend); the module is skipped without one.
A build of the tiny model takes ~40 s on 2 cores, so the module builds twice: once in a
subprocess (the step every test loads) and once for changed weights. Longer checks (bf16,
int8, a damaged step rebuilt) are marked slow.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import weakref
import zlib
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from gpt2kit import generate
from gpt2kit.errors import ConfigError
from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.engine import Engine, SlotCache
from gpt2kit.model import stepcache
from gpt2kit.model.compiled import (
    LENGTH_BUCKET,
    TOLERANCES,
    CompiledStep,
    TieredStep,
    check,
    compiled_step,
    decode_step,
    missing_toolchain,
    step_key,
)

pytestmark = [
    pytest.mark.skipif(
        missing_toolchain() is not None, reason=f"compiled steps can't be built here: {missing_toolchain()}"
    ),
    pytest.mark.timeout(1800),  # a build takes minutes on a busy CPU (the module fixture's: 8.5 min)
]

HERE = Path(__file__).parent  # this file, and the helpers next to it
TESTS = HERE.parent  # conftest.py
SEED, SLOTS = 3, 4
PROMPTS = [[5, 17, 3, 40, 2, 9], [7], [11, 12, 13]]
MAX_LEN = 20  # the longest prompt's last steps reach the cache's last position


def greedy(model, step, prompts, *, steps: int, max_len: int) -> list[list[int]]:
    """Greedy tokens of right-padded prompts prefilled from position 0, each row then fed
    at its own position by `step` (a compiled step, or model.decode_step)."""
    cfg, b = model.config, len(prompts)
    shape = (b, cfg.n_head, max_len, cfg.head_size)
    k = [torch.zeros(shape, dtype=model.wte.weight.dtype) for _ in range(cfg.n_layer)]
    v = [torch.zeros(shape, dtype=model.wte.weight.dtype) for _ in range(cfg.n_layer)]
    ids = torch.zeros(b, max(map(len, prompts)), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    out: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        pos = torch.tensor([len(p) for p in prompts])
        logits = model.logits(model.prefill(ids, k, v)[torch.arange(b), pos - 1])
        for _ in range(steps):
            token = logits.argmax(dim=-1)
            for i, t in enumerate(token.tolist()):
                out[i].append(t)
            logits = step(token[:, None], pos, k, v)
            pos = pos + 1
    return out


def run_children(cache: Path, *, build: bool, n: int = 1) -> list[dict]:
    """`n` fresh Python processes started at once: each gets the tiny model's step from
    `cache` (building it if `build` and missing) and decodes greedily."""
    code = f"""
import json, sys, torch
from conftest import tiny_model
from test_compiled import greedy, PROMPTS, MAX_LEN, SEED, SLOTS
from gpt2kit.model.compiled import compiled_step
torch.set_num_threads({torch.get_num_threads()})  # the key holds the thread count: the parent's
phases = []
model = tiny_model(seed=SEED)
step = compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build={build}, progress=phases.append)
tokens = greedy(model, step, PROMPTS, steps=MAX_LEN - len(PROMPTS[0]), max_len=MAX_LEN)
print(json.dumps({{"phases": phases, "tokens": tokens, "library": str(step.library)}}))
"""
    path = os.pathsep.join([str(HERE), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, GPT2KIT_CACHE_DIR=str(cache), PYTHONPATH=path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=TESTS,
        )
        for _ in range(n)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        results.append({"stdout": out, "stderr": err, **json.loads(out)})
    return results


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The tiny model's step, built by one of two processes started at once into an empty
    cache; the other waits for it and loads it."""
    cache = tmp_path_factory.mktemp("steps")
    first, second = run_children(cache, build=True, n=2)
    builder, loader = (first, second) if len(first["phases"]) > 1 else (second, first)
    return {"cache": cache, "loader": loader, **builder}


@pytest.fixture()
def model():
    return tiny_model(seed=SEED)


def test_a_step_built_by_one_process_is_loaded_by_this_one(built, model) -> None:
    step = compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=built["cache"])
    assert isinstance(step, CompiledStep)
    assert str(step.library) == built["library"] and step.slots == SLOTS and step.max_len == MAX_LEN
    steps = MAX_LEN - len(PROMPTS[0])
    tokens = greedy(model, step, PROMPTS, steps=steps, max_len=MAX_LEN)
    assert tokens == built["tokens"]
    assert tokens == greedy(model, model.decode_step, PROMPTS, steps=steps, max_len=MAX_LEN)


def test_two_processes_at_once_build_one_step_and_share_it(built) -> None:
    loader = built["loader"]
    assert [p.split()[0] for p in loader["phases"]] == ["loading"]
    assert loader["library"] == built["library"] and loader["tokens"] == built["tokens"]
    assert len(list((built["cache"] / "compiled").glob("*.so"))) == 1


def test_building_reports_its_phases_and_prints_nothing(built) -> None:
    phases = built["phases"]
    assert [p.split()[0] for p in phases] == ["exporting", "compiling", "checking", "saving"]
    assert built["stdout"].count("\n") == 1  # the child's own JSON line only
    assert "AUTOTUNE" not in built["stderr"] and "Traceback" not in built["stderr"]


@pytest.mark.parametrize("L", [MAX_LEN, 12, 64])
def test_logits_and_cache_writes_equal_eager_at_any_length(built, model, L: int) -> None:
    step = compiled_step(model, slots=SLOTS, max_len=L, build=False, cache_dir=built["cache"])
    cfg, b = model.config, 3
    torch.manual_seed(L)
    k = [torch.randn(b, cfg.n_head, L, cfg.head_size) for _ in range(cfg.n_layer)]
    v = [torch.randn_like(t) for t in k]
    idx = torch.tensor([[5], [60], [9]])
    for pos in ([0, 3, L - 2], [L // 2, 1, L - 1]):  # L - 1: the whole cache, run eagerly
        input_pos = torch.tensor(pos)
        k_want, v_want = [t.clone() for t in k], [t.clone() for t in v]
        with torch.inference_mode():
            want = model.decode_step(idx, input_pos, k_want, v_want)
            got = step(idx, input_pos, k, v)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for a, w in zip(k + v, k_want + v_want, strict=True):
            # The step's c_attn is its own GEMM kernel (another summation order): float rounding.
            torch.testing.assert_close(a, w, atol=1e-6, rtol=1e-5)


def test_one_step_serves_fewer_rows_and_not_more(built, model) -> None:
    step = compiled_step(model, slots=2, max_len=33, build=False, cache_dir=built["cache"])
    assert step is not None and step.slots == SLOTS and step.max_len == 33
    assert step.batch_size(1) == 1
    with pytest.raises(ValueError, match="1 to 4 rows"):
        step.batch_size(5)
    assert compiled_step(model, slots=SLOTS + 1, max_len=33, build=False, cache_dir=built["cache"]) is None
    tokens = greedy(model, step, PROMPTS[:1], steps=8, max_len=33)
    assert tokens == greedy(model, model.decode_step, PROMPTS[:1], steps=8, max_len=33)


def test_changed_weights_are_built_again_never_used(built, model, tmp_path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(built["cache"], cache)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.ln_f.bias.add_(0.5)
        changed.h[0].mlp.c_fc.weight.mul_(-1.0)
    assert compiled_step(changed, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=cache) is None
    step = compiled_step(changed, slots=SLOTS, max_len=MAX_LEN, build=True, cache_dir=cache)
    assert step is not None and step.library.name != Path(built["library"]).name
    steps = MAX_LEN - len(PROMPTS[0])
    tokens = greedy(changed, step, PROMPTS, steps=steps, max_len=MAX_LEN)
    assert tokens == greedy(changed, changed.decode_step, PROMPTS, steps=steps, max_len=MAX_LEN)
    assert tokens != built["tokens"]
    # Both models now have their own step; the first one's is untouched.
    assert compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=cache).library.name == (
        Path(built["library"]).name
    )


def test_weights_changed_after_loading_are_refused(built, model) -> None:
    step = compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=built["cache"])
    with torch.no_grad():
        model.h[1].attn.c_proj.weight.add_(1.0)
    cfg = model.config
    k = [torch.zeros(1, cfg.n_head, MAX_LEN, cfg.head_size) for _ in range(cfg.n_layer)]
    with pytest.raises(ConfigError, match="weights changed"):
        step(torch.tensor([[1]]), torch.tensor([0]), k, [t.clone() for t in k])


# --- every step proves itself against the eager model before it is used --------------------


def copy_cache(built: dict, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the built cache, and the built step's library in it."""
    cache = tmp_path / "cache"
    shutil.copytree(built["cache"], cache)
    return cache, cache / "compiled" / Path(built["library"]).name


def rewrite_record(library: Path) -> None:
    """Make `library`'s record match its bytes again (size and CRC), as a file built that way would."""
    record = library.with_suffix(".json")
    data = json.loads(record.read_text())
    data["size"], data["crc32"] = library.stat().st_size, zlib.crc32(library.read_bytes())
    record.write_text(json.dumps(data))


def test_a_correct_step_passes_its_check(built, model) -> None:
    step = compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=built["cache"])
    verdict = check(model, step)
    assert verdict.ok and verdict.rows == 2 * 3 and verdict.tokens_off == 0, verdict
    assert verdict.error < TOLERANCES["float32"] / 10, verdict


def test_a_step_built_for_other_weights_is_rejected_when_loaded(built, tmp_path, monkeypatch, caplog) -> None:
    """A step saved under another model's key (the record fixed up, so its CRC matches) is
    caught by the check, removed, and generate() decodes eagerly with one warning."""
    cache, library = copy_cache(built, tmp_path)
    other = tiny_model(seed=SEED + 1)
    stem = f"{step_key(other)}-s{SLOTS}"
    for suffix in (".so", ".json"):
        shutil.copy(library.with_suffix(suffix), cache / "compiled" / f"{stem}{suffix}")
    wrong = cache / "compiled" / f"{stem}.so"
    rewrite_record(wrong)
    assert stepcache.check(stepcache.Entry(cache / "compiled", step_key(other), SLOTS))
    with pytest.raises(ConfigError, match="failed its check against the eager model"):
        compiled_step(other, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=cache)
    assert not wrong.exists() and not wrong.with_suffix(".json").exists()
    for suffix in (".so", ".json"):  # once more, through generate()
        shutil.copy(library.with_suffix(suffix), cache / "compiled" / f"{stem}{suffix}")
    rewrite_record(wrong)
    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(cache))
    other = tiny_model(seed=SEED + 1)  # a fresh object: nothing of it is loaded in this process
    kw = dict(max_new_tokens=8, temperature=0, eos_token_id=-1)
    with caplog.at_level(logging.WARNING, logger="gpt2kit.model.compiled"):
        got = generate(other, PROMPTS, compile=None, **kw)
        again = generate(other, PROMPTS, compile=None, **kw)
    assert got == again == generate(other, PROMPTS, compile=False, **kw)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "failed its check against the eager model (max |Δlogit|" in warnings[0]
    assert warnings[0].endswith(": decoding eagerly")
    assert not wrong.exists()


def test_a_step_with_damaged_weights_inside_is_rejected(built, model, tmp_path) -> None:
    """Bytes of the position embeddings inside the library changed (and the record's CRC
    rewritten to match): the step loads, computes garbage, and the check catches it."""
    cache, library = copy_cache(built, tmp_path)
    data = bytearray(library.read_bytes())
    w = model.wpe.weight.detach()
    stored = [t.contiguous().numpy().tobytes() for t in (w, w.t())]  # either layout
    at = [data.find(b) for b in stored]
    hit = next(((i, b) for i, b in zip(at, stored, strict=True) if i >= 0), None)
    assert hit is not None, "the step's library holds wpe's bytes as a constant"
    i, b = hit
    data[i : i + len(b)] = (torch.frombuffer(bytearray(b), dtype=torch.float32) * 40 + 1).numpy().tobytes()
    library.write_bytes(bytes(data))
    rewrite_record(library)
    with pytest.raises(ConfigError, match="failed its check") as e:
        compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=cache)
    assert "\n" not in str(e.value)
    assert not library.exists()


def test_a_step_whose_output_is_perturbed_is_rejected(built, model, tmp_path, monkeypatch) -> None:
    """The runner's logits off by a little more than the float32 bound: rejected."""
    from gpt2kit.model.compiled import build

    cache, library = copy_cache(built, tmp_path)
    load = build.load_library

    class Perturbed:
        def __init__(self, runner) -> None:
            self.runner = runner

        def run(self, inputs):
            logits = self.runner.run(inputs)[0]
            return [logits + 10 * TOLERANCES["float32"] * logits.abs().amax() * torch.randn_like(logits)]

    monkeypatch.setattr(build, "load_library", lambda path, device: Perturbed(load(path, device)))
    with pytest.raises(ConfigError, match=r"bound 0\.0001 for float32"):
        compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=cache)
    assert not library.exists()


def test_a_build_that_fails_its_check_is_never_saved_nor_built_again(
    built, tmp_path, monkeypatch, caplog
) -> None:
    """generate(compile=True) whose build yields a step for other weights (the built one): it
    is never saved, a warning says why, decoding is eager, and a later call doesn't rebuild."""
    from gpt2kit.model.compiled import build

    builds = []

    def wrong_build(model, slots, folder, phase):
        builds.append(slots)
        return Path(shutil.copy(built["library"], folder / "step.so"))

    monkeypatch.setattr(build, "build_library", wrong_build)
    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(tmp_path))
    other = tiny_model(seed=SEED + 2)
    kw = dict(max_new_tokens=6, temperature=0, eos_token_id=-1)
    with caplog.at_level(logging.WARNING, logger="gpt2kit.model.compiled"):
        got = generate(other, PROMPTS[:1], compile=True, **kw)
        assert got == generate(other, PROMPTS[:1], compile=True, **kw)
        assert got == generate(tiny_model(seed=SEED + 2), PROMPTS[:1], compile=True, **kw)  # another object
    assert got == generate(other, PROMPTS[:1], compile=False, **kw)
    assert builds == [1], "built once, then the failure is remembered"
    assert not list((tmp_path / "compiled").glob("*.so"))
    assert len(list((tmp_path / "compiled").glob("*.failed"))) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all("failed its check against the eager model" in w for w in warnings)


def test_a_step_reused_for_new_tensors_is_checked_again(built, model, monkeypatch) -> None:
    """The same values in new tensors (load_state_dict with assign=True): the loaded step is
    reused without loading it again, but only after it passes its check against them."""
    from gpt2kit.model.compiled import get

    calls = []
    monkeypatch.setattr(get, "check", lambda model, step: calls.append(step.slots) or check(model, step))
    step = compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=built["cache"])
    assert calls == [SLOTS]
    assert (
        compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=built["cache"]) is not None
    )
    assert calls == [SLOTS], "the same tensors: no second check"
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    again = compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=built["cache"])
    assert calls == [SLOTS, SLOTS] and again._runner is step._runner
    steps = MAX_LEN - len(PROMPTS[0])
    assert greedy(model, again, PROMPTS, steps=steps, max_len=MAX_LEN) == built["tokens"]


# --- weights swapped under a long-lived engine -------------------------------------------------


def test_a_long_lived_engine_refuses_weights_swapped_by_assign(built, model, monkeypatch) -> None:
    """load_state_dict(other, assign=True) while an engine holds a compiled step: the next
    step refuses (never decodes with the old weights), the old parameters are freed (the step
    holds none of them), and the next generate() follows the new weights."""
    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(built["cache"]))
    step = decode_step(model, slots=SLOTS, max_len=MAX_LEN, build=False)
    assert step is not None
    engine = Engine(model, slots=SLOTS, max_len=MAX_LEN, eos_token_id=-1, step=step)
    row = engine.add(PROMPTS[0], SamplingConfig(max_new_tokens=10, temperature=0))
    engine.step()
    engine.step()
    old = [weakref.ref(p) for p in model.parameters()]
    other = tiny_model(seed=SEED + 3)
    model.load_state_dict(other.state_dict(), assign=True)
    with pytest.raises(ConfigError, match="weights changed after its compiled step was loaded"):
        engine.step()  # picks token 3 from logits of before the swap, then refuses to decode
    assert len(row.tokens) == 3
    gc.collect()
    assert all(r() is None for r in old), "the old parameters are freed"
    kw = dict(max_new_tokens=8, temperature=0, eos_token_id=-1)
    assert generate(model, PROMPTS, **kw) == generate(other, PROMPTS, compile=False, **kw)


def test_model_outputs_are_bitwise_the_same_after_compiled_generate(built, model, monkeypatch) -> None:
    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(built["cache"]))
    x = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        before = model(x).logits
    generate(model, PROMPTS, max_new_tokens=4, compile=None, seed=0)
    assert compiled_step(model, slots=len(PROMPTS), max_len=MAX_LEN, build=False) is not None
    with torch.inference_mode():
        assert torch.equal(model(x).logits, before)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "no record", "no library", "bad record"])
def test_a_damaged_step_is_removed_not_loaded(built, model, tmp_path, damage: str) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(built["cache"], cache)
    library = cache / "compiled" / Path(built["library"]).name
    record = library.with_suffix(".json")
    if damage == "truncated":
        with open(library, "r+b") as f:
            f.truncate(library.stat().st_size // 2)
    elif damage == "flipped byte":
        with open(library, "r+b") as f:
            f.seek(library.stat().st_size // 3)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "no record":  # the crash between the library and its record
        record.unlink()
    elif damage == "no library":
        library.unlink()
    else:
        record.write_text("{not json")
    assert compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=cache) is None
    if damage != "no record":
        assert not record.exists() and not library.exists()


@pytest.mark.slow
def test_a_damaged_step_is_built_again(built, model, tmp_path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(built["cache"], cache)
    library = cache / "compiled" / Path(built["library"]).name
    with open(library, "r+b") as f:
        f.truncate(1000)
    step = compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=True, cache_dir=cache)
    assert step is not None and step.library == library
    tokens = greedy(model, step, PROMPTS, steps=MAX_LEN - len(PROMPTS[0]), max_len=MAX_LEN)
    assert tokens == built["tokens"]


def test_the_key_covers_weights_dtype_config_and_slots(model) -> None:
    key = stepcache.key_of(stepcache.describe(model))
    assert key == stepcache.key_of(stepcache.describe(copy.deepcopy(model)))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    other_config = tiny_model(seed=SEED, n_positions=32)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.wpe.weight[0, 0] += 1e-3
    keys = {stepcache.key_of(stepcache.describe(m)) for m in (model, bf16, other_config, changed)}
    assert len(keys) == 4
    folder = Path("steps")
    names = {stepcache.Entry(folder, key, s).library.name for s in (1, 4, 8)}
    assert len(names) == 3


def test_missing_compiler_is_a_one_line_error(model, tmp_path) -> None:
    with torch._inductor.config.patch({"cpp.cxx": ("gpt2kit-no-such-c++",)}):
        problem = missing_toolchain()
        assert problem is not None and "C++ compiler" in problem and "apt install g++" in problem
        assert compiled_step(model, slots=1, max_len=8, build=False, cache_dir=tmp_path) is None
        with pytest.raises(ConfigError, match="C\\+\\+ compiler") as e:
            compiled_step(model, slots=1, max_len=8, build=True, cache_dir=tmp_path)
    assert "\n" not in str(e.value)


def test_missing_python_headers_is_a_one_line_error(model, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("gpt2kit.model.compiled.build.python_header", lambda: tmp_path / "Python.h")
    problem = missing_toolchain()
    assert problem is not None and "Python.h" in problem and "python3-dev" in problem
    with pytest.raises(ConfigError, match="python3-dev"):
        compiled_step(model, slots=1, max_len=8, build=True, cache_dir=tmp_path)


def test_a_failed_build_is_a_one_line_error_and_saves_nothing(model, tmp_path) -> None:
    # A compiler that answers --version and then fails every compile.
    cxx = tmp_path / "broken-c++"
    cxx.write_text(
        '#!/bin/sh\n[ "$1" = "--version" ] && echo "broken 1.0" && exit 0\necho nope >&2; exit 1\n'
    )
    cxx.chmod(0o755)
    with (
        torch._inductor.config.patch({"cpp.cxx": (str(cxx),)}),
        pytest.raises(ConfigError, match="building the compiled decode step failed") as e,
    ):
        compiled_step(model, slots=1, max_len=8, build=True, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache" / "compiled").glob("*.so"))


def test_bad_arguments_are_config_errors(model, tmp_path) -> None:
    for kwargs, match in [
        (dict(slots=0, max_len=8), "slots must be a positive integer"),
        (dict(slots=1, max_len=65), "max_len must be an integer in \\[2, 64\\]"),
    ]:
        with pytest.raises(ConfigError, match=match):
            compiled_step(model, build=False, cache_dir=tmp_path, **kwargs)


# --- generate(compile=True) on the saved step ------------------------------------------------


def test_generate_compiled_equals_eager_batched_padded_and_seeded(built, model, monkeypatch) -> None:
    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(built["cache"]))
    kw = dict(max_new_tokens=12, eos_token_id=-1)
    assert generate(model, PROMPTS, temperature=0, compile=True, **kw) == generate(
        model, PROMPTS, temperature=0, **kw
    )
    sampled = dict(temperature=0.9, top_k=20, top_p=0.95, seed=11, **kw)
    assert generate(model, PROMPTS, compile=True, **sampled) == generate(model, PROMPTS, **sampled)


def test_beam_search_on_the_compiled_step(built, model, monkeypatch) -> None:
    """Beams decode through the engine's step too, and give what eager beams give."""
    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(built["cache"]))
    assert compiled_step(model, slots=4, max_len=MAX_LEN, build=False) is not None, "the saved step is found"
    kw = dict(max_new_tokens=8, num_beams=2, eos_token_id=-1)
    assert generate(model, PROMPTS[:2], compile=None, **kw) == generate(
        model, PROMPTS[:2], compile=False, **kw
    )


def test_compiled_greedy_equals_transformers(built, model, monkeypatch, tmp_path) -> None:
    """generate() on the saved step gives transformers' greedy tokens (fp32), prompt by prompt."""
    import transformers

    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(built["cache"]))
    model.save_pretrained(tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    new = MAX_LEN - len(PROMPTS[0])
    ours = generate(model, PROMPTS, max_new_tokens=new, temperature=0, eos_token_id=-1, compile=None)
    assert compiled_step(model, slots=len(PROMPTS), max_len=MAX_LEN, build=False) is not None
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            want = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        assert got == want[0].tolist()


def test_a_lone_row_decodes_on_the_one_row_step(built, model, monkeypatch) -> None:
    """decode_step gives the engine a TieredStep (building the one-row step if no test saved
    it yet): one running row runs on it, more on the 4-slot step, all as eager decoding."""
    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(built["cache"]))
    tiered = decode_step(model, slots=SLOTS, max_len=MAX_LEN, build=True)
    assert isinstance(tiered, TieredStep) and (tiered.one.slots, tiered.many.slots) == (1, SLOTS)
    caches = [SlotCache(model, slots=SLOTS, max_len=MAX_LEN, step=s) for s in (tiered, None)]
    out = []
    with torch.inference_mode():
        for cache in caches:
            _, first = cache.prefill(0, PROMPTS[:2])
            both = cache.decode([3, 4], [len(PROMPTS[0]), len(PROMPTS[1])])
            lone = cache.decode([5], [len(PROMPTS[0]) + 1])  # row 0 alone, in slot 0
            out.append((first, both, lone))
    for got, want in zip(*out, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_strided_token_and_position_views(built, model) -> None:
    """Tokens and positions given as strided views (as beam search slices them) are read as
    their values, not as the memory under them."""
    step = compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=False, cache_dir=built["cache"])
    cfg = model.config
    k = [torch.randn(3, cfg.n_head, MAX_LEN, cfg.head_size) for _ in range(cfg.n_layer)]
    v = [torch.randn_like(t) for t in k]
    grid = torch.tensor([[5, 1, 2], [60, 3, 4], [9, 5, 6]])
    idx, input_pos = grid[:, :1], grid[:, 1]  # views with strides (3, 1) and (3,)
    assert not idx.is_contiguous() and not input_pos.is_contiguous()
    with torch.inference_mode():
        want = model.decode_step(
            idx.clone(), input_pos.clone(), [t.clone() for t in k], [t.clone() for t in v]
        )
        got = step(idx, input_pos, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- other dtypes, quantization, CUDA -------------------------------------------------------


@pytest.mark.slow
def test_bf16_step_matches_eager(tmp_path) -> None:
    model = tiny_model(seed=SEED).to(torch.bfloat16)
    step = compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=True, cache_dir=tmp_path)
    assert step is not None
    cfg = model.config
    k = [torch.randn(3, cfg.n_head, MAX_LEN, cfg.head_size, dtype=torch.bfloat16) for _ in range(cfg.n_layer)]
    v = [torch.randn_like(t) for t in k]
    idx, input_pos = torch.tensor([[5], [60], [9]]), torch.tensor([0, 7, LENGTH_BUCKET % MAX_LEN])
    with torch.inference_mode():
        want = model.decode_step(idx, input_pos, [t.clone() for t in k], [t.clone() for t in v])
        got = step(idx, input_pos, k, v)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_an_int8_build_asks_inductor_for_its_general_gemm_template() -> None:
    # Inductor's small-M variant read gpt2's int8 layers at 22-27 GB/s, its general
    # template at 29-34 (benchmarks/README.md): a weight-only build answers the variant's
    # predicate False, and puts it back after; other builds leave inductor as it is.
    import torch._inductor.select_algorithm  # noqa: F401
    from torch._inductor.codegen import cpp_gemm_template, cpp_micro_gemm

    from gpt2kit.model.compiled import build
    from gpt2kit.model.quantize import quantize_int8

    name = "is_int8_woq_gemm_small_m_dim_corner_case"
    modules = (cpp_micro_gemm, cpp_gemm_template)
    original = [getattr(m, name) for m in modules]
    assert all(f is not None for f in original), (
        "inductor renamed the predicate: see build._general_int8_gemm"
    )
    int8 = tiny_model(seed=SEED)
    quantize_int8(int8, scheme="int8-weight-only")
    with build._general_int8_gemm(int8):
        assert all(getattr(m, name)(None, 1, 3072, 768) is False for m in modules)
    assert [getattr(m, name) for m in modules] == original
    with build._general_int8_gemm(tiny_model(seed=SEED)):
        assert [getattr(m, name) for m in modules] == original


@pytest.mark.slow
def test_int8_step_matches_eager(tmp_path) -> None:
    from gpt2kit.model.quantize import quantize_int8

    model = tiny_model(seed=SEED)
    quantize_int8(model)  # in place; it returns the scheme
    step = compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=True, cache_dir=tmp_path)
    assert step is not None
    steps = MAX_LEN - len(PROMPTS[0])
    tokens = greedy(model, step, PROMPTS, steps=steps, max_len=MAX_LEN)
    assert tokens == greedy(model, model.decode_step, PROMPTS, steps=steps, max_len=MAX_LEN)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_step_matches_eager(tmp_path, dtype) -> None:
    """The CUDA build of the step (Triton kernels): run with `pytest -m gpu` on a CUDA machine."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = tiny_model(seed=SEED).to("cuda", dtype)
    step = compiled_step(model, slots=SLOTS, max_len=MAX_LEN, build=True, cache_dir=tmp_path)
    assert step is not None
    cfg = model.config
    shape = (3, cfg.n_head, MAX_LEN, cfg.head_size)
    k = [torch.randn(shape, device="cuda", dtype=dtype) for _ in range(cfg.n_layer)]
    v = [torch.randn_like(t) for t in k]
    idx = torch.tensor([[5], [60], [9]], device="cuda")
    input_pos = torch.tensor([0, 7, MAX_LEN - 2], device="cuda")
    with torch.inference_mode():
        want = model.decode_step(idx, input_pos, [t.clone() for t in k], [t.clone() for t in v])
        got = step(idx, input_pos, k, v)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
