"""int8 and bf16 inference: the schemes, their quality cost on a trained model, loading, the CLI.

The quality bounds are checked on a model trained here for a few seconds (real training on
Shakespeare, byte-level tokens), scored on text it never saw.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

import gpt2kit.device as dev
from cli_helpers import free_port, gpt2kit, run_main
from conftest import shakespeare_plays, tiny_model
from gpt2kit import GPT2, generate
from gpt2kit.cli._common import DTYPE_CHOICES, QUANTIZE_CHOICES
from gpt2kit.data.shards import TokenData
from gpt2kit.errors import ConfigError
from gpt2kit.evals.perplexity import evaluate_perplexity
from gpt2kit.model.quantize import METHODS, SCHEMES, Int8Linear, pick_scheme, quantize_int8
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.loop import train
from train_helpers import make_data

# The perplexity change allowed on held-out text, relative, for the model trained below: 0.5%.
# Measured there (2026-12-02, perplexity 11.586 in float32): bf16 -0.03%, int8-weight-only
# +0.03%, int8-dynamic +0.05%, bf16 + int8-dynamic +0.05%, bf16 + int8-weight-only +0.02%.
# The quick-start and gpt2-size figures are in benchmarks/README.md.
BOUND = 0.005
PRECISIONS = [
    ("bfloat16", None),
    ("float32", "int8-weight-only"),
    ("float32", "int8-dynamic"),
    ("bfloat16", "int8-dynamic"),
    ("bfloat16", "int8-weight-only"),
]


def quantized_linears(model: GPT2) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]


def int8_data(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, scales) of a quantized Linear, whichever scheme made it."""
    if isinstance(module, Int8Linear):
        return module.weight, module.scale
    return module.weight.qdata, module.weight.scale


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TokenData]:
    """A 2-layer model trained on the start of a play (a few seconds), and its data."""
    root = tmp_path_factory.mktemp("trained")
    data = make_data(root / "data")
    cfg = TrainConfig(
        data=str(data),
        n_layer=2,
        n_head=4,
        n_embd=64,
        block_size=64,
        batch_size=16,
        max_steps=300,
        lr=3e-3,
        warmup_steps=20,
        eval_interval=300,
        eval_iters=2,
        ckpt_interval=300,
        device="cpu",
        dtype="float32",
        threads=1,
    )
    result = train(cfg, root / "run")
    return result.final_dir, TokenData.open(data)


@pytest.fixture(scope="module")
def held_out() -> str:
    return shakespeare_plays()[1].read_text(encoding="utf-8")[5000:9000]


# --- the schemes ------------------------------------------------------------------------------


def test_the_cli_offers_what_the_library_takes() -> None:
    assert DTYPE_CHOICES == dev.DTYPE_CHOICES
    assert QUANTIZE_CHOICES == METHODS == ("int8", *SCHEMES)


