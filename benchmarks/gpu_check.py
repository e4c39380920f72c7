"""The driver of `benchmarks/gpu_check.sh`: four stages in order, each under a time budget,
then one summary table (also written as summary.md and summary.json to the output folder).

Stages (each a separate process, its output in OUT/<stage>.log):

1. `tests`: the `gpu`-marked tests (`pytest -m gpu` over the test files that use the marker);
2. `decode`: decode tokens/s at batch 1 and 8, eager, torch.compile with CUDA graphs, and
   gpt2kit's compiled step, each beside a greedy check against eager (`gpu_check_decode.py`);
3. `serve`: `gpt2kit serve` with 8 concurrent streaming clients (`gpu_check_serve.py`);
4. `train`: training tokens/s and MFU of gpt2 124M (`gpu_check_train.py`).

`--device cuda` (the default) runs gpt2 124M in bf16 and fits 8 minutes on one H100/H200
(`BUDGETS`; a stage past its budget is stopped, and the items it finished are kept).
`--device cpu` runs every stage at a tiny size (the CPU smoke test; the `gpu` tests skip
there). `--dry-run` prints the plan and the exact commands, and runs nothing.

Each row of the table is PASS, FAIL or SKIP. The exit status is 1 when any row FAILs.

    benchmarks/gpu_check.sh                 # on the GPU machine (see benchmarks/README.md, "GPU check")
    benchmarks/gpu_check.sh --device cpu    # every stage, tiny, on this CPU
    benchmarks/gpu_check.sh --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("tests", "decode", "serve", "train")
# Seconds per stage; on CUDA they sum, with the setup, to under 8 minutes (TOTAL). Estimates:
# this has not run on a GPU yet; rebalance with --budget STAGE=SECONDS after a first run.
# Time a stage leaves unused goes to the stages after it, within TOTAL.
BUDGETS = {
    "cuda": {"tests": 110, "decode": 160, "serve": 60, "train": 120},
    "cpu": {"tests": 120, "decode": 420, "serve": 120, "train": 120},
}
TOTAL = {"cuda": 480, "cpu": 900}


@dataclass
class Stage:
    name: str
    command: list[str]
    budget: float
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def gpu_test_files() -> list[str]:
    """The test files that use the `gpu` marker (collecting only them keeps out the imports
    other test files need: playwright, openai, lm_eval)."""
    files = sorted(p for p in (ROOT / "tests").rglob("test_*.py") if "pytest.mark.gpu" in p.read_text())
    return [str(p.relative_to(ROOT)) for p in files]


# Each stage's size per device: gpt2 124M in bf16 on CUDA, a tiny float32 model on a CPU.
SIZED = {
    "cuda": {
        "decode": "--size gpt2 --dtype bfloat16 --new 128 --prompt 32 --repeats 3",
        "serve": "--size gpt2 --dtype bfloat16 --requests 32 --max-tokens 128",
        "train": "--size gpt2 --dtype bfloat16 --batch 32 --block 1024 --warmup 10 --steps 40 --compile",
    },
    "cpu": {
        "decode": "--size tiny --dtype float32 --new 16 --prompt 8 --repeats 1",
        "serve": "--size tiny --dtype float32 --requests 8 --max-tokens 16",
        "train": "--size tiny --dtype float32 --batch 4 --block 64 --warmup 2 --steps 4 --log-every 1",
    },
}


def plan(args: argparse.Namespace, work: Path) -> list[Stage]:
    """The stages to run, with their exact commands, sized for the device."""
    budgets = BUDGETS[args.device] | dict(args.budget)
    model = ["--model-dir", str(work / "model")]  # one random model for decode and serve
    extra = {
        "decode": [*model, "--variants", args.decode_variants],
        "serve": [*model, "--clients", "8"],
        "train": ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [],
    }
    stages = []
    for name in args.only:
        if name == "tests":
            files = gpu_test_files()
            command = [
                args.python,
                "-m",
                "pytest",
                "-m",
                "gpu",
                *files,
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
            ]
        else:
            command = [args.python, f"benchmarks/gpu_check_{name}.py", "--device", args.device]
            command += [*SIZED[args.device][name].split(), *extra[name]]
            command += ["--result", str(work / f"{name}.jsonl")]
        stages.append(Stage(name, command, budgets[name]))
    return stages


def environment(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """The stages' environment: this checkout's code first, one step cache for the decode
    and serve stages, unbuffered output (a stopped stage's log still has its last lines)."""
    env = dict(os.environ)
    paths = [str(ROOT / "src"), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("GPT2KIT_CACHE_DIR", str(work / "stepcache"))
    env["PYTHONUNBUFFERED"] = "1"
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")  # tiny models gain nothing from threads; a busy CPU loses
    return env


def run_stage(stage: Stage, env: dict[str, str], log: Path, timeout: float, work: Path, header: str) -> None:
    """Run one stage in its own process group (a stopped stage takes its server with it)."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write(f"{header}\n$ {shlex.join(stage.command)}\n(budget {timeout:.0f}s)\n\n")
        f.flush()
        proc = subprocess.Popen(
            stage.command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            _stop(proc)
    stage.seconds = time.perf_counter() - start
    text = log.read_text(encoding="utf-8", errors="replace")
    if stage.name == "tests":
        stage.rows = [tests_row(rc, text)]
    else:
        stage.rows = _read_rows(work / f"{stage.name}.jsonl")
        if rc != 0 and not stage.rows:
            stage.rows = [{"item": stage.name, "status": "FAIL", "figure": "", "check": _failure(rc, text)}]
    if rc is None:
        stage.rows.append(
            {
                "item": f"{stage.name} (stopped)",
                "status": "FAIL",
                "figure": "",
                "check": f"stopped at its budget of {timeout:.0f}s; the items above finished",
            }
        )
    for row in stage.rows:
        row.setdefault("stage", stage.name)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _failure(rc: int | None, text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return f"exited with status {rc}: {lines[-1][:300] if lines else 'no output'}"


def tests_row(rc: int | None, text: str) -> dict:
    """The tests stage's row from pytest's exit status and its summary line."""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary line"
    skips = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.+)", text)))
    if rc == 0 and counts.get("passed", 0) > 0:
        status = "PASS"
    elif rc == 0:
        status, summary = "SKIP", f"{summary}: {'; '.join(skips) or 'all skipped'}"
    elif rc == 5:
        status, summary = "FAIL", "no gpu-marked test was collected"
    else:
        status = "FAIL"
    return {"item": "pytest -m gpu", "status": status, "figure": summary, "check": f"pytest exit status {rc}"}


def table(rows: list[dict]) -> str:
    lines = ["| stage | item | status | figure | check |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r["stage"], r["item"], r["status"], r["figure"], r["check"]]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_summary(
    out: Path, machine: str, rows: list[dict], stages: list[Stage], args: argparse.Namespace
) -> str:
    """summary.md and summary.json in `out` (rewritten after every stage, so a run stopped
    from outside still leaves the stages it finished)."""
    verdict = "FAIL" if any(r["status"] == "FAIL" for r in rows) else "PASS"
    took = time.time() - args.started_at
    text = (
        f"# gpu_check: {verdict} ({args.device}{', dry run' if args.dry_run else ''}, {took:.0f}s in all)\n\n"
        f"{machine}\n\n{table(rows)}\n\n"
        + "\n".join(f"- {s.name}: {s.seconds:.0f}s of its {s.budget:.0f}s budget" for s in stages)
        + "\n"
    )
    (out / "summary.md").write_text(text, encoding="utf-8")
    data = {
        "verdict": verdict,
        "device": args.device,
        "dry_run": args.dry_run,
        "seconds": took,
        "machine": machine,
        "rows": rows,
    }
    (out / "summary.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return text


def machine_line(python: str, env: dict[str, str]) -> str:
    """The machine as the stages' Python sees it (GPU, driver, CUDA, torch, CPU flags)."""
    code = "from gpu_check_common import machine_line; print(machine_line())"
    try:
        out = subprocess.run(
            [python, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"machine: not probed ({e})"
    lines = out.stdout.strip().splitlines()
    return (
        lines[-1]
        if out.returncode == 0 and lines
        else f"machine: not probed ({(out.stderr.strip().splitlines() or ['?'])[-1]})"
    )


def setup_row(args: argparse.Namespace) -> dict:
    status, seconds, note = (
        [*args.setup.split("|", 2), "", ""][:3]
        if args.setup
        else ("SKIP", "0", "not run through gpu_check.sh")
    )
    return {
        "stage": "setup",
        "item": f"python {args.python}",
        "status": status,
        "figure": f"{float(seconds or 0):.0f}s",
        "check": note,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.work:
        work = Path(args.work)
    elif args.dry_run:
        work = Path(tempfile.gettempdir()) / "gpu_check-XXXX"  # what a run would create; nothing is
    else:
        work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    env = environment(args, work)
    stages = plan(args, work)
    machine = machine_line(args.python, env)
    total = TOTAL[args.device] if args.total_budget is None else args.total_budget
    print(machine)
    print(f"plan ({args.device}, {total}s in all, output in {out}, work in {work}):")
    for s in stages:
        print(f"  {s.name} (budget {s.budget:.0f}s): {shlex.join(s.command)}")
    print(
        f"  environment: PYTHONPATH={env['PYTHONPATH']} GPT2KIT_CACHE_DIR={env['GPT2KIT_CACHE_DIR']}",
        flush=True,
    )
    rows, saved = [setup_row(args)], 0.0
    for s in stages:
        left = total - (time.time() - args.started_at)
        if args.dry_run or left < 20:
            why = (
                "dry run: not run"
                if args.dry_run
                else f"not started: {left:.0f}s left of the {total}s in all"
            )
            s.rows = [{"stage": s.name, "item": s.name, "status": "SKIP", "figure": "", "check": why}]
        else:
            # Its budget, plus what the stages before it left unused, within the total.
            timeout = min(s.budget + saved, left - 5)
            run_and_report(s, env, out, timeout, work, machine)
            saved = max(0.0, timeout - s.seconds)
        rows += s.rows
        write_summary(out, machine, rows, stages, args)
    print("\n" + write_summary(out, machine, rows, stages, args), flush=True)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


def run_and_report(
    stage: Stage, env: dict[str, str], out: Path, timeout: float, work: Path, machine: str
) -> None:
    """Run `stage`, printing a line before and after (and its log's tail when it fails)."""
    log = out / f"{stage.name}.log"
    print(f"[{stage.name}] running (budget {timeout:.0f}s, log {log})", flush=True)
    run_stage(stage, env, log, timeout, work, machine)
    worst = "FAIL" if any(r["status"] == "FAIL" for r in stage.rows) else stage.rows[0]["status"]
    print(f"[{stage.name}] {worst} in {stage.seconds:.0f}s", flush=True)
    if worst == "FAIL":
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        print("\n".join("    " + line for line in tail), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    p.add_argument(
        "--out", default=os.environ.get("OUT") or "gpu_check_out", help="default: $OUT, else ./gpu_check_out"
    )
    p.add_argument(
        "--work",
        default=None,
        help="folder for the model, data and step cache (default: a new temporary one)",
    )
    p.add_argument("--only", default=",".join(STAGES), help=f"stages to run, in order: {','.join(STAGES)}")
    p.add_argument(
        "--budget", action="append", default=[], metavar="STAGE=SECONDS", help="override a stage's budget"
    )
    p.add_argument(
        "--total-budget", type=float, default=None, help="seconds for everything (default: 480 on cuda)"
    )
    p.add_argument("--decode-variants", default="eager,graphs,aoti", help="decode stage: eager,graphs,aoti")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="train stage: the GPU's peak dense bf16 TFLOP/s"
    )
    p.add_argument(
        "--python", default=sys.executable, help="the Python the stages run with (gpu_check.sh picks it)"
    )
    p.add_argument(
        "--started-at", type=float, default=None, help="epoch seconds the run started (gpu_check.sh)"
    )
    p.add_argument("--setup", default="", help="STATUS|SECONDS|NOTE of gpu_check.sh's setup")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    unknown = [s for s in args.only if s not in STAGES]
    if unknown:
        p.error(f"--only: unknown stage {', '.join(unknown)}; use some of {','.join(STAGES)}")
    budgets = []
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in STAGES or not seconds.replace(".", "", 1).isdigit():
            p.error(f"--budget expects STAGE=SECONDS with STAGE one of {','.join(STAGES)}, got {item!r}")
        budgets.append((name, float(seconds)))
    args.budget = budgets
    args.started_at = args.started_at or time.time()
    return args


if __name__ == "__main__":
    raise SystemExit(main())
