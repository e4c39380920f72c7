"""`generate` leaves the caller's model computing exactly as it did.

On CPU the engine lays each Linear/Embedding weight out [in, out] in memory first
(`use_decode_layout`): the same Parameter objects, values and shapes, another stride and data
pointer. `model(x)` must stay bitwise the same, at every CPU level this machine can emulate
(ATEN_CPU_CAPABILITY, set before torch is imported: a subprocess). The compiled-step versions
are in test_compiled.py (float32) and test_compiled_modes.py (bfloat16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from gpt2kit import generate

TESTS = Path(__file__).parent.parent


def outputs_and_layout(dtype: torch.dtype) -> dict:
    """model(x) before and after generate(), and what became of each parameter."""
    model = tiny_model(seed=1).to(dtype)
    x = torch.tensor([[3, 14, 15, 92, 65]])
    params = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    values = {n: p.detach().clone() for n, p in params.items()}
    with torch.inference_mode():
        before = model(x).logits
    generate(model, [[1, 2, 3], [4]], max_new_tokens=5, seed=0, compile=False)
    with torch.inference_mode():
        after = model(x).logits
    relaid = sorted(n for n, p in model.named_parameters() if not p.is_contiguous())
    return {
        "bitwise": torch.equal(before, after),
        "same_objects": all(p is params[n] for n, p in model.named_parameters()),
        "same_values": all(torch.equal(p, values[n]) for n, p in model.named_parameters()),
        "same_shapes": all(tuple(p.shape) == shapes[n] for n, p in model.named_parameters()),
        "relaid": relaid,
        "relaid_strides": all(
            p.stride() == (1, p.shape[0]) for n, p in model.named_parameters() if n in relaid
        ),
    }


def check(result: dict) -> None:
    assert result["bitwise"], "model(x) changed after generate()"
    assert result["same_objects"] and result["same_values"] and result["same_shapes"]
    # What changes, and only that: the 2-D weights' memory order ([in, out]), not their values.
    assert result["relaid"] and result["relaid_strides"]
    assert all(n.endswith(".weight") for n in result["relaid"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_leaves_model_outputs_bitwise_unchanged(dtype: torch.dtype) -> None:
    check(outputs_and_layout(dtype))


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_the_same_at_lower_cpu_levels(capability: str) -> None:
    code = (
        "import json, torch, test_decode_layout as t\n"
        "torch.set_num_threads(1)\n"
        "print(json.dumps({d: t.outputs_and_layout(getattr(torch, d)) for d in ('float32', 'bfloat16')}))\n"
        "print(torch.backends.cpu.get_cpu_capability())\n"
    )
    env = dict(
        os.environ,
        ATEN_CPU_CAPABILITY=capability,
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).parent), str(TESTS), os.environ.get("PYTHONPATH", "")]
        ),
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=TESTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results, level = proc.stdout.strip().splitlines()[-2:]
    assert level.strip().upper() == capability.upper()
    for result in json.loads(results).values():
        check(result)


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_generate_under_a_no_grad_context_leaves_the_model_trainable(context) -> None:
    """The new layout's memory is made outside the caller's inference_mode: the parameters
    must not become inference tensors (backward through them would then fail)."""
    model = tiny_model(seed=1)
    with context():
        generate(model, [[1, 2, 3]], max_new_tokens=3, compile=False)
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
