"""How soon `gpt2kit serve` answers on a fresh machine, and when its compiled step takes over.

A random gpt2 124M (`transformers.GPT2LMHeadModel()` saved with `save_pretrained`, plus
GPT-2's tokenizer files, as bench_generate.py makes it) is served with nothing but
`--model` (and `--threads` when given) and an empty step cache (GPT2KIT_CACHE_DIR a new
temporary folder), so the server decides for itself (docs/serving.md, "The compiled
decode step"). Measured from the moment the process is started:

- the first answered request (a 1-token completion sent again and again until one is answered);
- decode tokens/s of one streamed greedy request (`--new` tokens, eos ignored) right after,
  on the eager step while the compiled one builds beside it;
- the moment /health says the compiled step is in use, and decode tokens/s then (best of 3);
- decode tokens/s of a `--no-compile` server (eager, nothing building beside it; best of 3).

Decode tokens/s = (tokens - 1) / (time of the last streamed piece - time of the first).

    python benchmarks/bench_serve_startup.py
    python benchmarks/bench_serve_startup.py --model runs/quickstart/final --new 64
    python benchmarks/bench_serve_startup.py --first-only 3   # the first answer alone, 3 times
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import make_model_dir
from bench_serve import free_port

PROMPT = "The history of the city begins in the early years of the settlement, when"


class Serve:
    def __init__(self, model: str, cache: Path, log: Path, *flags: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "gpt2kit", "serve", "--model", model, "--model-name", "bench"]
        cmd += ["--port", self.url.rpartition(":")[2], *flags]
        env = {**os.environ, "GPT2KIT_CACHE_DIR": str(cache)}
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def first_answer(self) -> float:
        body = {"model": "bench", "prompt": "Hello", "max_tokens": 1}
        while True:
            try:
                if httpx.post(f"{self.url}/v1/completions", json=body, timeout=60).status_code == 200:
                    return time.perf_counter() - self.start
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: see {self.log.name}")
            time.sleep(0.05)

    def step(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=60).json()["decode_step"]

    def decode_rate(self, new: int) -> float:
        body = {"model": "bench", "prompt": PROMPT, "max_tokens": new, "temperature": 0}
        body |= {"ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        times, tokens = [], 0
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
        return (tokens - 1) / (times[-1] - times[0])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model to serve; default: a random gpt2 124M")
    p.add_argument("--new", type=int, default=128, help="tokens per timed request")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads")
    p.add_argument(
        "--first-only", type=int, default=0, metavar="N", help="only time the first answer, N times"
    )
    args = p.parse_args()
    flags = ("--threads", str(args.threads)) if args.threads else ()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(f"load average at the start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            model = str(work / "gpt2")
            make_model_dir(Path(model))
        if args.first_only:
            for i in range(args.first_only):  # each with an empty step cache of its own
                server = Serve(model, work / f"cache{i}", work / "first.log", *flags)
                try:
                    print(f"first answer after {server.first_answer():.2f} s ({server.step()['state']})")
                finally:
                    server.stop()
            print(f"load average at the end: {os.getloadavg()}")
            return
        server = Serve(model, work / "cache", work / "auto.log", *flags)
        try:
            first = server.first_answer()
            state = server.step()
            print(f"first answer after {first:.2f} s (decode step then: {state})")
            eager_building = server.decode_rate(args.new)
            print(f"eager while the compiled step builds: {eager_building:.1f} tok/s")
            if state["state"] == "building":
                while (state := server.step())["state"] == "building":
                    time.sleep(0.5)
                print(f"compiled step: {state} at {time.perf_counter() - server.start:.1f} s")
            compiled = (
                max(server.decode_rate(args.new) for _ in range(3)) if state["in_use"] == "compiled" else None
            )
        finally:
            server.stop()
        print((work / "auto.log").read_text())
        eager = Serve(model, work / "cache", work / "eager.log", "--no-compile", *flags)
        try:
            eager.first_answer()
            eager_rate = max(eager.decode_rate(args.new) for _ in range(3))
        finally:
            eager.stop()
    print(f"eager (--no-compile): {eager_rate:.1f} tok/s; compiled: {compiled and round(compiled, 1)} tok/s")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
