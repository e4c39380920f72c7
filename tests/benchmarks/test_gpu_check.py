"""benchmarks/gpu_check.sh, the prepared GPU run, smoke-tested on this CPU: the plan (--dry-run),
every stage at a tiny size (--device cpu), and a stage stopped at its budget.

The stages run for real (a real server on loopback, a real training run, real decoding); the
`gpu` tests skip here, so the tests stage must say SKIP, and on a CPU no row may claim CUDA
graphs. The default run checks the plan, one real stage and the time budget in about half a
minute; the whole `--device cpu` run takes a minute (eager decoding) to a few (the compiled
decode variants, torch.compile and AOTInductor): those two are `slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["setup", "tests", "decode", "serve", "train"]


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPT2KIT_CACHE_DIR")}
    env |= {"GPU_CHECK_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return proc, summary


def by_stage(summary: dict) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in summary["rows"]:
        assert row["status"] in ("PASS", "FAIL", "SKIP"), row
        rows.setdefault(row["stage"], []).append(row)
    return rows


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path) -> None:
    proc, summary = run_check(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The exact commands, as the GPU run would start them.
    assert "-m pytest -m gpu tests/" in proc.stdout
    for stage in ("decode", "serve", "train"):
        assert f"benchmarks/gpu_check_{stage}.py --device cuda --size gpt2 --dtype bfloat16" in proc.stdout
    assert "--batch 32 --block 1024 --warmup 10 --steps 40 --compile" in proc.stdout
    rows = by_stage(summary)
    assert list(rows) == STAGES
    assert all(r["status"] == "SKIP" and "dry run" in r["check"] for s in STAGES[1:] for r in rows[s])
    assert summary["dry_run"] is True and summary["device"] == "cuda"
    # One summary table, at the end of the output, with a row per stage.
    table = proc.stdout[proc.stdout.index("| stage | item | status |") :]
    for stage in STAGES:
        assert f"\n| {stage} |" in table
    assert not (tmp_path / "out" / "decode.log").exists()


def check_cpu_run(proc: subprocess.CompletedProcess, summary: dict, decode_variants: int) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = by_stage(summary)
    assert list(rows) == STAGES
    assert summary["verdict"] == "PASS" and summary["device"] == "cpu"
    # The gpu tests were collected and skipped for want of CUDA, not deselected to nothing.
    [tests] = rows["tests"]
    assert tests["status"] == "SKIP" and "skipped" in tests["figure"] and "CUDA" in tests["figure"]
    check_decode_rows(rows["decode"], decode_variants)
    [serve] = rows["serve"]
    assert serve["status"] == "PASS" and serve["errors"] == 0 and serve["tokens"] > 0
    assert "TTFT p50" in serve["figure"]
    [train] = rows["train"]
    assert train["status"] == "PASS" and train["tok_s"] > 0 and "MFU n/a" in train["figure"]
    # The one summary table comes last, a row per stage.
    table = proc.stdout.split("# gpu_check:")[-1]
    for stage in STAGES:
        assert f"\n| {stage} |" in table


def check_decode_rows(decode: list[dict], variants: int) -> None:
    assert len(decode) == 2 * variants
    for row in decode:
        assert row["status"] == "PASS" and row["tok_s"] > 0, row
        # float32 eager is the reference; every other variant is held to it
        assert ("the reference" if row["item"].startswith("eager") else "greedy = eager for 16/16") in row[
            "check"
        ]
        assert "CUDA graphs used" not in row["check"]  # not on a CPU
    assert {r["item"].rsplit(", ", 1)[1] for r in decode} == {"batch 1", "batch 8"}


def test_cpu_run_of_one_stage(tmp_path) -> None:
    """The stage protocol end to end, quickly: a real eager decode at batch 1 and 8, its rows
    in the table, its log starting with the machine."""
    proc, summary = run_check(tmp_path, "--device", "cpu", "--only", "decode", "--decode-variants", "eager")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = by_stage(summary)
    assert list(rows) == ["setup", "decode"]
    check_decode_rows(rows["decode"], 1)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["decode.log", "summary.json", "summary.md"]
    assert (out / "decode.log").read_text().startswith("machine: GPU ")
    assert "| decode | eager decode_step, float32, batch 8 | PASS |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_cpu_run_every_stage_at_a_tiny_size(tmp_path) -> None:
    """`--device cpu` with eager decoding: about a minute on a busy 2-core machine."""
    proc, summary = run_check(
        tmp_path, "--device", "cpu", "--decode-variants", "eager", "--work", str(tmp_path / "w")
    )
    check_cpu_run(proc, summary, decode_variants=1)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.json", "summary.md", "tests.log", "decode.log", "serve.log", "train.log"]
    )
    for stage in STAGES[1:]:  # every stage's log starts with the machine it ran on
        assert (out / f"{stage}.log").read_text().startswith("machine: GPU ")


@pytest.mark.slow
def test_cpu_run_with_the_compiled_decode_variants(tmp_path) -> None:
    """`--device cpu` as it is, torch.compile and the AOTInductor step included: minutes."""
    proc, summary = run_check(tmp_path, "--device", "cpu", "--work", str(tmp_path / "w"))
    check_cpu_run(proc, summary, decode_variants=3)


def test_a_stage_past_its_budget_is_stopped_and_fails(tmp_path) -> None:
    proc, summary = run_check(tmp_path, "--device", "cpu", "--only", "serve", "--budget", "serve=2")
    assert proc.returncode == 1
    rows = by_stage(summary)
    assert list(rows) == ["setup", "serve"]
    assert (
        rows["serve"][-1]["status"] == "FAIL" and "stopped at its budget of 2s" in rows["serve"][-1]["check"]
    )
    assert summary["verdict"] == "FAIL"