@pytest.mark.parametrize(
    ("bf16", "int8", "dtype"),
    [
        ("AVX512-BF16", "AVX512-VNNI", torch.float32),
        ("AVX512-BF16", "AVX512-VNNI", torch.bfloat16),
        (None, "AVX512-VNNI", torch.float32),  # Cascade Lake
        ("AMX", "AMX-INT8", torch.bfloat16),
        ("AMX", "AMX-INT8", torch.float32),
        (None, None, torch.float32),  # AVX2 alone
        (None, None, torch.bfloat16),
    ],
)
def test_weight_only_is_picked_on_every_cpu(
    monkeypatch: pytest.MonkeyPatch, bf16, int8, dtype: torch.dtype
) -> None:
    monkeypatch.setattr(dev, "cpu_bf16", lambda: bf16)
    monkeypatch.setattr(dev, "cpu_int8", lambda: int8)
    got, reason = pick_scheme("cpu", dtype)
    assert got == "int8-weight-only" and "every CPU level" in reason, reason
    assert pick_scheme("cuda", dtype)[0] == "int8-weight-only"
    model = tiny_model().to(dtype)
    assert quantize_int8(model) == "int8-weight-only"  # "int8" on the model's own device and dtype


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_stays_close_and_generates(scheme: str) -> None:
    model = tiny_model(seed=5)
    params = model.num_parameters()
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits.log_softmax(-1)
        assert quantize_int8(model, scheme=scheme) == scheme == model.quantization
        out = model(ids).logits.log_softmax(-1)
    linears = quantized_linears(model)
    assert len(linears) == 4 * model.config.n_layer + 1  # the blocks' four, and the output head
    for lin in linears:
        qdata, scale = int8_data(lin)
        assert qdata.dtype == torch.int8 and scale.numel() == qdata.shape[0]
        top = qdata.int().abs().amax(dim=1)
        assert (top >= 120).all() and (top <= 128).all()  # each row's range used, no overflow
    assert model.lm_head.out_features == model.config.vocab_size
    assert model.wte.weight.dtype == torch.float32  # lookups stay float
    assert model.num_parameters() == params  # the int8 head is a copy of wte, not more model
    # Rounding to 1/255 of each row's range (and, dynamic, of each token's) moves log-probs a little.
    err = (out - ref).abs().max().item()
    assert 0 < err < 0.05, err
    gen = generate(model, ids[:, :5], max_new_tokens=6, temperature=0)
    assert gen.shape == (2, 11)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_linear_is_the_dequantized_product(rows: int) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 200)
    linear.weight.data[7] *= 1e-6  # a row of tiny weights keeps its own scale
    q = Int8Linear(linear)
    w = linear.weight.detach()
    scale = q.scale.float()
    # The scales are bfloat16 values, each row's largest weight lands inside [-127, 127],
    # and every weight is within half a step of its int8 value.
    assert q.scale.dtype == torch.bfloat16 and q.weight.dtype == torch.int8 and not q.weight.requires_grad
    assert (w.abs().amax(dim=1) <= 127 * scale).all()
    assert ((q.weight.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()
    x = torch.randn(2, rows, 96)
    with torch.no_grad():
        y = q(x)
        # bfloat16 activations into the kernel, float32 sums, a bfloat16 result (on CPU).
        ref = (x.bfloat16().float() @ (q.weight.float() * scale[:, None]).T).bfloat16().float() + linear.bias
    assert y.shape == (2, rows, 200) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-3)
    assert (y - linear(x)).abs().max() < 0.05  # and close to the float Linear


def test_a_model_is_quantized_once(tmp_path: Path) -> None:
    model = tiny_model()
    quantize_int8(model, scheme="int8-weight-only")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_int8(model)
    with pytest.raises(ConfigError, match="int8 scheme 'int4' is unknown"):
        quantize_int8(tiny_model(), scheme="int4")


def test_compiled_int8_decode_step_matches_eager() -> None:
    # The form the compiled step exports: torchao int8 weights through inductor.
    model = tiny_model(seed=3)
    quantize_int8(model, scheme="int8-dynamic")
    B, L, c = 2, 16, model.config
    caches = [[torch.zeros(B, c.n_head, L, c.head_size) for _ in range(c.n_layer)] for _ in range(4)]
    idx, pos = torch.tensor([[5], [7]]), torch.tensor([0, 3])
    with torch.inference_mode():
        eager = model.decode_step(idx, pos, caches[0], caches[1])
        step = torch.compile(model.decode_step, fullgraph=True, dynamic=False)
        compiled = step(idx, pos, caches[2], caches[3])
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for a, b in zip(caches[0] + caches[1], caches[2] + caches[3], strict=True):
        torch.testing.assert_close(a, b)


# --- loading ----------------------------------------------------------------------------------


def test_from_pretrained_dtype_round_trips(trained, tmp_path: Path) -> None:
    final, _ = trained
    bf16 = GPT2.from_pretrained(str(final), dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    bf16.save_pretrained(tmp_path / "bf16", tokenizer=None)
    again = GPT2.from_pretrained(str(tmp_path / "bf16"))  # the checkpoint's own dtype: bf16
    for (name, a), (_, b) in zip(bf16.state_dict().items(), again.state_dict().items(), strict=True):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), name
    ids = torch.randint(0, 257, (1, 30))
    with torch.no_grad():
        assert torch.equal(bf16(ids).logits, again(ids).logits)
        fp32 = GPT2.from_pretrained(str(tmp_path / "bf16"), dtype=torch.float32)
        assert fp32.wte.weight.dtype == torch.float32
        assert torch.equal(fp32.wte.weight, bf16.wte.weight.float())  # bf16 -> fp32 is exact


def test_from_pretrained_quantize(trained, tmp_path: Path) -> None:
    final, _ = trained
    a = GPT2.from_pretrained(str(final), quantize="int8")
    b = GPT2.from_pretrained(final, quantize="int8")
    assert a.quantization == b.quantization == pick_scheme("cpu")[0]
    for x, y in zip(quantized_linears(a), quantized_linears(b), strict=True):
        assert all(torch.equal(u, w) for u, w in zip(int8_data(x), int8_data(y), strict=True))
    c = GPT2.from_pretrained(str(final), dtype="bfloat16", quantize="int8-weight-only")
    assert c.quantization == "int8-weight-only" and c.ln_f.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 257, (1, 30))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)  # the same model, the same numbers
        assert c(ids).logits.dtype == torch.bfloat16
    # A checkpoint holds float weights: saving the int8 model is refused, loading again is the way.
    with pytest.raises(ConfigError, match=r"quantized .*save it before quantizing"):
        a.save_pretrained(tmp_path / "int8")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"quantize": "int4"}, "quantize='int4' is not supported; use one of int8, int8-dynamic"),
        ({"dtype": "float64"}, "dtype=float64: unknown dtype"),
        ({"dtype": torch.int32}, "dtype=torch.int32: a model computes in a floating-point dtype"),
        ({"device": "tpu"}, "device=tpu: unknown device"),
    ],
)
def test_from_pretrained_refuses_bad_values(trained, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        GPT2.from_pretrained(str(trained[0]), **kwargs)


# --- the quality cost -------------------------------------------------------------------------


def test_precisions_keep_perplexity_within_bounds(trained, held_out: str) -> None:
    final, data = trained
    tokenizer = data.tokenizer()
    base = evaluate_perplexity(GPT2.from_pretrained(final), tokenizer, held_out)["perplexity"]
    assert base < 12, base  # trained: a random byte-level model scores ~257
    for dtype, scheme in PRECISIONS:
        model = GPT2.from_pretrained(final, dtype=dtype, quantize=scheme)
        ppl = evaluate_perplexity(model, tokenizer, held_out)["perplexity"]
        assert ppl != base and abs(ppl / base - 1) < BOUND, (dtype, scheme, base, ppl)


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_prints_what_auto_and_int8_picked(
    tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dev, "cpu_bf16", lambda: None)
    monkeypatch.setattr(dev, "cpu_int8", lambda: None)
    argv = ["generate", "--model", str(tiny_hf_dir), "--prompt", "Hello", "--max-new-tokens", "4"]
    code, out, err = run_main(capsys, *argv, "--device", "cpu", "--temperature", "0", "--quantize", "int8")
    assert code == 0 and out.startswith("Hello"), err
    assert "[dtype auto: float32 (this CPU has no native bf16" in err
    assert "[quantize int8: int8-weight-only (int8 x bfloat16 products" in err
    assert "add --compile" not in err  # weight-only is fast eagerly too
    monkeypatch.setattr(dev, "cpu_bf16", lambda: "AMX")
    monkeypatch.setattr(dev, "cpu_int8", lambda: "AMX-INT8")
    code, out, err = run_main(capsys, *argv, "--temperature", "0", "--quantize", "int8")
    assert code == 0 and out.startswith("Hello"), err
    assert "[dtype auto: bfloat16 (this CPU has AMX)]" in err
    assert "[quantize int8: int8-weight-only (" in err
    code, out, err = run_main(capsys, *argv, "--dtype", "float32", "--quantize", "int8-dynamic")
    assert code == 0 and "dtype auto" not in err and "[quantize int8" not in err
    assert "[int8-dynamic decodes faster than float32 only compiled: add --compile]" in err
    code, out, err = run_main(capsys, *argv, "--dtype", "float32")
    assert code == 0 and "dtype auto" not in err and "quantize" not in err


def test_cli_prints_this_machines_pick(tiny_hf_dir: Path) -> None:
    r = gpt2kit(
        "generate",
        "--model",
        str(tiny_hf_dir),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "3",
        "--quantize",
        "int8",
    )
    assert r.returncode == 0, r.stderr
    dtype, why = dev.auto_dtype("cpu")
    assert f"[dtype auto: {str(dtype).removeprefix('torch.')} ({why})]" in r.stderr
    scheme, why = pick_scheme("cpu", dtype)
    assert f"[quantize int8: {scheme} ({why})]" in r.stderr


def test_eval_reports_the_quantization(trained, held_out: str, tmp_path: Path) -> None:
    text = tmp_path / "val.txt"
    text.write_text(held_out[:1500], encoding="utf-8")
    model_dir = tmp_path / "model"
    shutil.copytree(trained[0], model_dir)
    r = gpt2kit(
        "eval", "--model", str(model_dir), "--task", "perplexity", "--data", str(text),
        "--quantize", "int8-weight-only", "--device", "cpu",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "quantization=int8-weight-only" in r.stdout and "dtype=float32" in r.stdout


@pytest.mark.parametrize("command", ["generate", "serve", "eval"])
@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--dtype", "float64", "argument --dtype: invalid choice: 'float64'"),
        ("--quantize", "int4", "argument --quantize: invalid choice: 'int4'"),
    ],
)
def test_cli_refuses_bad_precision_flags(
    tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str], command: str, flag: str, value: str, fragment: str
) -> None:
    extra = ["--task", "perplexity", "--data", "x.txt"] if command == "eval" else []
    with pytest.raises(SystemExit) as e:
        from gpt2kit.cli import main

        main([command, "--model", str(tiny_hf_dir), *extra, flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and fragment in err and "Traceback" not in err, err


def test_copy_of_quantized_model_is_independent() -> None:
    model = tiny_model()
    quantize_int8(model, scheme="int8-weight-only")
    twin = copy.deepcopy(model)
    assert twin.quantization == model.quantization
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)


def test_serve_int8(tiny_hf_dir: Path) -> None:
    port = free_port()
    command = [
        "serve",
        "--model",
        str(tiny_hf_dir),
        "--port",
        str(port),
        "--quantize",
        "int8",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2kit", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        body = {"model": tiny_hf_dir.name, "prompt": "Hi", "max_tokens": 3, "seed": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    scheme, why = pick_scheme("cpu", dev.auto_dtype("cpu")[0])
    assert f"[quantize int8: {scheme} ({why})]" in err and "[dtype auto: " in err, err
